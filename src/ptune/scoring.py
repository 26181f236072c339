"""Scoring encoded examples: the one path from examples to each example's head row.

Evaluation during training, ``Run.evaluate`` / ``Run.predict``, multi-task views and
``ptune.AdapterSet`` (and so ``ptune serve``) all score through :func:`score_rows`:

- examples are ordered by length and cut into forward passes of at most ``batch_size`` rows
  (``waste``: also cut where padding would exceed that share of the real positions, so short rows
  of one adapter are not padded to another's long ones: on a CPU a padded position costs as much as
  a real one);
- a model with one head (:class:`~ptune.model.PtuneModel`) scores the batch as it trains on it (targets
  kept, so a causal-LM head scores the labelled tokens and an encoder-decoder reads its target);
- a model with several heads (:class:`~ptune.multitask.MultiHeadModel`: a multi-task adapter, an
  ``AdapterSet``) gets each row's head as ``task_index`` (``Example.task``), the rows of one head side
  by side; heads whose record is several model rows (choices, windows) get forward passes of their own;
- each head turns its logits into per-row results (``HeadKind.rows``), returned by example index.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .batching import collate
from .encoder_decoder import decoder_inputs
from .heads import Example, HeadKind, head_kind
from .model import PtuneModel
from .multitask import MultiHeadModel

PADDING_WASTE = 0.3  # AdapterSet: a forward pass may compute at most 1.3x the positions its rows really have


def length_chunks(order: list[int], sizes: list[int], batch_size: int,
                  waste: float | None = None) -> list[list[int]]:
    """Split rows sorted by length (``sizes``, ascending, aligned with ``order``) into forward passes of at
    most ``batch_size`` rows; with ``waste``, also where the padded positions would pass ``1 + waste``
    times the real ones."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i, n in zip(order, sizes):
        full = len(cur) >= batch_size
        wasteful = waste is not None and n * (len(cur) + 1) > (1 + waste) * (real + n)
        if cur and (full or wasteful):
            chunks.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        chunks.append(cur)
    return chunks


def make_batch(examples: Sequence[Example], idx: Sequence[int], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    """The rows ``idx`` of ``examples`` as one padded batch on ``device``, with their class targets as ``labels``."""
    rows = [examples[i] for i in idx]
    targets = [r.target for r in rows] if rows[0].target is not None else None
    batch = collate([r.encoded for r in rows], pad_id=pad_id, targets=targets)
    return {k: v.to(device) for k, v in batch.items()}


def batches(examples: Sequence[Example], batch_size: int, kinds: Sequence[HeadKind] | None = None,
            waste: float | None = None) -> list[list[int]]:
    """The forward passes scoring ``examples``: length-ordered chunks; with several heads (``kinds``), a
    head whose record is several rows keeps to passes of its own, and within a pass rows go by head."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].encoded.input_ids))
    if kinds is None:
        groups = [order]
    else:  # one group shared by every one-row head, one per several-row head
        by: dict[int, list[int]] = {}
        for i in order:
            t = examples[i].task
            by.setdefault(t if kinds[t].multi_row else -1, []).append(i)
        groups = [by[k] for k in sorted(by)]
    out = []
    for group in groups:
        sizes = [len(examples[i].encoded.input_ids) for i in group]
        for idx in length_chunks(group, sizes, batch_size, waste):
            if kinds is not None:
                idx.sort(key=lambda i: examples[i].task)  # each head's rows side by side (a slice)
            out.append(idx)
    return out


@torch.no_grad()
def score_rows(model: PtuneModel, examples: Sequence[Example], *, batch_size: int, pad_id: int,
               device: Any = "cpu", autocast: Any = None, shard: tuple[int, int] = (0, 1),
               members: list[dict[int, Any]] | None = None, waste: float | None = None) -> dict[int, Any]:
    """index -> the head's row for that example (fp32 scores, or what the head keeps); this process's
    shard of the forward passes. ``members``: for a prompt ensemble, K dicts that receive each member's
    rows. ``autocast``: a callable giving the autocast context (None: as the weights are)."""
    multi = isinstance(model, MultiHeadModel)
    kinds = model.kinds if multi else (head_kind(model.head_config.kind),)
    was_training = model.training
    model.eval()
    out: dict[int, Any] = {}
    rank, world = shard
    try:
        for b, idx in enumerate(batches(examples, batch_size, kinds if multi else None, waste)):
            if b % world != rank:
                continue
            lengths = [len(examples[i].encoded.input_ids) for i in idx]
            with autocast() if autocast else torch.autocast("cpu", enabled=False):
                if multi:
                    _score_mixed(model, [examples[i] for i in idx], idx, lengths, kinds, pad_id, device, out)
                    continue
                batch = make_batch(examples, idx, pad_id, device)
                labels = batch.pop("labels", None)
                # a head that can score the labelled positions only gets the labels (ptune.frozen, causal LM)
                scored = {"labels": labels} if labels is not None and model.frozen and model.frozen.targets_only else {}
                res = model(**batch, **scored, **decoder_inputs(model.base, labels, None))  # T5 reads the target
            out.update(zip(idx, kinds[0].rows(res.logits, labels, lengths)))
            if members is not None and res.members is not None:
                for k, member in enumerate(members):
                    member.update(zip(idx, kinds[0].rows(res.members[:, k], labels, lengths)))
    finally:
        model.train(was_training)
    return out


def _score_mixed(model: MultiHeadModel, rows: list[Example], idx: list[int], lengths: list[int],
                 kinds: Sequence[HeadKind], pad_id: int, device: Any, out: dict[int, Any]) -> None:
    """One forward pass over rows of several heads (labels dropped: rows of tagging and class heads share
    the batch, and their scores need none)."""
    batch = collate([dataclasses.replace(r.encoded, labels=None) for r in rows], pad_id=pad_id)
    batch.pop("labels", None)  # a span-QA window's answer positions: training targets only
    batch = {k: v.to(device) for k, v in batch.items()}
    tasks = [r.task for r in rows]
    # one index per model row: a several-row record (its pass holds only its head's rows) repeats its own
    per_row = tasks if "choice_mask" not in batch else [tasks[0]] * batch["input_ids"].shape[0]
    res = model(**batch, task_index=torch.tensor(per_row, dtype=torch.long, device=device))
    for t, logits in enumerate(res.logits):
        if logits is None:
            continue
        mine = [j for j, task in enumerate(tasks) if task == t]
        out.update(zip((idx[j] for j in mine), kinds[t].rows(logits, None, [lengths[j] for j in mine])))


__all__ = ["score_rows", "make_batch", "batches", "length_chunks", "PADDING_WASTE"]
