"""A study's numbers, read back from its runs' ``summary.json`` and ``metrics.jsonl`` (never re-measured)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .plan import Study, Variant

TARGET_FRACTION = 0.95  # "to 95% of best": the first evaluation whose validation score reached this share of the run's best


@dataclass
class RunResult:
    variant: str
    seed: int
    run_dir: str
    metric: str  # the task's main metric (accuracy, f1, mean_score, ...)
    validation: float  # best validation value of the metric
    test: float | None  # the best adapter on the test split
    trainable: int
    total: int
    adapter_bytes: int
    train_seconds: float  # wall time of the training loop, evaluations included
    eval_seconds: float
    samples_per_second: float  # training examples per second of training (evaluations excluded)
    peak_rss_mb: float
    epochs_to_95: float | None  # training epochs until validation first reached 95% of its best
    # seconds of training (optimizer steps only: evaluation, checkpoints and start-up excluded) until that
    # evaluation; None for runs whose metrics.jsonl predates the validation rows' step_seconds
    seconds_to_95: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (step, validation metric)
    steps_per_epoch: int = 0
    load: tuple[float, float] | None = None  # the machine's 1-minute load average before and after the run
    cpu: str = ""  # the CPU model the run trained on


@dataclass
class Row:
    """One variant over its seeds: mean and standard deviation (the spread over seeds is the stability)."""

    variant: str
    note: str
    metric: str
    runs: int
    validation_mean: float
    validation_std: float
    test_mean: float | None
    test_std: float | None
    trainable: int
    trainable_percent: float
    adapter_bytes: int
    train_seconds: float
    samples_per_second: float
    peak_rss_mb: float
    epochs_to_95: float | None
    seconds_to_95: float | None = None  # mean over the seeds that have it
    value: Any = None  # sweep: the option's value


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def read_run(run_dir: Path, variant: str, seed: int) -> RunResult | None:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    config = json.loads((run_dir / "config.json").read_text())
    key = next(k for k in summary if k.startswith("best_validation_"))
    metric = key[len("best_validation_"):]
    per_step = config["batch_size"] * config["grad_accum"]
    n_train = max(1, summary["examples"]["train"])
    # the loop's optimizer steps per epoch: batches (the last one partial), trailing partial accumulation dropped
    steps_per_epoch = max(1, math.ceil(n_train / config["batch_size"]) // config["grad_accum"])
    curve: list[tuple[float, float]] = []
    seconds: dict[float, float] = {}  # step -> seconds of training at that evaluation
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("split") == "validation" and metric in entry:
            curve.append((float(entry["step"]), float(entry[metric])))
            if "step_seconds" in entry:
                seconds[float(entry["step"])] = float(entry["step_seconds"])
    best = summary[key]
    higher = metric != "loss"
    reached = [s for s, v in curve if (v >= TARGET_FRACTION * best if higher else v <= best / TARGET_FRACTION)]
    adapter = Path(summary["adapter"])
    adapter = adapter if adapter.is_absolute() else run_dir / "best"
    size = sum(p.stat().st_size for p in adapter.iterdir() if p.is_file()) if adapter.is_dir() else 0
    train_s, eval_s = summary["train_seconds_this_session"], summary.get("eval_seconds", 0.0)
    full_epochs = min(int(summary.get("epochs_completed") or 0), summary["steps"] // steps_per_epoch)
    examples = full_epochs * n_train + (summary["steps"] - full_epochs * steps_per_epoch) * per_step
    test = (summary.get("test") or {}).get(metric)
    host = run_dir.parent / f"seed-{seed}.host.json"
    load, cpu = None, ""
    if host.is_file():
        h = json.loads(host.read_text())
        load, cpu = (h["load_before"], h["load_after"]), h.get("cpu", "")
    return RunResult(
        variant=variant, seed=seed, run_dir=str(run_dir), metric=metric, validation=float(best),
        test=None if test is None else float(test), trainable=summary["trainable_parameters"],
        total=summary["total_parameters"], adapter_bytes=size, train_seconds=train_s, eval_seconds=eval_s,
        samples_per_second=examples / max(train_s - eval_s, 1e-9), peak_rss_mb=summary["peak_rss_mb"],
        epochs_to_95=(reached[0] / steps_per_epoch) if reached else None,
        seconds_to_95=seconds.get(reached[0]) if reached else None, curve=curve,
        steps_per_epoch=steps_per_epoch, load=load, cpu=cpu)


def collect(study: Study, output_dir: Path) -> tuple[list[Row], list[RunResult]]:
    rows, results = [], []
    for variant in study.variants:
        runs = [r for s in study.seeds
                if (r := read_run(study.run_dir(output_dir, variant, s), variant.name, s)) is not None]
        results += runs
        if runs:
            rows.append(aggregate(variant, runs, study.swept))
    return rows, results


def aggregate(variant: Variant, runs: list[RunResult], swept: str | None = None) -> Row:
    val_mean, val_std = _mean_std([r.validation for r in runs])
    tests = [r.test for r in runs if r.test is not None]
    test_mean, test_std = _mean_std(tests) if tests else (None, None)
    epochs = [r.epochs_to_95 for r in runs if r.epochs_to_95 is not None]
    seconds = [r.seconds_to_95 for r in runs if r.seconds_to_95 is not None]
    value = None
    if swept:
        value = {**variant.options, **variant.method_options}.get(swept)
    return Row(variant=variant.name, note=variant.note, metric=runs[0].metric, runs=len(runs),
               validation_mean=val_mean, validation_std=val_std, test_mean=test_mean, test_std=test_std,
               trainable=runs[0].trainable, trainable_percent=100 * runs[0].trainable / runs[0].total,
               adapter_bytes=runs[0].adapter_bytes, train_seconds=statistics.fmean(r.train_seconds for r in runs),
               samples_per_second=statistics.fmean(r.samples_per_second for r in runs),
               peak_rss_mb=max(r.peak_rss_mb for r in runs),
               epochs_to_95=statistics.fmean(epochs) if epochs else None,
               seconds_to_95=statistics.fmean(seconds) if seconds else None, value=value)


def as_json(rows: list[Row], results: list[RunResult]) -> dict[str, Any]:
    return {"rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in results]}
