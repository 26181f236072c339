"""Classification head: a new linear layer on one pooled vector per input.

Pooling: ``cls`` (the first position, as BERT), ``pooler`` (the encoder's own pooler, as P-Tuning
v2's code), ``mean`` (mean over real tokens) or ``last`` (the last real token, the decoder default);
``auto`` picks cls for encoders and last for decoders. The functions for class labels (validate,
encode, decode, accuracy / macro-F1, the predict result) are shared with the verbalizer head, which
answers the same kind of task without new weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..metrics import accuracy, macro_f1
from .base import Example, HeadBase, MetricSpec, check_text_fields, cross_entropy

if TYPE_CHECKING:
    from .config import HeadConfig

CLASS_METRICS = (MetricSpec("accuracy"), MetricSpec("macro_f1"),
                 MetricSpec("precision_at_1"))  # probing: accuracy of the top candidate, under LAMA's name


class ClassificationModule(nn.Module):
    def __init__(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> None:
        super().__init__()
        self.config = config
        self.pooling = ("cls" if is_encoder else "last") if config.pooling == "auto" else config.pooling
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(hidden_size, config.num_labels)
        self._pooler: list[nn.Module] = []  # the base's pooler (frozen), kept out of this module's parameters
        if self.pooling == "pooler":
            pooler = getattr(base.base_model, "pooler", None)
            if pooler is None:
                raise ConfigError(f"pooling='pooler' but {type(base).__name__} has no pooler; use cls or mean")
            self._pooler.append(pooler)

    def read_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The one position per row that ``forward`` reads (None: several), for ``ptune.frozen``'s pruned last layer."""
        mask = batch["attention_mask"]
        if self.pooling in ("cls", "pooler"):
            return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        if self.pooling == "last":
            return mask.long().sum(1) - 1
        return None

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """hidden (B, T, d) -> (B, C)."""
        mask = batch["attention_mask"]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "pooler":
            pooled = self._pooler[0](hidden)
        elif self.pooling == "mean":
            w = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        else:  # last real token (right padding)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pooled = hidden[rows, mask.long().sum(1) - 1]
        return self.classifier(self.dropout(pooled))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels)


class ClassLabels(HeadBase):
    """Tasks answered by one label per record (classification and verbalizer heads)."""

    label_form = "class"
    metrics = CLASS_METRICS

    def validate_record(self, task: Any, rec: dict, source: str, allow_unlabeled: bool) -> None:
        check_text_fields(task, rec, source)
        if rec.get(task.label_field) is None:
            if allow_unlabeled:
                return
            raise DataError(f"{source}: missing label field {task.label_field!r} (fields present: {sorted(rec)})")
        label = str(rec[task.label_field])
        if label not in task.label_to_id:
            raise DataError(f"{source}: unknown label {rec[task.label_field]!r}; the task's labels are "
                            f"{list(task.labels)}")
        rec[task.label_field] = label

    def encode(self, task: Any, encoder: Any, rec: dict, labelled: bool) -> Example:
        target = None
        if labelled:
            label = rec.get(task.label_field)
            if label not in task.label_to_id:
                raise DataError(f"label {label!r} is not one of the task's labels {list(task.labels)}")
            target = task.label_to_id[label]
        return Example(encoder.encode(rec), target, rec)

    def decode(self, task: Any, example: Example, row: torch.Tensor) -> str:
        return task.labels[int(row.argmax())]

    def compute_metrics(self, task: Any, examples: Sequence[Example], rows: Sequence[Any]) -> dict[str, float]:
        preds = [self.decode(task, ex, row) for ex, row in zip(examples, rows)]
        refs = [ex.record[task.label_field] for ex in examples]
        out = {"accuracy": accuracy(preds, refs), "macro_f1": macro_f1(preds, refs, task.labels)}
        if task.metric == "precision_at_1":
            out["precision_at_1"] = out["accuracy"]
        return out

    def result(self, task: Any, rec: dict, prediction: Any, row: torch.Tensor) -> dict[str, Any]:
        probs = torch.softmax(row, -1).tolist()
        return {"label": prediction, "probabilities": dict(zip(task.labels, probs))}


class ClassificationHead(ClassLabels):
    name = "classification"

    def peft_task_type(self, is_encoder: bool) -> str | None:
        return "SEQ_CLS"

    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module:
        return ClassificationModule(config, base, hidden_size, is_encoder)
