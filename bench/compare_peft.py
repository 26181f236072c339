"""ptune vs HF PEFT, side by side, on the packaged MiniLM and the built-in bbc task (issue #15: speed).
The LLM side (Gemma 3 270M, causal-LM training on bbc-headline) is bench/compare_peft_gemma.py.

Three sides train the same frozen model with the same method, max length, batch size, epochs, lr and
seed; every (method, side) runs in a fresh subprocess so its time and peak RSS are its own, and the
machine's load average is recorded before and after each run.

- ``peft``: PEFT the way its own examples train: ``get_peft_model`` on ``AutoModelForSequenceClassification``,
  a shuffled DataLoader padded per batch by the tokenizer, fp32, AdamW and a linear schedule. The base's
  dropout is on (hidden and attention 0.1, as MiniLM's config says), the classifier's dropout 0.1.
- ``peft_tuned``: the strongest honest PEFT on this machine. The same loop, but the frozen base's dropout is
  off for every method: the model is loaded with ``hidden_dropout_prob=0`` and ``attention_probs_dropout_prob=0``
  (this switches off the embedding, attention, attention-output and feed-forward dropouts inside the base,
  and SDPA's attention dropout), while the classifier's dropout stays 0.1 (``classifier_dropout=0.1``, as
  ptune's head dropout) and LoRA's ``lora_dropout`` stays PEFT's default (0.0). Plus bf16 autocast on the
  forward pass ONLY where ``ptune.engine.precision.bf16_available()`` says the hardware computes bf16 itself
  (AVX512-BF16 / AMX, or a GPU); on a CPU that emulates bf16 (AVX-512 without BF16) autocast makes a step
  1.6-2.2x slower (bench/results/precision.md), so this side stays fp32 there. Which precision it used
  and whether the base's dropout was active (measured: two train-mode forward passes of the body on the
  same rows, equal or not) are recorded per run.
- ``peft_eager``: ``peft_tuned`` with the model loaded with ``attn_implementation="eager"``. On a CPU with bf16,
  SDPA's backward in bf16 is 3-4x slower than plain matmul attention (``bench/attention.py``), which ptune's
  kernel avoids (``ptune.attention``); this side is what a PEFT user who knew that could get by switching
  attention implementations, so the lead that is left over it is ptune's own.
- ``ptune``: ptune's own engine (``ptune.engine`` Trainer, exactly what ``ptune.engine.train`` runs),
  ``--precision auto`` unless ``--ptune-options precision=...``. ptune switches the frozen base's dropout off
  for the prompt methods and for LoRA (its base stays frozen; ``--base-dropout auto``); before issue #15 it
  kept it on for LoRA, which is what the LoRA row of the first run of bench/speed.sh measured.

Throughput counts training only (PEFT: the loop, timed; ptune: its training seconds minus its evaluation
seconds). Validation accuracy is after the last step for PEFT and the best evaluation for ptune (the same
thing with one evaluation per run, i.e. ``--epochs 1``). Peak RSS is the whole child process (ru_maxrss).

Writes the raw results (per run: seconds, samples/s, accuracy, peak RSS, load before/after, precision,
base dropout; the host's CPU name and flags) to bench/results/compare_peft.json and the tables to
bench/results/compare_peft.md (``--out X.md`` writes X.md and X.json instead).

    python bench/compare_peft.py --limit-train 800 --epochs 1     # the issue #15 run: 15 runs, ~20 min on 2 quiet cores
    python bench/compare_peft.py --methods lora --sides peft_tuned,ptune --epochs 2
    python bench/compare_peft.py --methods p_tuning_v2 --sides ptune --ptune-options layers=top:3 \\
        --out bench/results/compare_peft_top3.md                   # extra method / TrainConfig options for ptune
    python bench/compare_peft.py --limit-train 64 --limit-eval 32 --methods p_tuning_v2 --out /tmp/smoke.md  # smoke, ~2 min

``--ptune-options``: JSON objects and/or ``key=value`` items (values read as YAML: numbers, true,
[a, b]); keys that are TrainConfig fields (``precision``, ``max_steps``, ``gradient_checkpointing``...) set
the ptune run's options, every other key is a method option (``num_virtual_tokens``, ``r``, ``layers``...)
added to the script's own per-method options. They change the ptune side only and are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("prompt_tuning", "p_tuning", "p_tuning_v2", "prefix_tuning", "lora")
SIDES = ("peft", "peft_tuned", "peft_eager", "ptune")
SIDE_NAMES = {"peft": "PEFT (examples)", "peft_tuned": "PEFT tuned", "peft_eager": "PEFT tuned + eager attention",
              "ptune": "ptune"}
PTUNE_OPTIONS = {
    "prompt_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20, "encoder": "mlp", "encoder_num_layers": 3},
    "p_tuning_v2": {"num_virtual_tokens": 20, "layers": "all"},  # full depth, as PEFT (P-Tuning v2's default is the upper half)
    "prefix_tuning": {"num_virtual_tokens": 20, "encoder_hidden_size": 384},
    "lora": {"r": 8, "alpha": 16},
}
LORA_LR = 5e-4
RESULTS = Path(__file__).resolve().parent / "results"


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


def split_ptune_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainConfig options, method options)."""
    from ptune.engine import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: v for k, v in options.items() if k in fields and k != "method_options"}
    method = {**options.get("method_options", {}), **{k: v for k, v in options.items() if k not in fields}}
    return train, method


