"""ptune vs HF PEFT on the LLM: Gemma 3 270M, causal-LM training on bbc-headline (issue #29 item 2).

Every (method, side) runs in a fresh subprocess, so its time and peak RSS are its own. Both sides train the
same frozen Gemma 3 270M (the packaged GGUF converted to ``~/.cache/ptune``, loaded in fp32 on a CPU
without BF16 arithmetic, in bf16 autocast where ``bf16_available()``) on the same token rows: the
bbc-headline training articles in split order, ``--batch-size`` x ``--max-length`` (the article body, the
task's hand-written prompt, the headline; loss on the headline only), encoded once by ptune's pipeline and
handed to PEFT as ``input_ids`` / ``attention_mask`` / ``labels``. Same learning rate (the method's ptune
default), constant schedule, AdamW, same seed; ``--warmup-steps`` untimed steps, then ``--steps`` timed.

- ``peft``: PEFT at its best on this machine: ``get_peft_model`` on ``AutoModelForCausalLM``, the base's
  dropout off (Gemma's config has none), bf16 autocast only where the hardware computes bf16 (on this CPU it
  emulates bf16 and autocast is slower, bench/results/precision.md), and whichever attention is faster here
  (``--peft-attention sdpa|eager``; both can be run). PEFT's configs: prompt tuning (20 virtual tokens),
  P-Tuning v2 = PEFT's prefix tuning without projection (20 tokens, every layer), LoRA (r 8, alpha 16, q/v).
- ``ptune``: ptune's Trainer step (``Trainer.train_step``: collation, forward, loss, backward, clipping,
  optimizer), the same method options, P-Tuning v2 in every layer (``layers=all``) as PEFT has it.

The quality check: the loss on the first ``--eval-rows`` validation articles (mean over headline tokens,
each row alone) after the same steps, computed the same way on both sides.

Prompt tuning's rows: ptune encodes them with its virtual tokens (its ``prompt_layout``), the article cut
where it is cut without them; PEFT gets the same rows with the virtual places taken out and prepends its
own prompt. The two sides' random prompts are different draws, and on Gemma the draw alone moves the
first loss by about a nat; ``--same-init`` starts ptune from PEFT's own table (same seed), so what is
left is what the two compute (identical with ``--ptune-options prompt_layout=peft``).

    python bench/compare_peft_gemma.py                                    # 3 methods x 2 sides, ~15 min on 2 cores
    python bench/compare_peft_gemma.py --methods lora --steps 2 --warmup-steps 1 --out /tmp/smoke.json
    python bench/compare_peft_gemma.py --methods prompt_tuning --peft-attention '' --ptune-options init=vocab  # ptune alone
    python bench/compare_peft_gemma.py --methods prompt_tuning,p_tuning_v2 --peft-attention '' --same-init  # PEFT's start

Writes bench/results/compare_peft_gemma.json and .md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peft import split_ptune_options  # noqa: E402
from speed import cpu_name, load, parse_options, step_trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("prompt_tuning", "p_tuning_v2", "lora")
PTUNE_OPTIONS = {"prompt_tuning": {"num_virtual_tokens": 20}, "p_tuning_v2": {"num_virtual_tokens": 20, "layers": "all"},
                 "lora": {"r": 8, "alpha": 16}}
INPUT_PROMPTS = {"prompt_tuning": 20}  # virtual tokens that take places of the sequence on both sides
SOURCE_LENGTH = 224  # bbc-headline's max_source_length: the article and the prompt's text, before the headline


def ptune_rows(method: str, args) -> tuple:
    """The training batches and validation rows as ptune encodes them for ``method`` (its trainer too).

    Input-side virtual tokens come on top of the task's token budget (``max_length`` and bbc-headline's
    224-token ``max_source_length`` grow by them), so the article is cut where it is cut without them: PEFT
    prepends its prompt to whatever rows it is given and never shortens the text for it."""
    P = INPUT_PROMPTS.get(method, 0)
    B, L = args.batch_size, args.max_length + P
    total = B * (args.warmup_steps + args.steps)
    train_opts, method_opts = split_ptune_options(args.ptune_options)  # the ptune side's own (none for PEFT's rows)
    trainer = step_trainer({**dict(model="gemma", task="bbc-headline", method=method,
                                   method_options={**PTUNE_OPTIONS[method], **method_opts},
                                   batch_size=B, max_length=L, max_source_length=SOURCE_LENGTH + P, epochs=1,
                                   seed=args.seed, lr=None, warmup_ratio=0.0,
                                   scheduler="constant", output_dir=tempfile.mkdtemp(prefix="ptune-gemma-cmp-"),
                                   progress=False, log_every=100000, limit_train=total, limit_eval=args.eval_rows,
                                   overwrite=True), **train_opts})
    batches = [list(range(k * B, (k + 1) * B)) for k in range(args.warmup_steps + args.steps)]
    return trainer, batches


def validation_batches(trainer, n: int) -> list[dict]:
    """The run's first ``n`` validation examples (``limit_eval``), one row per batch, as ptune encoded them."""
    from ptune.batching import collate

    part = trainer.tasks.parts[0]
    return [collate([e.encoded], pad_id=trainer.tasks.pad_id, targets=[e.target]) for e in part.val[:n]]


