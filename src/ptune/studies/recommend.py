"""``ptune recommend``: a method and its settings from measurements, with the lab's fixed tree beside it.

Evidence comes from earlier studies (``--from cmp/ --from sweep/``: their ``results.json``) or, when
none is given, from a short budgeted probe: each candidate method trains on a subsample for at most
its share of ``--budget-minutes`` (``--max-minutes`` of every run), time and memory measured. The
winner is the best mean score; methods within one standard deviation (or 0.005) of it count as tied,
and a tie goes to the smaller trainable share, then the faster run. A sweep of an option of the
winning method (e.g. ``num_virtual_tokens``) sets that option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..engine.build import load_tasks, task_head
from ..engine.config import TrainConfig
from ..errors import ConfigError
from ..heads import HeadKind, head_kind
from ..methods import method_entry
from ..models import load_base
from ..options import add_train_options, setting_value, train_values
from .api import compare

PROBE_METHODS = "p_tuning,prompt_tuning,p_tuning_v2,lora,bitfit"
TIE = 0.005


# The lab's settings by task complexity (virtual tokens; prompt-encoder depth) and its decision tree,
# as the lab states them; ptune prints them next to what the measurements say.
LAB_SETTINGS = {
    "simple": {"num_virtual_tokens": (5, 10), "encoder_num_layers": (1, 2)},
    "medium": {"num_virtual_tokens": (15, 30), "encoder_num_layers": (2, 3)},
    "complex": {"num_virtual_tokens": (25, 50), "encoder_num_layers": (3, 4)},
}


def _kind(head: str | HeadKind) -> HeadKind:
    return head_kind(head) if isinstance(head, str) else head


def complexity(head: str | HeadKind, num_labels: int) -> str:
    """simple: binary classification; medium: more classes; complex: a label per token or a span (tagging,
    extractive QA), written text (generation), or several rows per record (multiple choice). ``head``: a
    head kind or its name (``ptune.heads.HEAD_KINDS``); its capabilities decide, not its name."""
    kind = _kind(head)
    if kind.generates or not kind.one_label or kind.multi_row:
        return "complex"
    return "simple" if num_labels <= 2 else "medium"


def choose_peft_method(head: str | HeadKind, model_size: int, data_size: int) -> tuple[str, str]:
    """The lab's decision tree: (method, reason). ``head``: the task's head kind or its name,
    ``model_size`` in parameters, ``data_size`` in training examples. Fixed rules, no measurement."""
    kind = _kind(head)
    if kind.generates:  # causal_lm, seq2seq: the answer is text the model writes
        return "lora", "generation: low-rank updates of the attention weights"
    if not kind.one_label:  # a label per token (tagging) or a span of the input (extractive QA)
        return "p_tuning_v2", "sequence labelling / QA needs deep prompts at every scale (P-Tuning v2)"
    if model_size >= 10_000_000_000:
        return "prompt_tuning", "10B+ parameters: input prompts alone match fine-tuning (Lester et al.)"
    if data_size < 1_000:
        return "p_tuning", "few examples: P-Tuning's encoder trains prompts stably from little data"
    if data_size > 100_000 and model_size < 1_000_000_000:
        return "lora", "much data on a small model: more capacity than prompts (LoRA)"
    return "p_tuning_v2", "NLU on a model under 10B: deep prompts (P-Tuning v2)"


@dataclass
class Recommendation:
    method: str
    settings: dict[str, Any]
    reason: str
    evidence: list[dict[str, Any]]  # one row per candidate: method, score, std, share, time, memory
    lab_method: str
    lab_reason: str
    lab_settings: dict[str, Any]
    agrees: bool
    disagreements: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def _score(row: dict[str, Any]) -> tuple[float, float]:
    if row.get("test_mean") is not None:
        return row["test_mean"], row.get("test_std") or 0.0
    return row["validation_mean"], row.get("validation_std") or 0.0


def pick(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The best row, ties (within the best's std or TIE) broken by trainable share then time."""
    best = max(rows, key=lambda r: _score(r)[0])
    top, spread = _score(best)
    tied = [r for r in rows if _score(r)[0] >= top - max(spread, TIE)]
    chosen = min(tied, key=lambda r: (r["trainable_percent"], r["train_seconds"]))
    return chosen, tied