INPUT_PROMPTS = ("prompt_tuning", "p_tuning")  # their virtual tokens are input positions


def ptune_config(method: str, s: dict, output_dir: str):
    from ptune.engine import TrainConfig

    train_opts, method_opts = split_ptune_options(s["ptune_options"])
    options = {**PTUNE_OPTIONS[method], **method_opts}
    # ptune's max length counts the template's virtual tokens; PEFT prepends its prompt to max_length text
    # tokens: give input-prompt methods the same text (128 + 20 positions on both sides)
    extra = options["num_virtual_tokens"] if method in INPUT_PROMPTS else 0
    values = dict(model="minilm", task="bbc", method=method, method_options=options,
                  epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], max_length=s["max_length"] + extra,
                  warmup_ratio=0.06,  # the PEFT sides' schedule (get_linear_schedule_with_warmup at 6%)
                  seed=s["seed"], output_dir=output_dir, progress=False, log_every=1000,
                  limit_train=s["limit_train"], limit_eval=s["limit_eval"])
    return TrainConfig(**{**values, **train_opts})


def base_dropout_active(body, batch: dict) -> bool:
    """Whether the frozen body's dropout is active: two train-mode forward passes on the same rows differ."""
    import torch

    rows = {k: batch[k][:4] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        a, b = body(**rows).last_hidden_state, body(**rows).last_hidden_state
    return not torch.equal(a, b)


def run_peft(method: str, s: dict, tuned: bool, eager: bool = False) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    import ptune
    from ptune.data import load_builtin
    from ptune.engine.precision import bf16_available

    torch.manual_seed(s["seed"])
    task, splits = load_builtin("bbc", seed=s["seed"])
    path = ptune.models.resolve_model_path("minilm")
    tok = ptune.load_tokenizer("minilm")
    # tuned: the frozen base's dropout off (hidden + attention), the classifier's kept at 0.1
    extra = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.1} if tuned else {}
    if eager:
        extra["attn_implementation"] = "eager"
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(task.labels), **extra)
    model = get_peft_model(model, peft_config(method))
    bf16 = tuned and bf16_available()
    lid = task.label_to_id

    def batches(records, shuffle, seed):
        order = list(range(len(records)))
        if shuffle:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        for i in range(0, len(order), s["batch_size"]):
            rows = [records[j] for j in order[i:i + s["batch_size"]]]
            enc = tok([r["text"] for r in rows], truncation=True, max_length=s["max_length"], padding=True,
                      return_tensors="pt")
            enc["labels"] = torch.tensor([lid[r["label"]] for r in rows])
            yield enc

    train = splits["train"][:s["limit_train"] or None]
    val = splits["validation"][:s["limit_eval"] or None]
    steps = s["epochs"] * -(-len(train) // s["batch_size"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["lr"])
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    model.train()
    dropout_on = base_dropout_active(model.get_base_model().bert, next(batches(train, False, 0)))
    t0 = time.perf_counter()
    for epoch in range(s["epochs"]):
        for batch in batches(train, True, s["seed"] + epoch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in batches(val, False, 0):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return {"seconds": seconds, "samples": len(train) * s["epochs"], "samples_per_s": len(train) * s["epochs"] / seconds,
            "accuracy": correct / len(val), "precision": "bf16" if bf16 else "fp32", "base_dropout": dropout_on,
            "attention": model.get_base_model().config._attn_implementation,
            "lora_dropout": getattr(peft_config(method), "lora_dropout", None)}


def run_ptune(method: str, s: dict) -> dict:
    from ptune.engine.loop import Trainer

    out = tempfile.mkdtemp(prefix="ptune-bench-")
    cfg = ptune_config(method, s, out)
    trainer = Trainer(cfg)  # what ptune.engine.train runs, kept at hand to read the model's settings
    try:
        trainer.resume()
        trainer.fit()
        summary = trainer.finish()
    finally:
        trainer.directory.close()
    seconds = summary["train_seconds_this_session"] - summary["eval_seconds"]  # PEFT's side is timed without evaluation
    samples = min(summary["steps"] * cfg.batch_size, summary["examples"]["train"] * cfg.epochs)
    metric = next(k for k in summary if k.startswith("best_validation_"))
    return {"seconds": seconds, "samples": samples, "samples_per_s": samples / seconds, "accuracy": summary[metric],
            "precision": "bf16" if summary["precision"] == "bf16" else "fp32",
            "base_dropout": bool(trainer.inner.base_dropout), "steps": summary["steps"],
            "trainable_parameters": summary["trainable_parameters"],
            "ptune_options": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"}}


def one(side: str, method: str, s: dict) -> None:
    import resource

    import torch

    result = run_ptune(method, s) if side == "ptune" else run_peft(method, s, tuned=side != "peft",
                                                                    eager=side == "peft_eager")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2, help=f"prompt methods' lr (LoRA uses {LORA_LR})")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--limit-train", type=int, default=0, help="use the first N training articles (0 = all 1,777)")
    p.add_argument("--limit-eval", type=int, default=0, help="score the first N validation articles (0 = all 223)")
    p.add_argument("--ptune-options", action="extend", nargs="+", default=[], metavar="JSON|KEY=VALUE",
                   help="extra options for the ptune side: TrainConfig fields or method options")
    p.add_argument("--out", default=str(RESULTS / "compare_peft.md"),
                   help="the Markdown tables; the raw JSON goes beside it (same name, .json)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process: JSON {side, method, settings}
    args = p.parse_args()
    if args.one:
        job = json.loads(args.one)
        one(job["side"], job["method"], job["settings"])
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    for name, given, allowed in (("method", methods, METHODS), ("side", sides, SIDES)):
        bad = [x for x in given if x not in allowed]
        if bad or not given:
            p.error(f"--{name}s {','.join(bad) or '(empty)'}: pick from {', '.join(allowed)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import host_facts, load, parse_options

    try:
        ptune_options = parse_options(args.ptune_options, "--ptune-options")
    except ValueError as e:
        p.error(str(e))
    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
                "seed": args.seed, "limit_train": args.limit_train, "limit_eval": args.limit_eval,
                "ptune_options": ptune_options}
    if "ptune" in sides:  # bad ptune options fail now, in one line, before anything trains
        from ptune.errors import ConfigError

        for method in methods:
            try:
                ptune_config(method, {**settings, "lr": LORA_LR if method == "lora" else args.lr}, "unused")
            except ConfigError as e:
                p.error(f"--ptune-options for {method}: {e}")

    facts = host_facts()
    runs: list[dict] = []
    out_md = Path(args.out)
    for method in methods:
        for side in sides:
            job = {"side": side, "method": method,
                   "settings": {**settings, "lr": LORA_LR if method == "lora" else args.lr}}
            load_before, started = load(), time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            record = {"method": method, "side": side, "lr": job["settings"]["lr"], "load_before": load_before,
                      "load_after": load(), "wall_seconds": time.perf_counter() - started}
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                record["failed"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            else:
                record.update(json.loads(line[0][7:]))
            runs.append(record)
            shown = {k: record.get(k) for k in ("samples_per_s", "accuracy", "peak_rss_mb", "precision",
                                                "base_dropout", "load_before", "load_after", "failed")}
            print(method, side, shown, flush=True)
            write(out_md, facts, settings, args, runs)  # after every run: an interrupted benchmark keeps what it has
    print(out_md.read_text())


def write(out_md: Path, facts: dict, settings: dict, args: argparse.Namespace, runs: list[dict]) -> None:
    from speed import describe

    out_md.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/compare_peft.py " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    out_md.with_suffix(".json").write_text(json.dumps({"command": command, "host": facts, "settings": settings,
                                                       "runs": runs}, indent=2))
    sides = list(dict.fromkeys(r["side"] for r in runs))
    by = {(r["method"], r["side"]): r for r in runs}
    n = args.limit_train or 1777

    def cell(r: dict | None, key: str, fmt: str) -> str:
        return "failed" if r is not None and "failed" in r else ("-" if r is None else format(r[key], fmt))

    def ratio(a: dict | None, b: dict | None) -> str:
        if not a or not b or "failed" in a or "failed" in b:
            return "-"
        return f"{a['samples_per_s'] / b['samples_per_s']:.2f}x"

    head = ["method"] + [f"{SIDE_NAMES[x]} samples/s" for x in sides]
    if "ptune" in sides:
        head += [f"ptune / {SIDE_NAMES[x]}" for x in sides if x != "ptune"]
    head += [f"{SIDE_NAMES[x]} val acc" for x in sides] + [f"{SIDE_NAMES[x]} peak RSS MB" for x in sides]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in dict.fromkeys(r["method"] for r in runs):
        row = [method] + [cell(by.get((method, x)), "samples_per_s", ".1f") for x in sides]
        if "ptune" in sides:
            row += [ratio(by.get((method, "ptune")), by.get((method, x))) for x in sides if x != "ptune"]
        row += [cell(by.get((method, x)), "accuracy", ".4f") for x in sides]
        row += [cell(by.get((method, x)), "peak_rss_mb", ".0f") for x in sides]
        lines.append("| " + " | ".join(row) + " |")
    per_run = ["| method | side | precision | base dropout active | train s | wall s | load before (1/5/15 min) | "
               "load after |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "failed" in r:
            per_run.append(f"| {r['method']} | {r['side']} | failed: {r['failed']} | | | | {r['load_before']} | "
                           f"{r['load_after']} |")
            continue
        per_run.append(f"| {r['method']} | {r['side']} | {r['precision']} | {'yes' if r['base_dropout'] else 'no'} | "
                       f"{r['seconds']:.1f} | {r['wall_seconds']:.0f} | {r['load_before']} | {r['load_after']} |")
    tuned = next((r for r in runs if r["side"] == "peft_tuned" and "failed" not in r), None)
    text = [
        "# ptune vs HF PEFT: training speed (issue #15)", "",
        f"Command: `{command}`; raw results: `{out_md.with_suffix('.json').name}` beside this file.", "",
        describe(facts), "",
        f"MiniLM (all-MiniLM-L6-v2), bbc ({n} training articles, {args.limit_eval or 223} validation), max length "
        f"{args.max_length}, batch {args.batch_size}, {args.epochs} epoch(s), seed {args.seed}, lr {args.lr} (LoRA "
        f"{LORA_LR}), 20 virtual tokens, LoRA r 8 on query/value. Both sides see the same text: for prompt tuning and "
        "P-Tuning, whose virtual tokens are input positions, ptune's max length is 128 + 20 (it counts them, PEFT "
        "prepends them). Each cell is its own subprocess; samples/s counts training only; peak RSS is the whole "
        "process.", "",
        "Sides: **PEFT (examples)** as PEFT's examples train (fp32, the base's dropout on); **PEFT tuned**: the frozen "
        "base's hidden and attention dropout off (classifier dropout 0.1 and LoRA's lora_dropout 0.0 kept), bf16 "
        "autocast only where the CPU computes bf16 itself"
        + (f" (here: {tuned['precision']})" if tuned else "") + "; **PEFT tuned + eager attention**: PEFT tuned with "
        "the model loaded with attn_implementation=\"eager\" (faster than SDPA's bf16 backward on a CPU); "
        "**ptune**: `ptune.engine` with `--precision auto`, "
        "base dropout off (prompt methods and LoRA; see each run's \"base dropout active\").", "",
    ]
    if settings["ptune_options"]:
        text += [f"ptune side's extra options: `{json.dumps(settings['ptune_options'])}`.", ""]
    text += lines + ["", "Per run:", ""] + per_run + [
        "", "Load averages are of the whole machine before and after each run: compare seconds only between runs "
        "under similar load."]
    out_md.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
