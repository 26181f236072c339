"""A study's pictures (matplotlib, PNG): learning curves, metric vs trainable parameters, metric vs
training time, and for a sweep the metric against the swept value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .collect import Row, RunResult


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def learning_curves(rows: list[Row], results: list[RunResult], path: Path) -> Path:
    """Validation metric against step: one line per variant (the mean over seeds), a band from min to max."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        runs = [r for r in results if r.variant == row.variant and r.curve]
        if not runs:
            continue
        steps = sorted({s for r in runs for s, _ in r.curve})
        grid = np.array([[np.interp(s, [p[0] for p in r.curve], [p[1] for p in r.curve]) for s in steps]
                         for r in runs])
        line, = ax.plot(steps, grid.mean(0), marker="o", markersize=3, label=row.variant)
        if len(runs) > 1:
            ax.fill_between(steps, grid.min(0), grid.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation {rows[0].metric}")
    ax.set_title("Learning curves (mean over seeds; band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _scatter(rows: list[Row], x: list[float], xlabel: str, title: str, path: Path, log: bool) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for row, xv in zip(rows, x):
        y, err = _headline(row)
        ax.errorbar([xv], [y], yerr=[err], fmt="o", capsize=3, label=row.variant)
        ax.annotate(row.variant, (xv, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{_split(rows)} {rows[0].metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _split(rows: list[Row]) -> str:
    return "test" if all(r.test_mean is not None for r in rows) else "validation"


def _headline(row: Row) -> tuple[float, float]:
    if row.test_mean is not None:
        return row.test_mean, row.test_std or 0.0
    return row.validation_mean, row.validation_std


def metric_vs_parameters(rows: list[Row], path: Path) -> Path:
    return _scatter(rows, [max(r.trainable, 1) for r in rows], "trainable parameters (log scale)",
                    "Score against trainable parameters", path, log=True)


def metric_vs_time(rows: list[Row], path: Path) -> Path:
    return _scatter(rows, [r.train_seconds for r in rows], "training time (s, evaluations included)",
                    "Score against training time", path, log=False)


def metric_vs_value(rows: list[Row], option: str, path: Path) -> Path:
    """A sweep: the metric (mean, error bar = std over seeds) against the swept value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    numeric = all(isinstance(r.value, (int, float)) and not isinstance(r.value, bool) for r in rows)
    xs = [r.value if numeric else k for k, r in enumerate(rows)]
    ys, errs = zip(*(_headline(r) for r in rows))
    vals = [r.validation_mean for r in rows]
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=_split(rows))
    if _split(rows) == "test":
        ax.plot(xs, vals, marker="s", linestyle="--", alpha=0.7, label="validation")
    positive = [x for x in xs if x > 0] if numeric else []
    if positive and min(xs) >= 0 and max(positive) >= 20 * max(min(positive), 1):  # 0, 1, 5, ... 100: spread out
        ax.set_xscale("symlog", linthresh=1)
    if not numeric:
        ax.set_xticks(xs, [str(r.value) for r in rows])
    ax.set_xlabel(option)
    ax.set_ylabel(rows[0].metric)
    ax.set_title(f"{rows[0].metric} against {option} (mean over seeds; bars: std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
