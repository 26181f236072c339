"""Tagging head (sequence labelling, e.g. NER): a new linear layer on every position.

Words are split into sub-tokens by the template encoder; a word's tag trains and is predicted at its
first sub-token only (the others are ignored, -100). Words cut off by truncation are predicted
``O``. Metrics: entity-level precision / recall / F1 (seqeval, exact spans) and token accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..errors import DataError
from ..metrics import accuracy, entity_scores
from .base import Example, HeadBase, MetricSpec, cross_entropy

if TYPE_CHECKING:
    from .config import HeadConfig


class TaggingModule(nn.Module):
    def __init__(self, config: HeadConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(hidden_size, config.num_labels)

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))  # (B, T, C)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels)


class TaggingHead(HeadBase):
    name = "tagging"
    label_form = "tags"
    one_label = False  # a tag per word
    metrics = (MetricSpec("f1", aliases=("entity_f1",)), MetricSpec("precision"), MetricSpec("recall"),
               MetricSpec("accuracy"))

    def peft_task_type(self, is_encoder: bool) -> str | None:
        return "TOKEN_CLS"

    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module:
        return TaggingModule(config, hidden_size)

    def validate_record(self, task: Any, rec: dict, source: str, allow_unlabeled: bool) -> None:
        for f in task.text_fields:
            value = rec.get(f)
            if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
                raise DataError(f"{source}: field {f!r} must be a non-empty list of tokens")
        if rec.get(task.label_field) is None:
            if allow_unlabeled:
                return
            raise DataError(f"{source}: missing label field {task.label_field!r} (fields present: {sorted(rec)})")
        tags = rec[task.label_field]
        if not isinstance(tags, list) or len(tags) != len(rec[task.text_fields[0]]):
            raise DataError(f"{source}: {task.label_field!r} must list one tag per token")
        bad = sorted({str(t) for t in tags if t not in task.label_to_id})
        if bad:
            raise DataError(f"{source}: unknown tag(s) {bad}; the task's tags are {list(task.labels)}")

    def record_from_text(self, task: Any, text: str) -> dict:
        return {task.text_fields[0]: text.split()}

    def encode(self, task: Any, encoder: Any, rec: dict, labelled: bool) -> Example:
        field = task.text_fields[0]
        tags = [task.label_to_id[t] for t in rec[task.label_field]] if labelled else None
        enc = encoder.encode(rec, tagging_field=field, tags=tags)
        if enc.labels is None:  # unlabelled prediction still needs a labels row shape
            enc.labels = [-100] * len(enc.input_ids)
        return Example(enc, None, rec)

    def decode(self, task: Any, example: Example, row: torch.Tensor) -> list[str]:
        tags = ["O"] * example.encoded.num_words
        ids = row.argmax(-1).tolist()
        for pos, w in enumerate(example.encoded.word_ids[:len(ids)]):
            if w >= 0:
                tags[w] = task.labels[ids[pos]]
        return tags

    def compute_metrics(self, task: Any, examples: Sequence[Example], rows: Sequence[Any]) -> dict[str, float]:
        preds = [self.decode(task, ex, row) for ex, row in zip(examples, rows)]
        refs = [ex.record[task.label_field] for ex in examples]
        flat_p = [t for seq in preds for t in seq]
        flat_r = [t for seq in refs for t in seq]
        return {**entity_scores(preds, refs), "accuracy": accuracy(flat_p, flat_r)}

    def result(self, task: Any, rec: dict, prediction: Any, row: Any) -> dict[str, Any]:
        return {"tokens": rec[task.text_fields[0]], "tags": prediction}
