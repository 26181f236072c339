"""The studies' Python entry points: :func:`compare`, :func:`sweep`, :func:`ablate` (each a plan, then
:func:`run`: the plan written or checked, the missing runs trained, the report written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..engine.config import TrainConfig
from .plan import Study, ablate_plan, compare_plan, parse_seeds, sweep_plan, write_or_check_plan
from .report import write_report
from .runner import run_study


def run(study: Study, output_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write (or check) the plan, train what is missing, write the report; returns results.json's content."""
    output_dir = Path(output_dir)
    write_or_check_plan(study, output_dir)
    outcome = run_study(study, output_dir, log=lambda line: log(f"ptune: {study.kind}: {line}"))
    data = write_report(output_dir, outcome)
    data["ran"], data["reused"] = outcome["ran"], outcome["reused"]
    return data


def _seeds(seeds: Any, options: dict[str, Any]) -> tuple[int, ...]:
    return parse_seeds(seeds, int(options.get("seed", TrainConfig.seed)))


def _options(options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    options.pop("seed", None)  # the study's seeds replace it
    options.setdefault("method_options", {})
    return options


def compare(methods: Any, output_dir: str | Path, seeds: Any = 3, log: Callable[[str], None] = print,
            **options: Any) -> dict[str, Any]:
    """Train each method of ``methods`` ("p_tuning,lora" or a list) over ``seeds`` with the training
    ``options`` (TrainConfig fields; ``method_options`` go to the methods that have them)."""
    return run(compare_plan(methods, _seeds(seeds, options), _options(options)), output_dir, log)


def sweep(option_values: str, output_dir: str | Path, seeds: Any = 1, log: Callable[[str], None] = print,
          **options: Any) -> dict[str, Any]:
    """``option_values`` "num_virtual_tokens=0,5,20": one variant per value."""
    return run(sweep_plan(option_values, _seeds(seeds, options), _options(options)), output_dir, log)


def ablate(output_dir: str | Path, seeds: Any = 3, variants: Any = None, log: Callable[[str], None] = print,
           **options: Any) -> dict[str, Any]:
    """P-Tuning's ablation (:data:`ABLATIONS`): the full model and each part removed, over ``seeds``."""
    return run(ablate_plan(_seeds(seeds, options), _options(options), variants), output_dir, log)
