"""Turning encoded examples into padded tensors, and length-grouped batch order.

Dynamic padding: a batch is padded to its own longest row, not to ``max_length``. Rows are padded
on the right for training and scoring (the heads know each row's real length) and on the left for
generation. ``length_grouped_order`` sorts rows into buckets of similar length (shuffled by a seeded
generator) so little compute goes to padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .templates import Encoded


@dataclass
class ChoiceRows(Encoded):
    """A multiple-choice record: one encoded row per choice (``choices``). Its own ``input_ids`` are its
    longest choice's, so length ordering and bucketing treat it like any row; ``collate`` flattens it."""

    choices: list[Encoded] = field(default_factory=list)


@dataclass
class WindowRows(ChoiceRows):
    """A span-QA record: one encoded row per window of its context (``choices``). ``collate`` flattens it as
    choices; the windows' token labels are training targets (answer start / end) and stay ``labels``."""


@dataclass
class TargetRow(Encoded):
    """An encoder-decoder record: the encoder's input as any row, and the decoder's ``target`` ids (the seq2seq
    head's labels, ending in the end-of-sequence token; None when unlabelled). ``collate`` pads the targets on
    their own, to the batch's longest target, as ``labels`` (B, Tdec) with -100."""

    target: list[int] | None = None


def collate(rows: Sequence[Encoded], *, pad_id: int, targets: Sequence[int] | None = None,
            task_ids: Sequence[int] | None = None, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad rows into a batch. ``targets``: one class id per row (classification / verbalizer).

    Multiple-choice rows (:class:`ChoiceRows`) are flattened into one row per choice (the body sees
    sum-of-choices rows, no padded choices), and ``choice_mask`` (records, most choices) says which
    slots of each record's score row are real; ``targets`` and ``task_ids`` stay one per record. Choice
    rows with token labels (scored by an LM) give them as ``choice_tokens``.
    """
    if rows and isinstance(rows[0], ChoiceRows):
        counts = [len(r.choices) for r in rows]
        per_row = None if task_ids is None else [t for t, n in zip(task_ids, counts) for _ in range(n)]
        batch = collate([c for r in rows for c in r.choices], pad_id=pad_id, task_ids=per_row, left=left)
        n = torch.tensor(counts)
        batch["choice_mask"] = torch.arange(int(n.max()))[None, :] < n[:, None]
        if "labels" in batch and not isinstance(rows[0], WindowRows):
            batch["choice_tokens"] = batch.pop("labels")
        if targets is not None:
            batch["labels"] = torch.tensor(list(targets), dtype=torch.long)
        return batch
    if rows and isinstance(rows[0], TargetRow):
        batch = collate([Encoded(r.input_ids, r.virtual_index) for r in rows], pad_id=pad_id, task_ids=task_ids,
                        left=left)
        if rows[0].target is not None:
            labels = torch.full((len(rows), max(len(r.target) for r in rows)), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, :len(r.target)] = torch.tensor(r.target)
            batch["labels"] = labels
        return batch
    T = max(len(r.input_ids) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    virtual_index = torch.full((B, T), -1, dtype=torch.long)
    has_token_labels = rows[0].labels is not None
    labels = torch.full((B, T), -100, dtype=torch.long) if has_token_labels else None
    label_position = torch.zeros(B, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        s = slice(T - n, T) if left else slice(0, n)
        input_ids[i, s] = torch.tensor(r.input_ids)
        attention_mask[i, s] = 1
        virtual_index[i, s] = torch.tensor(r.virtual_index)
        if labels is not None:
            labels[i, s] = torch.tensor(r.labels)
        label_position[i] = r.label_position + (T - n if left else 0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "virtual_index": virtual_index,
             "label_position": label_position}
    if labels is not None:
        batch["labels"] = labels
    elif targets is not None:
        batch["labels"] = torch.tensor(list(targets), dtype=torch.long)
    if task_ids is not None:
        batch["task_ids"] = torch.tensor(list(task_ids), dtype=torch.long)
    return batch


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int,
                         bucket_batches: int = 50) -> list[list[int]]:
    """Batches of indices: shuffle, sort within mega-buckets by length, then shuffle batch order."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(idx), mega):
        chunk = sorted(idx[start:start + mega], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
