"""ptune vs HF PEFT, side by side, on the packaged MiniLM and the built-in bbc task.

Both sides train the same frozen model with the same method, max length, batch size, epochs, lr and
seed. PEFT runs the way its own examples train: ``get_peft_model`` on
``AutoModelForSequenceClassification``, a shuffled DataLoader padded per batch by the tokenizer,
fp32, AdamW and a linear schedule. ptune runs its own engine (``ptune.engine.train``). Every
configuration runs in a fresh subprocess so peak RSS is its own. Writes a Markdown table.

    python bench/compare_peft.py                      # all methods, 1 epoch each (~20 min on 2 cores)
    python bench/compare_peft.py --methods lora --epochs 2 --out bench/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

METHODS = ("prompt_tuning", "p_tuning", "p_tuning_v2", "prefix_tuning", "lora")
PTUNE_OPTIONS = {
    "prompt_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20, "encoder": "mlp", "encoder_num_layers": 3},
    "p_tuning_v2": {"num_virtual_tokens": 20},
    "prefix_tuning": {"num_virtual_tokens": 20, "encoder_hidden_size": 384},
    "lora": {"r": 8, "alpha": 16},
}


def peft_config(method: str):
    import peft

    task = peft.TaskType.SEQ_CLS
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=20)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=20, encoder_hidden_size=384,
                                        encoder_reparameterization_type="MLP")
    if method == "p_tuning_v2":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=20, prefix_projection=False)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=20, prefix_projection=True,
                                       encoder_hidden_size=384)
    return peft.LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=["query", "value"])


def run_peft(method: str, args: argparse.Namespace) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    import ptune
    from ptune.data import load_builtin

    torch.manual_seed(args.seed)
    task, splits = load_builtin("bbc", seed=args.seed)
    path = ptune.models.resolve_model_path("minilm")
    tok = ptune.load_tokenizer("minilm")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(task.labels))
    model = get_peft_model(model, peft_config(method))
    lid = task.label_to_id

    def batches(records, shuffle, seed):
        order = list(range(len(records)))
        if shuffle:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        for i in range(0, len(order), args.batch_size):
            rows = [records[j] for j in order[i:i + args.batch_size]]
            enc = tok([r["text"] for r in rows], truncation=True, max_length=args.max_length, padding=True,
                      return_tensors="pt")
            enc["labels"] = torch.tensor([lid[r["label"]] for r in rows])
            yield enc

    train = splits["train"][:args.limit_train or None]
    steps = args.epochs * -(-len(train) // args.batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for batch in batches(train, True, args.seed + epoch):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in batches(splits["validation"], False, 0):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return {"seconds": seconds, "samples_per_s": len(train) * args.epochs / seconds,
            "accuracy": correct / len(splits["validation"])}


def run_ptune(method: str, args: argparse.Namespace) -> dict:
    from ptune.engine import TrainConfig, train

    out = tempfile.mkdtemp(prefix="ptune-bench-")
    cfg = TrainConfig(model="minilm", task="bbc", method=method, method_options=PTUNE_OPTIONS[method],
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                      seed=args.seed, output_dir=out, progress=False, log_every=1000, limit_train=args.limit_train)
    s = train(cfg)
    seconds = s["train_seconds_this_session"] - s["eval_seconds"]  # PEFT's side is timed without evaluation
    return {"seconds": seconds, "samples_per_s": min(s["steps"] * args.batch_size, len_train(args)) / seconds,
            "accuracy": s["best_validation_accuracy"]}


def len_train(args: argparse.Namespace) -> int:
    return (args.limit_train or 1777) * args.epochs


def one(side: str, method: str, args: argparse.Namespace) -> None:
    result = (run_peft if side == "peft" else run_ptune)(method, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--limit-train", type=int, default=0, help="use the first N training articles (0 = all 1,777)")
    p.add_argument("--out", default="bench/results.md")
    p.add_argument("--one", help=argparse.SUPPRESS)  # side:method, run in a child process
    args = p.parse_args()
    if args.one:
        side, method = args.one.split(":")
        one(side, method, args)
        return
    rows = []
    for method in args.methods.split(","):
        res = {}
        for side in ("peft", "ptune"):
            cmd = [sys.executable, __file__, "--one", f"{side}:{method}", "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--lr", str(args.lr if method != "lora" else 5e-4), "--seed", str(args.seed),
                   "--limit-train", str(args.limit_train)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                res[side] = None
                continue
            res[side] = json.loads(line[0][7:])
            print(method, side, res[side], flush=True)
        rows.append((method, res))
    write_table(rows, args)


def write_table(rows: list, args: argparse.Namespace) -> None:
    head = ("| method | PEFT samples/s | ptune samples/s | speed ratio | PEFT val acc | ptune val acc | "
            "PEFT peak RSS MB | ptune peak RSS MB | RSS ratio |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for method, r in rows:
        a, b = r.get("peft"), r.get("ptune")
        if not a or not b:
            failed = " and ".join(side for side, v in (("PEFT", a), ("ptune", b)) if not v)
            lines.append(f"| {method} | {failed} failed (see stderr of the run) | | | | | | | |")
            continue
        lines.append(f"| {method} | {a['samples_per_s']:.1f} | {b['samples_per_s']:.1f} | "
                     f"{b['samples_per_s'] / a['samples_per_s']:.2f}x | {a['accuracy']:.4f} | {b['accuracy']:.4f} | "
                     f"{a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {b['peak_rss_mb'] / a['peak_rss_mb']:.2f} |")
    n = args.limit_train or 1777
    text = (f"MiniLM (all-MiniLM-L6-v2), bbc ({n} training articles), max length {args.max_length}, batch {args.batch_size}, "
            f"{args.epochs} epoch(s), seed {args.seed}, lr {args.lr} (LoRA 5e-4).\n\n" + head + "\n".join(lines) + "\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