def without_virtual_tokens(batch: dict) -> dict:
    """PEFT's input for ptune's row: the same tokens with the virtual-token places taken out (PEFT prepends
    its own prompt). Every row holds the same number of virtual tokens, so the batch stays rectangular."""
    keep = batch["virtual_index"] < 0
    B = keep.shape[0]
    return {k: batch[k][keep].view(B, -1) for k in ("input_ids", "attention_mask", "labels")}


def peft_initial_table(method: str, seed: int):
    """The prompt table PEFT starts from with this seed: drawn exactly as run_peft draws it (same seed, same
    calls before it), so ``--same-init`` can start ptune from it."""
    import torch
    import transformers
    from peft import get_peft_model

    from ptune.models import resolve_model_path

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path("gemma"), dtype=torch.float32)
    return get_peft_model(base, peft_config(method)).prompt_encoder["default"].embedding.weight.detach().clone()


def mean_token_loss(model, batches: list[dict], keys=None) -> float:
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            inputs = {k: v for k, v in b.items() if keys is None or k in keys}
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**inputs).loss) * n
            count += n
    model.train()
    return total / count


def run_ptune(method: str, args) -> dict:
    import torch

    table = peft_initial_table(method, args.seed) if args.same_init and method != "lora" else None
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    trainer, batches = ptune_rows(method, args)
    load_s = time.perf_counter() - started
    if table is not None:  # ptune's prompt / prefix table has PEFT's layout (prefix_encoder.flat)
        (param,) = [p for p in trainer.inner.parameters() if p.requires_grad]
        with torch.no_grad():
            param.copy_(table.view_as(param))
    val = validation_batches(trainer, args.eval_rows)
    times, losses = [], []
    for k, rows in enumerate(batches):
        t = time.perf_counter()
        losses.append(trainer.train_step([rows]))
        if k >= args.warmup_steps:
            times.append(time.perf_counter() - t)
    shape = list(trainer.make_train_batch(batches[0])["input_ids"].shape)
    return {"side": "ptune", "method": method, "step_s": times, "train_losses": losses, "load_s": load_s,
            "validation_loss": mean_token_loss(trainer.model, val), "batch_shape": shape,
            "precision": trainer.precision, "trainable": sum(p.numel() for p in trainer.inner.parameters() if p.requires_grad)}


