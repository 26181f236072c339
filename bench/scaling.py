"""How ptune's training speed and memory scale with max length and threads (issue #15: speed).

MiniLM + the built-in bbc task, P-Tuning v2 (20 virtual tokens) and LoRA (r 8, alpha 16), batch 16:

- length sweep: max length 64 / 128 / 256 / 512 at torch's default thread count;
- thread sweep: 1 vs 2 threads at max length 128 (``OMP_NUM_THREADS`` in the child's environment and
  ``torch.set_num_threads`` in the child).

Each configuration is a fresh subprocess (its peak RSS is its own) that builds ptune's own Trainer
(``TrainConfig`` -> the engine, exactly as ``ptune.engine.train`` builds it) and runs its real
``train_step`` (collation, forward, backward, clipping, AdamW) on the first ``--warmup`` + ``--steps``
batches of the training order ptune itself uses for epoch 1 (length-grouped, seeded; all 1,777 training
articles encoded), timing the last ``--steps``. Reported: samples/s and tokens/s over the timed steps
(tokens: real ones, without padding; padded tokens/s too), seconds per step, peak RSS of the whole process
(``ru_maxrss``, model loading included) and peak RSS during the timed steps (sampled every 5 ms), and the
load average before/after each run.

Writes bench/results/scaling.json (raw, per-step times) and bench/results/scaling.md.

    python bench/scaling.py                            # 12 configurations, ~10 min on 2 quiet cores
    python bench/scaling.py --methods lora --lengths 128,256 --threads 1,2
    python bench/scaling.py --methods p_tuning_v2 --lengths 64 --threads '' --steps 2 --warmup 1 \\
        --out /tmp/scaling_smoke.md                    # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METHODS = {"p_tuning_v2": {"num_virtual_tokens": 20, "layers": "all"}, "lora": {"r": 8, "alpha": 16}}
RESULTS = Path(__file__).resolve().parent / "results"


class RssSampler:
    """Peak resident memory of this process while running (every 5 ms), apart from what loading left."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.start_mb = self.peak_mb = self._proc.memory_info().rss / 2**20
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.005):
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak_mb