def _facts(options: dict[str, Any]) -> dict[str, Any]:
    """The run's head kind (``task_type``: the task's own or --head), labels, training-set size and the
    base's parameter count."""
    cfg = TrainConfig.from_dict({**options, "method": "lora"})
    tasks = load_tasks(cfg)
    if len(tasks) != 1:
        raise ConfigError("recommend answers for one task; give one --task")
    task, records = tasks[0][0], tasks[0][1]
    base = load_base(cfg.model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    return {"task": task.name, "task_type": task_head(cfg, task).kind, "num_labels": len(task.labels),
            "train_size": len(records["train"]), "model_parameters": sum(p.numel() for p in base.parameters())}


def _variant_method(variant: str) -> dict[str, Any]:
    """A compare row's method and its own settings: ``lora:lr=0.005`` -> lora, {lr: 0.005}."""
    name, *parts = variant.split(":")
    return {"method": name, "settings": {k: setting_value(k, v, name, f"variant {variant!r}")
                                         for k, _, v in (p.partition("=") for p in parts)}}


def _rows_from(dirs: list[str]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Method rows (compare studies) and sweeps by option, from studies' results.json."""
    methods: list[dict[str, Any]] = []
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise ConfigError(f"--from {d}: no results.json there; give a folder written by ptune compare / sweep / ablate")
        data = json.loads(path.read_text())
        for row in data["rows"]:
            row = {**row, "source": str(d)}
            if data["kind"] in ("compare", "probe"):
                methods.append({**row, **_variant_method(row["variant"])})
            elif data["kind"] == "sweep":
                row["method"] = data["base"].get("method", "p_tuning_v2")
                sweeps.setdefault(data["swept"], []).append(row)
            elif data["kind"] == "ablate":
                sweeps.setdefault("ablation", []).append({**row, "method": "p_tuning"})
    return methods, sweeps


def recommend(output_dir: str | Path = "runs/recommend", sources: list[str] | None = None,
              budget_minutes: float = 10.0, methods: str = PROBE_METHODS, log: Callable[[str], None] = print,
              **options: Any) -> Recommendation:
    output_dir = Path(output_dir)
    facts = _facts(options)
    lab_method, lab_reason = choose_peft_method(facts["task_type"], facts["model_parameters"], facts["train_size"])
    level = complexity(facts["task_type"], facts["num_labels"])
    lab_settings = {k: v for k, v in LAB_SETTINGS[level].items()}
    if sources:
        rows, sweeps = _rows_from(sources)
        if not rows:
            raise ConfigError("--from gave no method comparison; include a ptune compare folder (sweeps only set "
                              "options of the method a comparison chose)")
    else:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        share = budget_minutes / len(names)
        steps = options.pop("max_steps", None) or 300
        probe = {"limit_train": 512, "limit_eval": 256, "epochs": 100, "max_steps": steps,
                 "eval_every": max(steps // 6, 10), **options, "max_minutes": max(share - 0.25, 0.1)}
        log(f"ptune: recommend: probing {len(names)} methods, about {share:.1f} min each "
            f"({probe['limit_train']} training examples, at most {steps} steps)")
        data = compare(",".join(names), output_dir / "probe", seeds=1, log=log, **probe)
        rows = [{**r, **_variant_method(r["variant"]), "source": str(output_dir / "probe")} for r in data["rows"]]
        sweeps = {}
        sources = [str(output_dir / "probe")]
    chosen, tied = pick(rows)
    method = chosen["method"]
    settings: dict[str, Any] = dict(chosen.get("settings", {}))  # compare --methods lora:lr=5e-3
    notes: list[str] = [f"{k}={v} as compared" for k, v in settings.items()]
    for option, swept in sweeps.items():
        own = [r for r in swept if r["method"] == method and r.get("value") is not None]
        if own and option not in settings:
            best, _ = pick(own)
            settings[option] = best["value"]
            notes.append(f"{option}={best['value']} from the sweep in {best['source']}")
    config = method_entry(method)[0]
    own = {f.name for f in dataclasses.fields(config)}  # the lab's settings go to the methods that have them
    if "num_virtual_tokens" in own and "num_virtual_tokens" not in settings:
        low, high = lab_settings["num_virtual_tokens"]
        settings["num_virtual_tokens"] = high if level != "simple" else low
        notes.append(f"num_virtual_tokens from the lab's {level}-task range {low}-{high} (not measured here)")
    if "encoder_num_layers" in own and "encoder_num_layers" not in settings:
        settings["encoder_num_layers"] = lab_settings["encoder_num_layers"][0]
    settings.setdefault("lr", config.default_lr)
    score, spread = _score(chosen)
    reason = (f"best measured {chosen['metric']} {score:.4f} ± {spread:.4f}" if chosen is max(rows, key=lambda r: _score(r)[0])
              else f"tied with the best ({', '.join(r['method'] for r in tied)}) and the smallest trainable share "
                   f"({chosen['trainable_percent']:.3f}%)")
    disagreements = []
    lab_row = next((r for r in sorted(rows, key=lambda r: -_score(r)[0]) if r["method"] == lab_method), None)
    agrees = lab_method == method
    if not agrees:
        if lab_row is None:
            disagreements.append(f"the lab's tree says {lab_method}, which was not measured")
        elif lab_row in tied:
            agrees = True  # the measurements cannot tell the two apart
            disagreements.append(f"within the margin: {lab_method} scores {_score(lab_row)[0]:.4f} against "
                                 f"{method}'s {score:.4f}; {method} wins the tie on its smaller trainable share "
                                 f"({chosen['trainable_percent']:.3f}% vs {lab_row['trainable_percent']:.3f}%)")
        else:
            disagreements.append(f"the lab's tree says {lab_method} ({lab_reason}); measured it scores "
                                 f"{_score(lab_row)[0]:.4f}, {score - _score(lab_row)[0]:.4f} behind {method} "
                                 f"(more than the tie margin)")
    evidence = [{"method": r.get("variant", r["method"]), "metric": r["metric"], "score": _score(r)[0], "std": _score(r)[1],
                 "trainable_percent": r["trainable_percent"], "train_seconds": r["train_seconds"],
                 "samples_per_second": r["samples_per_second"], "peak_rss_mb": r["peak_rss_mb"],
                 "source": r["source"]} for r in sorted(rows, key=lambda r: -_score(r)[0])]
    rec = Recommendation(method, settings, reason + ("; " + "; ".join(notes) if notes else ""), evidence,
                         lab_method, lab_reason, lab_settings, agrees, disagreements, list(sources))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recommendation.json").write_text(json.dumps({**asdict(rec), "facts": facts}, indent=2))
    (output_dir / "recommendation.md").write_text(render(rec, facts))
    return rec


def render(rec: Recommendation, facts: dict[str, Any]) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in rec.settings.items())
    lines = [f"# Recommendation for {facts['task']} ({facts['task_type']}, {facts['num_labels']} labels, "
             f"{facts['train_size']} training examples; base of {facts['model_parameters'] / 1e6:.1f}M parameters)", "",
             f"**{rec.method}**: `ptune train --task {facts['task']} --method {rec.method} {flags}`", "",
             f"Why: {rec.reason}.", "", "| method | score (mean ± std) | trainable | train time (s) | samples/s | "
             "peak RSS (MB) | source |", "|---|---|---|---|---|---|---|"]
    for e in rec.evidence:
        lines.append(f"| {e['method']} | {e['score']:.4f} ± {e['std']:.4f} ({e['metric']}) | "
                     f"{e['trainable_percent']:.4f}% | {e['train_seconds']:.1f} | {e['samples_per_second']:.1f} | "
                     f"{e['peak_rss_mb']:.0f} | {e['source']} |")
    lab = ", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in rec.lab_settings.items())
    lines += ["", f"The lab's decision tree says **{rec.lab_method}** ({rec.lab_reason}); its settings for this "
              f"task's complexity: {lab}."]
    if rec.agrees:
        lines.append("The measurements agree with it" + (f" {rec.disagreements[0]}." if rec.disagreements else "."))
    else:
        lines.append("Where the measurements disagree: " + "; ".join(rec.disagreements) + ".")
    return "\n".join(lines) + "\n"


def add_parser(sub: Any, shown: Sequence[str] | None = None) -> None:
    p = sub.add_parser("recommend", help="recommend a method and settings from measurements (and the lab's tree)",
                       description="Recommend a method and its settings for a task: from earlier studies (--from) or "
                                   "from a short budgeted probe of the candidate methods; prints the evidence and "
                                   "what the lab's fixed decision tree would say.")
    p.add_argument("--from", dest="sources", action="append", metavar="STUDY_DIR",
                   help="a ptune compare / sweep / ablate folder (repeat); default: run a probe")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="the probe's total training time (default 10)")
    p.add_argument("--methods", default=PROBE_METHODS, help=f"the probe's candidates (default {PROBE_METHODS})")
    p.add_argument("--output-dir", dest="study_dir", default="runs/recommend",
                   help="where the probe and recommendation.md/json go (default runs/recommend)")
    add_train_options(p, exclude=("method", "output_dir", "resume", "overwrite", "allow_changes", "progress",
                                  "max_minutes"), shown=shown)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.budget_minutes) or args.budget_minutes <= 0:
        raise ConfigError(f"--budget-minutes {args.budget_minutes} must be a positive number")
    options = train_values(args, skip=("sources", "budget_minutes", "methods", "study_dir"))
    rec = recommend(args.study_dir, args.sources, args.budget_minutes, args.methods,
                    log=lambda line: print(line, flush=True), **options)
    facts = json.loads((Path(args.study_dir) / "recommendation.json").read_text())["facts"]
    print(render(rec, facts), end="")
    print(f"ptune: recommendation: {Path(args.study_dir) / 'recommendation.md'}")
    return 0
