"""A run's counters (``trainer_state.json`` in each checkpoint) and its metrics log (``metrics.jsonl``);
the directory itself is :mod:`ptune.engine.run_dir`'s."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable


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
    # seconds inside optimizer steps (batching, forward, backward, update) over every session of the run:
    # evaluation, checkpoints and start-up excluded; each validation row of metrics.jsonl carries it
    step_seconds: float = 0.0
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


class MetricsLog:
    """Appends JSON lines to metrics.jsonl; on resume, drops lines past the checkpoint's step. ``track`` (the
    experiment trackers, :class:`ptune.engine.tracking.Tracking`) gets each row written too."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None,
                 track: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.enabled, self.track = path, enabled, track
        if enabled and resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(k + "\n" for k in keep))

    def write(self, **row: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.track is not None:
                self.track(row)
