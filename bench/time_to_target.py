"""Time to quality with `ptune train`'s defaults (issue #29 item 3): seconds of training until the validation
accuracy on bbc first reaches a target (default 0.95), per variant and seed, each run a fresh
``python -m ptune.cli train`` process on the packaged MiniLM.

Every run is plain ``ptune train`` plus the variant's flags plus ``--eval-every N`` (so the curve is seen
often enough to time it); the time is the run's own ``step_seconds`` on the validation row that first
reached the target: seconds inside optimizer steps, evaluations, checkpoints and start-up left out.
Evaluating more often does not change the training itself (same batches, same schedule), only which
evaluation keeps ``best/``. ``--until-target`` stops a run once it reached the target (for exploring:
no final accuracy then); without it every run goes to its end and its best validation and test accuracy
are recorded too.

    python bench/time_to_target.py --variants "old=--layers all --batch-size 32" "new=" --seeds 13,21,42
    python bench/time_to_target.py --variants "bs8=--batch-size 8" --seeds 13 --until-target --eval-every 4

Writes raw numbers to bench/results/time_to_target.json (``--out``) and a table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import host_facts, load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(flags: list[str], seed: int, eval_every: int, target: float, until_target: bool,
            out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "ptune.cli", "train", "--output-dir", str(out_dir), "--seed", str(seed),
           "--eval-every", str(eval_every), "--no-progress", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before, started = load()[0], time.perf_counter()
    log = open(out_dir.parent / f"{out_dir.name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    metrics, reached, curve = out_dir / "metrics.jsonl", None, []
    while proc.poll() is None or metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
        curve = [(r["step"], r["accuracy"], r.get("step_seconds")) for r in rows if r.get("split") == "validation"]
        reached = next((c for c in curve if c[1] >= target), None)
        if proc.poll() is not None:
            break
        if reached and until_target:
            proc.terminate()
            proc.wait()
            break
        time.sleep(0.5)
    rc = proc.wait()
    log.close()
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {
        "seed": seed, "exit_code": rc, "wall_s": round(time.perf_counter() - started, 1),
        "load_before_after": [before, load()[0]],
        "reached_step": reached[0] if reached else None,
        "seconds_to_target": reached[2] if reached else None,
        "curve": curve,
        "best_validation_accuracy": summary.get("best_validation_accuracy"),
        "test_accuracy": (summary.get("test") or {}).get("accuracy"),
        "steps": summary.get("steps"), "step_seconds": summary.get("step_seconds"),
        "peak_rss_mb": summary.get("peak_rss_mb"), "precision": summary.get("precision"),
    }


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", required=True, metavar="NAME=FLAGS",
                    help="each: a name, '=', then ptune train flags (empty: the defaults)")
    ap.add_argument("--seeds", default="13,21,42")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--until-target", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "time_to_target.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="ttt-") as tmp:
        for spec in args.variants:
            name, _, flags = spec.partition("=")
            for seed in seeds:
                out_dir = Path(tmp) / f"{name}-{seed}"
                r = run_one(shlex.split(flags), seed, args.eval_every, args.target, args.until_target, out_dir)
                r.update(variant=name, flags=flags)
                print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
                results.append(r)
    rows = []
    for spec in args.variants:
        name = spec.partition("=")[0]
        rs = [r for r in results if r["variant"] == name]
        rows.append({"variant": name, "flags": rs[0]["flags"], "seeds": len(rs),
                     "reached": sum(r["seconds_to_target"] is not None for r in rs),
                     "seconds_to_target_mean": mean([r["seconds_to_target"] for r in rs]),
                     "seconds_to_target_max": max((r["seconds_to_target"] or float("inf")) for r in rs),
                     "best_validation_mean": mean([r["best_validation_accuracy"] for r in rs]),
                     "test_mean": mean([r["test_accuracy"] for r in rs]),
                     "step_seconds_mean": mean([r["step_seconds"] for r in rs])})
    data = {"what": "seconds of training (optimizer steps only) until bbc validation accuracy >= target, ptune train",
            "command": "python bench/time_to_target.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "target": args.target, "eval_every": args.eval_every, "until_target": args.until_target,
            "machine": host_facts(),
            "rows": rows, "runs": results}
    out = Path(args.out)
    out.write_text(json.dumps(data, indent=1) + "\n")
    fmt = lambda v, f="{:.4f}": "-" if v is None or v == float("inf") else f.format(v)  # noqa: E731
    md = [f"`{data['command']}`", "", f"| variant | flags | reached {args.target} | train s to {args.target} (mean) | "
          "worst seed | best val acc (mean) | test acc (mean) | train s whole run (mean) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | `{r['flags'] or '(defaults)'}` | {r['reached']}/{r['seeds']} | "
                  f"{fmt(r['seconds_to_target_mean'], '{:.1f}')} | {fmt(r['seconds_to_target_max'], '{:.1f}')} | "
                  f"{fmt(r['best_validation_mean'])} | {fmt(r['test_mean'])} | {fmt(r['step_seconds_mean'], '{:.1f}')} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
