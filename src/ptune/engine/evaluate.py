"""Evaluation and prediction over encoded examples: batching in length order, the head's rows and metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..batching import collate
from ..data import Task
from ..encoder_decoder import decoder_inputs
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


@torch.no_grad()
def predict_logits(model: PtuneModel, examples: list[Example], *, batch_size: int, pad_id: int,
                   device: Any = "cpu", autocast: Any = None, shard: tuple[int, int] = (0, 1),
                   members: list[dict[int, Any]] | None = None) -> dict[int, Any]:
    """index -> the head's row for that example (fp32 scores, or what the head keeps); this process's
    shard of batches. ``members``: for a prompt ensemble, K dicts that receive each member's rows."""
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
            # a head that can score the labelled positions only gets the labels (ptune.frozen, causal LM)
            scored = {"labels": labels} if labels is not None and model.frozen and model.frozen.targets_only else {}
            res = model(**batch, **scored, **decoder_inputs(model.base, labels, None))  # an encoder-decoder reads the target
        lengths = [len(examples[i].encoded.input_ids) for i in idx]
        for i, row in zip(idx, kind.rows(res.logits, labels, lengths)):
            out[i] = row
        if members is not None and res.members is not None:
            for k, member in enumerate(members):
                member.update(zip(idx, kind.rows(res.members[:, k], labels, lengths)))
    model.train(was_training)
    return out


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
