"""Model FLOP utilisation (MFU) of one ptune training step on this CPU (issue #15: speed).

For each (model, method): ptune's own Trainer is built as ``ptune.engine.train`` builds it (TrainConfig ->
``engine.build.build_model`` -> accelerate), and its real ``train_step`` (collation, forward, loss, backward,
clipping, AdamW step) runs on full batches of the built-in bbc task: MiniLM (classification head) at
batch 32 x 128 tokens, Gemma 3 270M at batch 8 x 128 through a verbalizer (its own LM head read at one
position); P-Tuning v2 (20 virtual tokens) and
LoRA (r 8, alpha 16).

- FLOPs/step: ``torch.utils.flop_counter.FlopCounterMode`` over one real step (forward + backward: only
  what autograd runs; a frozen weight gets no weight-gradient matmul). The counter does not know CPU
  SDPA (``_scaled_dot_product_flash_attention_for_cpu`` and its backward count 0 in torch 2.13), so those
  two ops are counted here with torch's own SDPA formulas (the full score matrix, causal masks included).
  Elementwise work (softmax, norms, GELU, AdamW) is not counted, as usual for MFU.
- "useful FLOPs/step": the FLOPs of the full-depth plain step, what a step does with none of ptune's
  work-skipping (the method option ``layers`` dropped so every layer is adapted, ``prune_last_layer`` and
  ``cache_frozen_layers`` off where those TrainConfig options exist; every other option kept), counted the
  same way on the same batch shape in the same process. With ``--method-options layers=top:3`` (or
  ``--train-options``) the counted FLOPs fall and the useful ones do not, so skipped work shows as saved:
  ``MFU (counted) = counted FLOPs / time / roof`` and ``effective MFU = useful FLOPs / time / roof``. Even
  with no options the two differ where ptune's defaults skip work (MiniLM's pruned last layer).
- seconds/step: median of ``--steps`` timed steps (MiniLM 5, Gemma 3) after ``--warmup`` steps (2, 1), each
  on a different batch (the first pass over the data, as in epoch 1; ``--reuse-batches`` times a second pass
  over batches already seen, where a frozen-layer cache hits).
- roof: a ``--roof-size`` square matmul timed in the same process with the same thread count, in fp32 and
  in bf16 (median of 5, measured before and after the steps; the higher is kept). The MFU uses the roof of
  the precision the step computes in: bf16 when the run autocasts to bf16 (``--precision auto`` does on a CPU
  with native bf16 only) or when the base's weights are bf16 (the packaged Gemma folder is bf16; ptune
  loads it in fp32 where the run computes in fp32), fp32 otherwise.

Each (model, method) runs in a fresh subprocess; the load average is recorded around it. Writes
bench/results/mfu.json (raw, with the per-op FLOP breakdown) and bench/results/mfu.md.

    python bench/mfu.py                          # 4 configurations, ~10-15 min on 2 quiet cores (Gemma: ~30-60 s a step)
    python bench/mfu.py --models minilm --method-options layers=top:3 --out bench/results/mfu_top3.md
    python bench/mfu.py --models minilm --methods p_tuning_v2 --batch-size 4 --max-length 32 --steps 2 \\
        --warmup 1 --out /tmp/mfu_smoke.md     # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Gemma answers bbc through a verbalizer (its own LM head read at one position, the "GPT understands, too"
# set-up). Gemma steps take tens of seconds on 2 cores, hence fewer of them
MODELS = {"minilm": {"batch_size": 32, "max_length": 128, "train": {}, "warmup": 2, "steps": 5},
          "gemma": {"batch_size": 8, "max_length": 128, "train": {"head": "verbalizer"}, "warmup": 1, "steps": 3}}
METHOD_DEFAULTS = {"p_tuning_v2": {"num_virtual_tokens": 20, "layers": "all"}, "lora": {"r": 8, "alpha": 16}}
# options that skip work; the full-depth plain step drops / switches them off (where the option exists)
SKIPPING_METHOD_OPTIONS = ("layers",)
PLAIN_TRAIN = {"prune_last_layer": False, "cache_frozen_layers": False}
RESULTS = Path(__file__).resolve().parent / "results"


# ---- FLOP counting -------------------------------------------------------------------------------------------

def cpu_sdpa_mapping() -> dict:
    """FlopCounterMode formulas for CPU SDPA, which torch's registry lacks (it counts it as 0)."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

        def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def counted_step(trainer, rows: list[int]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, per-op FLOPs) of one real training step on ``rows``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_mapping()) as counter:
        trainer.train_step([rows])
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


