"""Evaluation and prediction over encoded examples: batching in length order, metrics per task type."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..batching import collate
from ..data import Task
from ..metrics import compute_metrics
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
                   device: Any = "cpu", autocast: Any = None, shard: tuple[int, int] = (0, 1)
                   ) -> dict[int, tuple[torch.Tensor, float, int]]:
    """index -> (logits row in fp32, summed loss, loss token count); this process's shard of batches."""
    was_training = model.training
    model.eval()
    out: dict[int, tuple[torch.Tensor, float, int]] = {}
    rank, world = shard
    for b, idx in enumerate(batches_in_length_order(examples, batch_size)):
        if b % world != rank:
            continue
        batch = make_batch(examples, idx, pad_id, device)
        labels = batch.pop("labels", None)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            res = model(**batch)
        logits = res.logits.float()
        for j, i in enumerate(idx):
            loss, count = 0.0, 0
            if labels is not None and model.head_config.kind == "causal_lm":
                lab = labels[j, 1:]
                keep = lab != -100
                if keep.any():
                    lp = torch.log_softmax(logits[j, :-1][keep], -1)
                    loss = float(-lp.gather(1, lab[keep][:, None]).sum())
                    count = int(keep.sum())
            n = len(examples[i].encoded.input_ids)
            row = logits[j] if logits.dim() == 2 else logits[j, :n]
            out[i] = (row.cpu() if model.head_config.kind != "causal_lm" else torch.empty(0), loss, count)
    model.train(was_training)
    return out


def decode_predictions(task: Task, examples: list[Example], logits: dict[int, tuple]) -> list[Any]:
    """Labels per example (tagging: one tag per word, truncated words predicted 'O')."""
    preds = []
    for i, ex in enumerate(examples):
        row = logits[i][0]
        if task.task_type == "tagging":
            tags = ["O"] * ex.encoded.num_words
            ids = row.argmax(-1).tolist()
            for pos, w in enumerate(ex.encoded.word_ids[:len(ids)]):
                if w >= 0:
                    tags[w] = task.labels[ids[pos]]
            preds.append(tags)
        elif task.task_type == "classification":
            preds.append(task.labels[int(row.argmax())])
        else:
            preds.append(None)
    return preds


def score(task: Task, examples: list[Example], logits: dict[int, tuple]) -> dict[str, float]:
    if task.task_type == "causal_lm":
        loss = sum(v[1] for v in logits.values())
        count = sum(v[2] for v in logits.values())
        mean = loss / max(count, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
    preds = decode_predictions(task, examples, logits)
    refs = [ex.record[task.label_field] for ex in examples]
    return compute_metrics(task, preds, refs)


def main_metric(task: Task) -> tuple[str, bool]:
    """(metric key, higher is better)."""
    return {"accuracy": ("accuracy", True), "macro_f1": ("macro_f1", True),
            "precision_at_1": ("precision_at_1", True), "entity_f1": ("f1", True),
            "loss": ("loss", False)}[task.metric]
