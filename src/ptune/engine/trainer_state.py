"""A run's record on disk: its directory, its counters (``trainer_state.json`` in each checkpoint)
and its metrics log (``metrics.jsonl``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import PtuneError
from .checkpoint import latest_checkpoint
from .config import TrainConfig


@dataclass
class TrainState:
    """Where a run stands; the field order is the key order in ``trainer_state.json``."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # position in this epoch's batch order, for exact resume
    best: float | None = None  # best validation value of the task's main metric
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    skipped_batches: int = 0  # groups dropped for a non-finite loss (--nan-policy skip)
    train_seconds: float = 0.0
    # None until the first evaluation ends: checkpoints written before then have no such key,
    # and older checkpoints never had it
    eval_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["eval_seconds"] is None:
            del d["eval_seconds"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def prepare_run_dir(cfg: TrainConfig, is_main: bool) -> Path:
    run_dir = Path(cfg.output_dir)
    if is_main and run_dir.exists() and any(run_dir.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(run_dir)
        elif not cfg.resume:
            raise PtuneError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --output-dir")
    if cfg.resume and latest_checkpoint(run_dir) is None:
        raise PtuneError(f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start fresh")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class MetricsLog:
    """Appends JSON lines to metrics.jsonl; on resume, drops lines past the checkpoint's step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(k + "\n" for k in keep))

    def write(self, **row: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
