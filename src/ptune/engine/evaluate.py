"""Evaluation over encoded examples: training batches, the head's metrics (scoring itself: :mod:`ptune.scoring`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..batching import collate
from ..data import Task
from ..scoring import make_batch  # noqa: F401  (the loop's training batches; scoring itself: ptune.scoring.score_rows)
from .build import Example


def make_multitask_batch(examples: list[Example], idx: list[int], pad_id: int, device: Any,
                         num_tasks: int) -> dict[str, Any]:
    """A batch whose rows may belong to different tasks: the inputs padded together, ``task_index``,
    and per task the targets of its rows in batch order (token labels padded to the batch's length)."""
    rows = [examples[i] for i in idx]
    batch: dict[str, Any] = collate([dataclasses.replace(r.encoded, labels=None) for r in rows], pad_id=pad_id)
    T = batch["input_ids"].shape[1]
    labels: list[torch.Tensor | None] = []
    for t in range(num_tasks):
        group = [r for r in rows if r.task == t]
        if not group:
            labels.append(None)
            continue
        if group[0].encoded.labels is not None:
            tags = torch.full((len(group), T), -100, dtype=torch.long)
            for j, r in enumerate(group):
                tags[j, :len(r.encoded.labels)] = torch.tensor(r.encoded.labels)
            labels.append(tags.to(device))
        else:
            labels.append(torch.tensor([r.target for r in group], dtype=torch.long, device=device))
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["task_index"] = torch.tensor([r.task for r in rows], dtype=torch.long, device=device)
    batch["labels"] = labels
    return batch


def decode_predictions(task: Task, examples: list[Example], rows: dict[int, Any]) -> list[Any]:
    """The head's prediction per example (a label; tagging: one tag per word, truncated words 'O')."""
    return [task.kind.decode(task, ex, rows[i]) for i, ex in enumerate(examples)]


def score(task: Task, examples: list[Example], rows: dict[int, Any],
          members: list[dict[int, Any]] | None = None) -> dict[str, float]:
    """The task's metrics; with a prompt ensemble's ``members``, also each member's main metric."""
    metrics = task.kind.compute_metrics(task, examples, [rows[i] for i in range(len(examples))])
    if members:
        key = main_metric(task)[0]
        for k, member in enumerate(members):
            metrics[f"member_{k}_{key}"] = task.kind.compute_metrics(
                task, examples, [member[i] for i in range(len(examples))])[key]
    return metrics


def main_metric(task: Task) -> tuple[str, bool]:
    """(metric key, higher is better)."""
    spec = task.kind.metric(task.metric)
    return spec.name, spec.higher_is_better
