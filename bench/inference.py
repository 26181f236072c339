"""Inference throughput: ptune's Run.predict / evaluate against a plain transformers pipeline (issue #15: speed).

On the packaged MiniLM and bbc, in one process, each path timed ``--reps`` times round-robin (so a change in
the machine's load hits every path alike; the median is reported), rows/s end to end (tokenization,
forward, decoding), at the run's max length (128) and eval batch size (64) for every path:

- ``ptune predict``: ``Run(run_dir).predict(texts)`` on bbc's validation + test articles (448; every one is
  longer than 128 tokens, so batches carry no padding and their order does not matter: ``--vary-lengths``
  cuts each to a seeded random 8-120 words to measure the case where it does);
- ``ptune evaluate``: ``Run.evaluate("validation")`` (223 articles, metrics included);
- ``ptune predict + inference_mode`` and ``ptune predict + pruned last layer``: the same call with an outer
  ``torch.inference_mode()``, and with ``ptune.frozen.FrozenWork(prune_last=True, cache=False)`` attached to
  the Run's model (what the training engine's evaluation uses; ``Run`` does not attach it): probes of two
  possible changes, measured from outside without changing engine code;
- LoRA only: ``merged``: ``adapter.merge()`` (update added into the weights, wrappers kept) and
  ``merge_and_unload``: the wrappers replaced by the plain layers (``ptune.methods.lora.merge_and_unload``),
  with a check that the predictions agree with the unmerged model's;
- ``transformers pipeline``: ``pipeline("text-classification")`` over ``BertForSequenceClassification`` built
  from the same MiniLM with a random 5-way head (throughput is what is measured), ``truncation=True``, same
  max length and batch size; and ``transformers forward``: a plain batched loop (tokenizer + model under
  ``torch.inference_mode``) in input order and in length order, the pipeline without its per-item overhead.

What ptune's inference path does is recorded as measured, not read from the code: a forward pre-hook on
the Run's model notes, per batch, whether gradients were enabled, whether inference mode was on, and the
padded length, so the report says whether batches come in length order and how much padding they carry.

The runs: ``--run DIR`` (repeatable; a finished ptune run directory, its method read from the run), or, by
default, a P-Tuning v2 and a LoRA run trained here for ``--train-steps`` steps (accuracy is not the point).

Writes bench/results/inference.json (raw) and bench/results/inference.md.

    python bench/inference.py                     # two quick runs + 13 timed paths x 3 reps, ~15 min on 2 quiet cores
    python bench/inference.py --vary-lengths --out bench/results/inference_varied.md   # short rows, ~6 min
    python bench/inference.py --run runs/five/lora --reps 5
    python bench/inference.py --methods lora --rows 64 --eval-rows 32 --reps 1 --train-steps 1 \\
        --out /tmp/inference_smoke.md             # smoke test, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import describe, host_facts, load  # noqa: E402

METHODS = {"p_tuning_v2": {"num_virtual_tokens": 20, "layers": "all"}, "lora": {"r": 8, "alpha": 16}}
RESULTS = Path(__file__).resolve().parent / "results"


def train_quick(method: str, out: Path, steps: int, seed: int) -> Path:
    from ptune.engine import TrainConfig, train

    train(TrainConfig(model="minilm", task="bbc", method=method, method_options=METHODS[method], max_steps=steps,
                      batch_size=16, limit_eval=16, seed=seed, output_dir=str(out), progress=False))
    return out


def watch(model: torch.nn.Module) -> tuple[list[dict], Any]:
    """A pre-hook noting, per forward call: grad mode, inference mode, batch shape and real tokens."""
    calls: list[dict] = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        calls.append({"grad_enabled": torch.is_grad_enabled(), "inference_mode": torch.is_inference_mode_enabled(),
                      "shape": list(ids.shape), "real_tokens": int(mask.sum()) if mask is not None else None})

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def inference_path_facts(run, texts: list[str]) -> dict:
    calls, handle = watch(run.model)
    run.predict(texts)
    handle.remove()
    lengths = [c["shape"][1] for c in calls]
    padded = sum(c["shape"][0] * c["shape"][1] for c in calls)
    real = sum(c["real_tokens"] or 0 for c in calls)
    return {"batches": len(calls), "batch_lengths": lengths,
            "length_sorted": lengths == sorted(lengths) or lengths == sorted(lengths, reverse=True),
            "grad_enabled": sorted({c["grad_enabled"] for c in calls}),
            "inference_mode": sorted({c["inference_mode"] for c in calls}),
            "padding_share": 1 - real / padded if padded else 0.0,
            "autocast": "bf16" if run.autocast is not None else "none",
            "frozen_work": getattr(run.model, "frozen", None) is not None}


def transformers_paths(path: str, num_labels: int, texts: list[str], batch_size: int,
                       max_length: int) -> dict[str, Callable[[], Any]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")

    def forward(order: list[int]) -> list[int]:
        out = [0] * len(texts)
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                enc = tok([texts[j] for j in idx], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
                for j, label in zip(idx, model(**enc).logits.argmax(-1).tolist()):
                    out[j] = label
        return out

    lengths = [len(t) for t in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    sorted_order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return {"transformers pipeline": lambda: pipe(texts, batch_size=batch_size, truncation=True, max_length=max_length),
            "transformers forward (input order)": lambda: forward(list(range(len(texts)))),
            "transformers forward (length order)": lambda: forward(sorted_order)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="a finished ptune run directory (repeatable)")
    ap.add_argument("--methods", default=",".join(METHODS), help="runs trained here when no --run is given")
    ap.add_argument("--train-steps", type=int, default=10, help="steps of each run trained here")
    ap.add_argument("--rows", type=int, default=0, help="predict on the first N validation+test articles (0 = 448)")
    ap.add_argument("--eval-rows", type=int, default=0, help="evaluate on the first N validation articles (0 = 223)")
    ap.add_argument("--vary-lengths", action="store_true",
                    help="cut each article to a seeded random 8-120 words, so rows differ in length (padding, order)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of every path (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", default=str(RESULTS / "inference.md"), help="Markdown; the raw JSON goes beside it")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if not args.run and (not methods or any(m not in METHODS for m in methods)):
        ap.error(f"--methods {args.methods!r}: pick from {', '.join(METHODS)}")
    if args.reps < 1 or args.train_steps < 1:
        ap.error("--reps and --train-steps must be at least 1")
    for r in args.run:
        if not (Path(r) / "config.json").is_file():
            ap.error(f"--run {r}: not a ptune run directory (no config.json); pass the --output-dir of a `ptune train`")
    if args.threads:
        torch.set_num_threads(args.threads)

    import ptune
    from ptune.data import load_builtin
    from ptune.engine import Run
    from ptune.methods.lora import merge_and_unload

    facts = host_facts()
    load_start = load()
    task, splits = load_builtin("bbc", seed=args.seed)
    texts = [r["text"] for r in splits["validation"] + splits["test"]][:args.rows or None]
    if args.vary_lengths:  # bbc articles all pass 128 tokens: cut them so that padding and batch order matter
        rng = random.Random(args.seed)
        texts = [" ".join(t.split()[:rng.randint(8, 120)]) for t in texts]
    tmp = tempfile.TemporaryDirectory()
    trained: dict[str, float] = {}
    run_dirs = [Path(r) for r in args.run]
    if not run_dirs:
        for m in methods:
            started = time.perf_counter()
            run_dirs.append(train_quick(m, Path(tmp.name) / m, args.train_steps, args.seed))
            trained[m] = time.perf_counter() - started

    paths: dict[str, tuple[Callable[[], Any], int]] = {}
    facts_by_run: dict[str, dict] = {}
    agreement: dict[str, dict] = {}
    batch_size = max_length = None
    for run_dir in run_dirs:
        run = Run(run_dir)
        method = run.model.method
        batch_size, max_length = run.config.eval_batch_size, run.model.spec.max_length or 128
        n_eval = len(run.splits["validation"][:args.eval_rows or None])
        facts_by_run[method] = {"run": str(run_dir), **inference_path_facts(run, texts[:3 * batch_size]),
                                "eval_batch_size": batch_size, "max_length": max_length}
        paths[f"{method}: ptune predict"] = (lambda run=run: run.predict(texts), len(texts))
        paths[f"{method}: ptune evaluate"] = (lambda run=run: run.evaluate("validation", limit=args.eval_rows), n_eval)

        def in_inference_mode(run=run):
            with torch.inference_mode():
                return run.predict(texts)

        paths[f"{method}: ptune predict + inference_mode"] = (in_inference_mode, len(texts))
        try:
            from ptune.frozen import FrozenWork

            pruned = Run(run_dir)
            pruned.model.frozen = FrozenWork(pruned.model, cache=False, prune_last=True)
            if pruned.model.frozen.describe():
                paths[f"{method}: ptune predict + pruned last layer"] = (lambda run=pruned: run.predict(texts),
                                                                         len(texts))
        except ImportError:
            pass
        if method == "lora":
            merged = Run(run_dir)
            merged.model.adapter.merge()
            unloaded = Run(run_dir)
            merge_and_unload(unloaded.model)
            paths[f"{method}: ptune predict, merged (wrappers kept)"] = (lambda run=merged: run.predict(texts), len(texts))
            paths[f"{method}: ptune predict, merge_and_unload"] = (lambda run=unloaded: run.predict(texts), len(texts))
            sample = texts[:2 * batch_size]
            want = run.predict(sample)
            for name, other in (("merged", merged), ("merge_and_unload", unloaded)):
                got = other.predict(sample)
                agreement[name] = {
                    "rows": len(sample), "label_disagreements": sum(a["label"] != b["label"] for a, b in zip(want, got)),
                    "max_probability_diff": max(abs(a["probabilities"][k] - b["probabilities"][k])
                                                for a, b in zip(want, got) for k in a["probabilities"])}
    for name, fn in transformers_paths(ptune.models.resolve_model_path("minilm"), len(task.labels), texts,
                                       batch_size, max_length).items():
        paths[name] = (fn, len(texts))

    for fn, _ in paths.values():  # warm-up: first calls allocate and pick kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    loads = []
    for _ in range(args.reps):
        for name, (fn, _) in paths.items():
            before = load()
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
            loads.append([name, before, load()])
    rows = [{"path": name, "rows": n, "seconds": statistics.median(times[name]), "times": times[name],
             "rows_per_s": n / statistics.median(times[name])} for name, (_, n) in paths.items()]
    result = {"command": "python bench/inference.py " + " ".join(sys.argv[1:]), "host": facts,
              "load_start": load_start, "load_end": load(), "loads": loads, "training_seconds": trained,
              "batch_size": batch_size, "max_length": max_length, "predict_rows": len(texts), "reps": args.reps,
              "vary_lengths": args.vary_lengths,
              "inference_path": facts_by_run, "merge_agreement": agreement, "rows": rows}
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write(out_md, result)
    print(out_md.read_text())
    tmp.cleanup()


def write(out_md: Path, r: dict) -> None:
    pipeline_rate = next((x["rows_per_s"] for x in r["rows"] if x["path"] == "transformers pipeline"), None)
    table = ["| path | rows | s (median) | rows/s | vs transformers pipeline |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        ratio = f"{x['rows_per_s'] / pipeline_rate:.2f}x" if pipeline_rate else "-"
        table.append(f"| {x['path']} | {x['rows']} | {x['seconds']:.2f} | {x['rows_per_s']:.1f} | {ratio} |")
    facts = ["| run | grad enabled | inference mode | batches in length order | padding share | autocast | "
             "frozen work attached |", "|---|---|---|---|---|---|---|"]
    for method, f in r["inference_path"].items():
        facts.append(f"| {method} | {f['grad_enabled']} | {f['inference_mode']} | {f['length_sorted']} "
                     f"({f['batch_lengths']}) | {f['padding_share']:.1%} | {f['autocast']} | {f['frozen_work']} |")
    agree = [f"- LoRA {name} vs unmerged on {a['rows']} rows: {a['label_disagreements']} label disagreements, max "
             f"probability difference {a['max_probability_diff']:.2e}" for name, a in r["merge_agreement"].items()]
    text = ["# Inference throughput: ptune vs a transformers pipeline (issue #15)", "",
            f"Command: `{r['command']}`; raw results: `{out_md.with_suffix('.json').name}` beside this file.", "",
            describe(r["host"]), "",
            f"MiniLM + bbc, {r['predict_rows']} articles to predict"
            + (" (each cut to a seeded random 8-120 words)" if r["vary_lengths"] else " (all longer than the max length)")
            + f", max length {r['max_length']}, batch "
            f"{r['batch_size']} for every path; median of {r['reps']} round-robin repetitions after one warm-up call "
            "each. The transformers model has a random head (throughput only). Load average at the start "
            f"{r['load_start']}, at the end {r['load_end']} (per call in the JSON).", ""] + table + [
            "", "What ptune's inference path did (recorded by a forward pre-hook during `Run.predict`):", ""] + facts
    if agree:
        text += ["", "Merged LoRA agrees with the unmerged model:", ""] + agree
    out_md.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
