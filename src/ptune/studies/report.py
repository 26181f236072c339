"""A study's report: ``report.md`` (tables, PNGs beside it), ``report.html`` (one self-contained page,
plots embedded) and ``results.json`` (every number of both, per run and per variant)."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from . import plots
from .collect import Row, RunResult, as_json, collect
from .plan import Study, read_plan

TITLES = {"compare": "Method comparison", "sweep": "Sweep", "ablate": "P-Tuning ablation", "probe": "Probe"}


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _headline(row: Row) -> float:
    return row.test_mean if row.test_mean is not None else row.validation_mean


def table(study: Study, rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table (the same in Markdown and HTML)."""
    metric = rows[0].metric if rows else "metric"
    header = ["variant"] + (["value"] if study.kind == "sweep" else []) + [
        f"validation {metric} (mean ± std)", f"test {metric} (mean ± std)", "trainable", "share",
        "adapter size", "train time (s)", "samples/s", "peak RSS (MB)", "epochs to 95% of best",
        "train s to 95% of best", "seeds"]
    full = next((r for r in rows if r.variant == "full"), None)
    if study.kind == "ablate" and full:
        header.insert(3, "drop from full")
    cells = []
    for r in rows:
        line = [r.variant] + ([str(r.value)] if study.kind == "sweep" else []) + [
            _pm(r.validation_mean, r.validation_std), _pm(r.test_mean, r.test_std), f"{r.trainable:,}",
            f"{r.trainable_percent:.4f}%", _size(r.adapter_bytes), f"{r.train_seconds:.1f}",
            f"{r.samples_per_second:.1f}", f"{r.peak_rss_mb:.0f}",
            "-" if r.epochs_to_95 is None else f"{r.epochs_to_95:.2f}",
            "-" if r.seconds_to_95 is None else f"{r.seconds_to_95:.1f}", str(r.runs)]
        if study.kind == "ablate" and full:
            line.insert(3, f"{_headline(full) - _headline(r):+.4f}" if r is not full else "-")
        cells.append(line)
    return header, cells


def _settings(study: Study) -> str:
    base = {k: v for k, v in study.base.items() if k not in ("method_options",) and v not in (None, {}, False)}
    parts = [f"{k}={v}" for k, v in base.items()]
    parts += [f"{k}={v}" for k, v in study.base.get("method_options", {}).items()]
    return ", ".join(parts) or "defaults"


def write_report(output_dir: str | Path, outcome: dict[str, Any] | None = None) -> dict[str, Any]:
    """(Re)write the report of the study in ``output_dir`` from its finished runs; returns results.json's content."""
    output_dir = Path(output_dir)
    study = read_plan(output_dir)
    rows, results = collect(study, output_dir)
    expected = len(study.variants) * len(study.seeds)
    data = {"kind": study.kind, "swept": study.swept, "seeds": list(study.seeds), "base": study.base,
            "runs_expected": expected, "runs_finished": len(results),
            "failed": (outcome or {}).get("failed", []), **as_json(rows, results)}
    pictures: list[tuple[str, Path]] = []
    if rows and plots.available():
        if any(r.curve for r in results):
            pictures.append(("Learning curves", plots.learning_curves(rows, results, output_dir / "learning_curves.png")))
        if study.kind == "sweep":
            pictures.append((f"Metric against {study.swept}",
                             plots.metric_vs_value(rows, study.swept, output_dir / "metric_vs_value.png")))
        else:
            pictures.append(("Score against trainable parameters",
                             plots.metric_vs_parameters(rows, output_dir / "metric_vs_parameters.png")))
            pictures.append(("Score against training time", plots.metric_vs_time(rows, output_dir / "metric_vs_time.png")))
    data["plots"] = [p.name for _, p in pictures]
    (output_dir / "results.json").write_text(json.dumps(data, indent=2))
    header, cells = table(study, rows)
    (output_dir / "report.md").write_text(_markdown(study, data, header, cells, pictures, results))
    (output_dir / "report.html").write_text(_html(study, data, header, cells, pictures))
    return data


def _notes(study: Study, data: dict[str, Any]) -> list[str]:
    notes = [f"Settings shared by every run: {_settings(study)}.",
             f"Seeds: {', '.join(map(str, study.seeds))}; {data['runs_finished']} of {data['runs_expected']} runs "
             f"finished. Mean ± sample standard deviation over seeds (the spread is the stability column).",
             "Train time is the training loop's wall time with its evaluations; samples/s leaves the evaluations "
             "out; peak RSS is the training process's. Epochs to 95% of best: the first evaluation whose validation "
             "score reached 95% of that run's best; train s to 95% of best: the seconds of training (optimizer steps only: "
             "evaluations, checkpoints and start-up left out) until that evaluation, so it resolves only as finely as "
             "the runs evaluate (--eval-every)."]
    loads = [v for r in data["runs"] if r.get("load") for v in r["load"]]
    if loads:
        cpus = sorted({r["cpu"] for r in data["runs"] if r.get("cpu")})
        notes.append(f"Machine: {', '.join(cpus) or 'CPU'}, {os.cpu_count()} CPUs; load (1-minute load average at the start "
                     f"and end of each run): "
                     f"{min(loads):.1f} to {max(loads):.1f}; times and samples/s compare fairly only under similar load.")
    if study.kind == "ablate":
        notes.append("Drop from full: the full model's score minus the variant's (test where measured, else "
                     "validation); positive = the removed part helped.")
    for f in data["failed"]:
        notes.append(f"FAILED: {f['variant']} seed {f['seed']} (exit {f['exit_code']}; log {f['log']}).")
    if not plots.available():
        notes.append("No plots: matplotlib is not installed (pip install 'ptune[studies]').")
    return notes


def _markdown(study: Study, data: dict[str, Any], header: list[str], cells: list[list[str]],
              pictures: list[tuple[str, Path]], results: list[RunResult]) -> str:
    lines = [f"# {TITLES[study.kind]}" + (f": {study.swept}" if study.swept else ""), ""]
    lines += [f"- {n}" for n in _notes(study, data)] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    notes = [(r["variant"], r["note"]) for r in data["rows"] if r["note"]]
    if notes:
        lines += [""] + [f"- `{v}`: {n}" for v, n in notes]
    for title, path in pictures:
        lines += ["", f"## {title}", "", f"![{title}]({path.name})"]
    lines += ["", "## Runs", "", "| variant | seed | validation | test | train time (s) | run |", "|---|---|---|---|---|---|"]
    for r in results:
        test = "-" if r.test is None else f"{r.test:.4f}"
        lines.append(f"| {r.variant} | {r.seed} | {r.validation:.4f} | {test} | {r.train_seconds:.1f} | "
                     f"`{Path(r.run_dir).relative_to(Path(r.run_dir).parents[2])}` |")
    return "\n".join(lines) + "\n"


def _html(study: Study, data: dict[str, Any], header: list[str], cells: list[list[str]],
          pictures: list[tuple[str, Path]]) -> str:
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in line) + "</tr>" for line in cells)
    images = "".join(
        f"<h2>{e(t)}</h2><img alt='{e(t)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        for t, p in pictures)
    notes = "".join(f"<li>{e(n)}</li>" for n in _notes(study, data))
    title = TITLES[study.kind] + (f": {study.swept}" if study.swept else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>"
            f"<h1>{e(title)}</h1><ul>{notes}</ul><table><tr>{''.join(f'<th>{e(h)}</th>' for h in header)}</tr>"
            f"{rows}</table>{images}</body></html>\n")
