"""Evaluation and prediction over encoded examples: batching in length order, the head's rows and metrics."""

from __future__ import annotations

from typing import Any

import torch

from ..batching import collate
from ..data import Task
from ..heads import head_kind
from ..model import PtuneModel
from .build import Example


def batches_in_length_order(examples: list[Example], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].encoded.input_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def make_batch(examples: list[Example], idx: list[int], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    rows = [examples[i] for i in idx]
    targets = [r.target for r in rows] if rows[0].target is not None else None
    batch = collate([r.encoded for r in rows], pad_id=pad_id, targets=targets)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict_logits(model: PtuneModel, examples: list[Example], *, batch_size: int, pad_id: int,
                   device: Any = "cpu", autocast: Any = None, shard: tuple[int, int] = (0, 1)) -> dict[int, Any]:
    """index -> the head's row for that example (fp32 scores, or what the head keeps); this process's
    shard of batches."""
    kind = head_kind(model.head_config.kind)
    was_training = model.training
    model.eval()
    out: dict[int, Any] = {}
    rank, world = shard
    for b, idx in enumerate(batches_in_length_order(examples, batch_size)):
        if b % world != rank:
            continue
        batch = make_batch(examples, idx, pad_id, device)
        labels = batch.pop("labels", None)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            res = model(**batch)
        lengths = [len(examples[i].encoded.input_ids) for i in idx]
        for i, row in zip(idx, kind.rows(res.logits, labels, lengths)):
            out[i] = row
    model.train(was_training)
    return out


def decode_predictions(task: Task, examples: list[Example], rows: dict[int, Any]) -> list[Any]:
    """The head's prediction per example (a label; tagging: one tag per word, truncated words 'O')."""
    return [task.kind.decode(task, ex, rows[i]) for i, ex in enumerate(examples)]


def score(task: Task, examples: list[Example], rows: dict[int, Any]) -> dict[str, float]:
    return task.kind.compute_metrics(task, examples, [rows[i] for i in range(len(examples))])


def main_metric(task: Task) -> tuple[str, bool]:
    """(metric key, higher is better)."""
    spec = task.kind.metric(task.metric)
    return spec.name, spec.higher_is_better