# ---- the roof ------------------------------------------------------------------------------------------------

def matmul_gflops(n: int, dtype, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return 2 * n ** 3 / statistics.median(times) / 1e9


# ---- one configuration (a child process) ---------------------------------------------------------------------

def make_trainer(job: dict, method_options: dict, train_options: dict, out: str):
    from speed import step_trainer

    return step_trainer({**dict(model=job["model"], task="bbc", method=job["method"],
                                method_options={**METHOD_DEFAULTS[job["method"]], **method_options},
                                batch_size=job["batch_size"], max_length=job["max_length"], epochs=1,
                                seed=job["seed"], output_dir=out, progress=False, log_every=100000,
                                limit_train=job["limit_train"], limit_eval=1), **train_options})


def full_batches(trainer, batch_size: int, count: int) -> list[list[int]]:
    """``count`` disjoint batches of the longest training examples (full length where the data allows)."""
    order = sorted(range(len(trainer.train_ex)), key=lambda i: -len(trainer.train_ex[i].encoded.input_ids))
    batches = [order[k * batch_size:(k + 1) * batch_size] for k in range(count)]
    if len(batches[-1]) < batch_size:
        raise SystemExit(f"need {count} batches of {batch_size}; raise --limit-train")
    return batches


def compute_dtype(trainer) -> str:
    import torch

    if trainer.precision == "bf16":
        return "bf16"
    dtypes = {p.dtype for p in trainer.inner.base.parameters()}
    return "bf16" if torch.bfloat16 in dtypes else "fp32"


def run_one(job: dict) -> dict:
    import torch

    from ptune.engine import TrainConfig

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    roof_before = {"fp32": matmul_gflops(job["roof_size"], torch.float32),
                   "bf16": matmul_gflops(job["roof_size"], torch.bfloat16)}
    B, W, N = job["batch_size"], job["warmup"], job["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(job, job["method_options"], job["train_options"], os.path.join(tmp, "run"))
        if job["reuse_batches"]:  # a second pass: warm-up goes over the timed batches once, the count reuses one
            timed = full_batches(trainer, B, N)
            warm = (timed * (W // N + 1))[:max(W, N)]
            count_rows = timed[0]
        else:  # the first pass: every step sees new rows
            batches = full_batches(trainer, B, W + N + 1)
            warm, count_rows, timed = batches[:W], batches[W], batches[W + 1:]
        for rows in warm:
            trainer.train_step([rows])
        flops, per_op = counted_step(trainer, count_rows)
        times = []
        for rows in timed:
            started = time.perf_counter()
            trainer.train_step([rows])
            times.append(time.perf_counter() - started)
        batch = trainer.make_train_batch(count_rows)
        shape = list(batch["input_ids"].shape)
        real_tokens = int(batch["attention_mask"].sum())
        dtype = compute_dtype(trainer)
        frozen = getattr(trainer.inner, "frozen", None)
        skipped = frozen.describe() if frozen is not None else ""
        trainable, total = trainer.inner.trainable_parameters()
        precision = trainer.precision
        trainer.directory.close()
        del trainer
        gc.collect()
        # the useful work: the full-depth plain step on the same batch shape
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        plain_method = {k: v for k, v in job["method_options"].items() if k not in SKIPPING_METHOD_OPTIONS}
        if "layers" in job["method_options"]:
            plain_method["layers"] = "all"  # every layer (P-Tuning v2's own default is the upper half)
        plain_train = {**job["train_options"], **{k: v for k, v in PLAIN_TRAIN.items() if k in fields}}
        if plain_method == job["method_options"] and plain_train == job["train_options"]:
            useful, useful_per_op = flops, per_op
        else:
            plain = make_trainer(job, plain_method, plain_train, os.path.join(tmp, "plain"))
            useful, useful_per_op = counted_step(plain, full_batches(plain, B, 1)[0])
            plain.directory.close()
            del plain
            gc.collect()
    roof_after = {"fp32": matmul_gflops(job["roof_size"], torch.float32),
                  "bf16": matmul_gflops(job["roof_size"], torch.bfloat16)}
    roof = {k: max(roof_before[k], roof_after[k]) for k in roof_before}
    seconds = statistics.median(times)
    import resource

    return {"flops": flops, "useful_flops": useful, "seconds_per_step": seconds, "step_times": times,
            "achieved_gflops": flops / seconds / 1e9, "effective_gflops": useful / seconds / 1e9,
            "compute_dtype": dtype, "precision": precision, "roof_gflops": roof[dtype],
            "roof_before": roof_before, "roof_after": roof_after,
            "mfu": flops / seconds / 1e9 / roof[dtype], "effective_mfu": useful / seconds / 1e9 / roof[dtype],
            "mfu_vs_fp32_roof": flops / seconds / 1e9 / roof["fp32"],
            "batch_shape": shape, "real_tokens": real_tokens, "skipped_work": skipped,
            "trainable_parameters": trainable, "total_parameters": total, "per_op_flops": per_op,
            "useful_per_op_flops": useful_per_op, "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---- the driver ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--methods", default=",".join(METHOD_DEFAULTS), help="comma-separated: p_tuning_v2, lora")
    ap.add_argument("--batch-size", type=int, default=0, help="0: each model's default (MiniLM 32, Gemma 8)")
    ap.add_argument("--max-length", type=int, default=0, help="0: 128")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: MiniLM 2, Gemma 1)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps, the median is reported (default: MiniLM 5, Gemma 3)")
    ap.add_argument("--reuse-batches", action="store_true", help="time a second pass over batches already seen")
    ap.add_argument("--roof-size", type=int, default=2048, help="side of the square matmul that sets the roof")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--method-options", action="extend", nargs="+", default=[], metavar="JSON|KEY=VALUE",
                    help="method options for the measured step, e.g. layers=top:3")
    ap.add_argument("--train-options", action="extend", nargs="+", default=[], metavar="JSON|KEY=VALUE",
                    help="TrainConfig options for the measured step, e.g. cache_frozen_layers=false")
    ap.add_argument("--out", default=str(RESULTS / "mfu.md"), help="Markdown; the raw JSON goes beside it")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import host_facts, load, parse_options

    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    for flag, given, allowed in (("--models", models, MODELS), ("--methods", methods, METHOD_DEFAULTS)):
        bad = [x for x in given if x not in allowed]
        if bad or not given:
            ap.error(f"{flag} {','.join(bad) or '(empty)'}: pick from {', '.join(allowed)}")
    try:
        method_options = parse_options(args.method_options, "--method-options")
        train_options = parse_options(args.train_options, "--train-options")
    except ValueError as e:
        ap.error(str(e))
    from ptune.engine import TrainConfig
    from ptune.errors import ConfigError

    jobs = []
    for model in models:
        for method in methods:
            size = MODELS[model]
            B, T = args.batch_size or size["batch_size"], args.max_length or size["max_length"]
            W = size["warmup"] if args.warmup is None else args.warmup
            N = size["steps"] if args.steps is None else args.steps
            if N < 1 or W < 0:
                ap.error("--steps must be at least 1 and --warmup at least 0")
            job = {"model": model, "method": method, "batch_size": B, "max_length": T, "warmup": W,
                   "steps": N, "reuse_batches": args.reuse_batches, "roof_size": args.roof_size,
                   "threads": args.threads, "seed": args.seed, "method_options": method_options,
                   "train_options": {**size["train"], **train_options},
                   "limit_train": min(1777, B * (W + N + 1) + 64)}
            try:  # bad options fail now, in one line
                TrainConfig.from_dict({**dict(model=model, method=method,
                                              method_options={**METHOD_DEFAULTS[method], **method_options}),
                                       **job["train_options"]})
            except ConfigError as e:
                ap.error(f"{model} {method}: {e}")
            jobs.append(job)
    facts = host_facts()
    out_md = Path(args.out)
    rows = []
    for job in jobs:
        before, started = load(), time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        row = {**{k: job[k] for k in ("model", "method", "batch_size", "max_length")}, "load_before": before,
               "load_after": load(), "wall_seconds": time.perf_counter() - started}
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if line:
            row.update(json.loads(line[0][7:]))
        else:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            row["failed"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append(row)
        print(job["model"], job["method"], {k: row.get(k) for k in ("flops", "useful_flops", "seconds_per_step",
                                                                    "mfu", "effective_mfu", "failed")}, flush=True)
        write(out_md, facts, args, jobs, rows)
    print(out_md.read_text())


def write(out_md: Path, facts: dict, args: argparse.Namespace, jobs: list[dict], rows: list[dict]) -> None:
    from speed import describe

    out_md.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/mfu.py " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    out_md.with_suffix(".json").write_text(json.dumps({"command": command, "host": facts, "jobs": jobs,
                                                       "rows": rows}, indent=2))
    table = ["| model | method | batch x length | compute dtype | FLOPs/step counted (G) | useful FLOPs/step, "
             "full-depth plain (G) | s/step | achieved GFLOP/s | roof GFLOP/s | MFU (counted) | effective MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            table.append(f"| {r['model']} | {r['method']} | {r['batch_size']} x {r['max_length']} | failed: "
                         f"{r['failed']} | | | | | | | |")
            continue
        table.append(f"| {r['model']} | {r['method']} | {r['batch_shape'][0]} x {r['batch_shape'][1]} | "
                     f"{r['compute_dtype']} | {r['flops'] / 1e9:.1f} | {r['useful_flops'] / 1e9:.1f} | "
                     f"{r['seconds_per_step']:.3f} | {r['achieved_gflops']:.1f} | {r['roof_gflops']:.1f} | "
                     f"{100 * r['mfu']:.1f}% | {100 * r['effective_mfu']:.1f}% |")
    extra = ["| model | method | options (method; train) | skipped work | roof fp32 / bf16 GFLOP/s (before; after) | "
             "load before | load after |", "|---|---|---|---|---|---|---|"]
    for r, j in zip(rows, jobs):
        if "failed" in r:
            continue
        rb, ra = r["roof_before"], r["roof_after"]
        options = f"{json.dumps(j['method_options'])}; {json.dumps(j['train_options'])}"
        extra.append(f"| {r['model']} | {r['method']} | {options} | {r['skipped_work'] or 'none'} | {rb['fp32']:.0f} / "
                     f"{rb['bf16']:.0f}; {ra['fp32']:.0f} / {ra['bf16']:.0f} | {r['load_before']} | {r['load_after']} |")
    job = jobs[0]
    steps = ", ".join(sorted({f"{j['model']} median of {j['steps']} steps after {j['warmup']} warm-up" for j in jobs}))
    text = ["# Model FLOP utilisation of one ptune training step (issue #15)", "",
            f"Command: `{command}`; raw results (with per-op FLOPs): `{out_md.with_suffix('.json').name}` beside this "
            "file.", "", describe(facts), "",
            f"bbc, real training steps of ptune's Trainer (forward, backward, clipping, AdamW); {steps}, "
            + ("a second pass over batches already seen" if job["reuse_batches"] else "each on new rows")
            + f". Roof: a {job['roof_size']}x{job['roof_size']} matmul in the step's compute dtype, same process and "
            "threads. FLOPs from FlopCounterMode (matmuls and attention; CPU SDPA added with torch's formulas). "
            "Useful FLOPs: the full-depth plain step (every layer adapted, no pruned last layer, no layer cache); "
            "effective MFU = useful FLOPs / time / roof.", ""]
    text += table + ["", "Per run:", ""] + extra + ["", "Load averages are of the whole machine before and after each "
                                                      "run: compare times only under similar load."]
    out_md.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