def peft_config(method: str):
    import peft

    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
    if method == "p_tuning_v2":  # PEFT's P-Tuning v2: prefix tuning without the reparameterization MLP
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prefix_projection=False)
    return peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def run_peft(method: str, attn: str, args) -> dict:
    import torch
    import transformers
    from peft import get_peft_model

    from ptune.engine.precision import bf16_available
    from ptune.methods import method_entry
    from ptune.models import resolve_model_path

    # the same token rows as the ptune side's (its options, so its prompt layout), virtual places taken out
    trainer, batches = ptune_rows(method, args)
    train_batches = [without_virtual_tokens(trainer.make_train_batch(rows)) for rows in batches]
    val = [without_virtual_tokens(b) for b in validation_batches(trainer, args.eval_rows)]
    del trainer
    torch.manual_seed(args.seed)  # after the rows: the prompt table is drawn as peft_initial_table draws it
    keys = ("input_ids", "attention_mask", "labels")
    started = time.perf_counter()
    base = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path("gemma"), dtype=torch.float32,
                                                             attn_implementation=attn)
    model = get_peft_model(base, peft_config(method))
    load_s = time.perf_counter() - started
    lr = method_entry(method)[0].default_lr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    autocast = bf16_available()
    model.train()
    times, losses = [], []
    for k, b in enumerate(train_batches):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**{x: b[x] for x in keys}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if k >= args.warmup_steps:
            times.append(time.perf_counter() - t)
    return {"side": f"peft_{attn}", "method": method, "step_s": times, "train_losses": losses, "load_s": load_s,
            "validation_loss": mean_token_loss(model, val, keys), "batch_shape": list(train_batches[0]["input_ids"].shape),
            "precision": "bf16" if autocast else "fp32",
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def child(spec: dict) -> None:
    from ptune.engine.loop import peak_rss_mb

    args = argparse.Namespace(**spec["args"])
    if spec["side"] == "ptune":
        result = run_ptune(spec["method"], args)
    else:
        result = run_peft(spec["method"], spec["side"].removeprefix("peft_"), args)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--peft-attention", default="sdpa", help="sdpa, eager, or both: sdpa,eager")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--ptune-options", nargs="*", default=[],
                   help='the ptune side only, as compare_peft.py takes them: JSON objects and/or key=value items, '
                        'TrainConfig fields or method options (lr=3e-3 init=vocab); --peft-attention "" runs it alone')
    p.add_argument("--same-init", action="store_true",
                   help="the ptune side starts from PEFT's initial prompt / prefix table (same seed), so the two "
                        "sides differ only in what they compute, not in the random draw")
    p.add_argument("--out", default=str(RESULTS / "compare_peft_gemma.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    try:
        a.ptune_options = parse_options(a.ptune_options, "--ptune-options")
    except ValueError as e:
        p.error(str(e))
    shared = {k: getattr(a, k) for k in ("batch_size", "max_length", "warmup_steps", "steps", "eval_rows", "seed",
                                         "ptune_options", "same_init")}
    sides = [f"peft_{x.strip()}" for x in a.peft_attention.split(",") if x.strip()] + ["ptune"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = []
    for method in a.methods.split(","):
        for side in sides:
            spec = {"method": method, "side": side, "args": shared}
            before = load()[0]
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                                  env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                result = {"side": side, "method": method, "error": err}
            else:
                result = json.loads(line[len("RESULT "):])
            result["load_before_after"] = [before, load()[0]]
            runs.append(result)
            print(json.dumps(result), flush=True)
    command = "python bench/compare_peft_gemma.py " + shlex.join(sys.argv[1:])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command.strip(), "settings": shared, "cpu": cpu_name(), "runs": runs}, indent=1))
    out.with_suffix(".md").write_text(table(command.strip(), runs, sides))
    print(out.with_suffix(".md").read_text())


def table(command: str, runs: list[dict], sides: list[str]) -> str:
    def mean(x):
        return sum(x) / len(x)

    lines = [f"`{command}`", "",
             "| method | side | s / step (timed steps) | ptune speed-up | validation loss after the steps | train loss per step | "
             "trainable | peak RSS MB | batch shape |", "|---|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = {r["side"]: r for r in runs if r["method"] == method}
        ok = [r for s, r in rows.items() if s != "ptune" and "error" not in r]
        best = min(ok, key=lambda r: mean(r["step_s"])) if ok else None
        for side in sides:
            r = rows.get(side)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {method} | {side} | failed: {r['error'][:160]} | | | | | | |")
                continue
            s = mean(r["step_s"])
            up = f"**{mean(best['step_s']) / s:.2f}x** vs {best['side']}" if side == "ptune" and best else ""
            losses = " / ".join(f"{x:.3f}" if x is not None else "skip" for x in r["train_losses"])
            lines.append(f"| {method} | {side} | {s:.1f} | {up} | {r['validation_loss']:.4f} | {losses} | {r['trainable']:,} | "
                         f"{r['peak_rss_mb']:.0f} | {r['batch_shape']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