def run_one(job: dict) -> dict:
    import torch

    from ptune.batching import length_grouped_order
    from speed import step_trainer

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = step_trainer(dict(model="minilm", task="bbc", method=job["method"],
                                    method_options=METHODS[job["method"]], batch_size=job["batch_size"],
                                    max_length=job["max_length"], epochs=1, seed=job["seed"],
                                    output_dir=os.path.join(tmp, "run"), progress=False, log_every=100000,
                                    limit_eval=1, **job["train_options"]))
        try:
            pool = trainer.epoch_pool(0)  # epoch 1's batches, in the order the training loop takes them
            order = length_grouped_order([trainer.lengths[i] for i in pool], job["batch_size"], trainer.cfg.seed)
            batches = [[pool[j] for j in b] for b in order][:job["warmup"] + job["steps"]]
            if len(batches) < job["warmup"] + job["steps"]:
                raise SystemExit("not enough training batches for --warmup + --steps")
            for rows in batches[:job["warmup"]]:
                trainer.train_step([rows])
            sampler = RssSampler()
            times, real, padded, rows_done = [], 0, 0, 0
            for rows in batches[job["warmup"]:]:
                started = time.perf_counter()
                trainer.train_step([rows])
                times.append(time.perf_counter() - started)
                mask = trainer.make_train_batch(rows)["attention_mask"]
                real, padded, rows_done = real + int(mask.sum()), padded + mask.numel(), rows_done + len(rows)
            steps_peak = sampler.stop()
            precision = trainer.precision
        finally:
            trainer.directory.close()
    seconds = sum(times)
    return {"seconds": seconds, "step_times": times, "seconds_per_step": seconds / len(times),
            "samples_per_s": rows_done / seconds, "tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
            "real_tokens": real, "padded_tokens": padded, "rows": rows_done, "precision": precision,
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "rss_before_steps_mb": sampler.start_mb, "peak_rss_steps_mb": steps_peak,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--lengths", default="64,128,256,512", help="max lengths of the length sweep ('' = none)")
    ap.add_argument("--threads", default="1,2", help="thread counts of the thread sweep ('' = none)")
    ap.add_argument("--thread-length", type=int, default=128, help="max length of the thread sweep")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--train-options", action="extend", nargs="+", default=[], metavar="JSON|KEY=VALUE",
                    help="extra TrainConfig options for every run, e.g. precision=fp32")
    ap.add_argument("--out", default=str(RESULTS / "scaling.md"), help="Markdown; the raw JSON goes beside it")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import host_facts, load, parse_options

    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        ap.error(f"--methods {','.join(bad) or '(empty)'}: pick from {', '.join(METHODS)}")
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        threads = [int(x) for x in args.threads.split(",") if x.strip()]
        train_options = parse_options(args.train_options, "--train-options")
    except ValueError as e:
        ap.error(f"--lengths / --threads take comma-separated whole numbers; {e}")
    if any(x < 1 for x in lengths + threads) or not (lengths or threads) or args.steps < 1 or args.warmup < 0:
        ap.error("lengths and threads must be positive (and at least one of them given); --steps >= 1, --warmup >= 0")
    from ptune.engine import TrainConfig
    from ptune.errors import ConfigError

    try:
        for method in methods:
            TrainConfig.from_dict({"method": method, "method_options": METHODS[method], **train_options})
    except ConfigError as e:
        ap.error(f"--train-options: {e}")
    base = {"batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "seed": args.seed,
            "train_options": train_options}
    jobs = [{**base, "sweep": "length", "method": m, "max_length": L, "threads": 0} for m in methods for L in lengths]
    jobs += [{**base, "sweep": "threads", "method": m, "max_length": args.thread_length, "threads": n}
             for m in methods for n in threads]
    facts = host_facts()
    out_md = Path(args.out)
    rows = []
    for job in jobs:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if job["threads"]:
            env["OMP_NUM_THREADS"] = str(job["threads"])
        before, started = load(), time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True,
                              env=env)
        row = {**{k: job[k] for k in ("sweep", "method", "max_length", "batch_size")}, "threads_asked": job["threads"],
               "load_before": before, "load_after": load(), "wall_seconds": time.perf_counter() - started}
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if line:
            row.update(json.loads(line[0][7:]))
        else:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            row["failed"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append(row)
        print(job["sweep"], job["method"], job["max_length"], job["threads"] or "default",
              {k: row.get(k) for k in ("samples_per_s", "tokens_per_s", "peak_rss_mb", "failed")}, flush=True)
        write(out_md, facts, args, rows, train_options)
    print(out_md.read_text())


def write(out_md: Path, facts: dict, args: argparse.Namespace, rows: list[dict], train_options: dict) -> None:
    from speed import describe

    out_md.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/scaling.py " + " ".join(a if a and " " not in a else repr(a) for a in sys.argv[1:])
    out_md.with_suffix(".json").write_text(json.dumps({"command": command, "host": facts,
                                                       "train_options": train_options, "rows": rows}, indent=2))
    table = ["| sweep | method | max length | threads | samples/s | tokens/s (real) | tokens/s (padded) | s/step | "
             "peak RSS MB (process) | peak RSS MB (steps) | load before | load after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            table.append(f"| {r['sweep']} | {r['method']} | {r['max_length']} | {r['threads_asked'] or 'default'} | "
                         f"failed: {r['failed']} | | | | | | | |")
            continue
        table.append(f"| {r['sweep']} | {r['method']} | {r['max_length']} | {r['threads']} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['padded_tokens_per_s']:.0f} | {r['seconds_per_step']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_steps_mb']:.0f} | {r['load_before']} | {r['load_after']} |")
    extra = f" Extra TrainConfig options: `{json.dumps(train_options)}`." if train_options else ""
    text = ["# Training-time scaling: max length and threads (issue #15)", "",
            f"Command: `{command}`; raw results (per-step times): `{out_md.with_suffix('.json').name}` beside this "
            "file.", "", describe(facts), "",
            f"MiniLM + bbc, batch {args.batch_size}, P-Tuning v2 (20 virtual tokens) / LoRA (r 8); ptune's Trainer "
            f"and its real training step on epoch 1's first batches (length-grouped, seed {args.seed}): {args.warmup} "
            f"warm-up steps, then {args.steps} timed. Tokens/s counts real tokens (padded: with the padding). Peak RSS "
            "(process): the whole child, model loading included; (steps): sampled during the timed steps. Each row is "
            "its own subprocess; the thread sweep sets OMP_NUM_THREADS and torch.set_num_threads in the child."
            + extra, ""] + table + [
            "", "Load averages are of the whole machine before and after each run: compare rows only under similar "
            "load."]
    out_md.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
