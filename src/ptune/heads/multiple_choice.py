"""Multiple-choice head: one score per choice, softmax over the record's choices.

The standard BERT recipe (``BertForMultipleChoice``; COPA, RACE, SWAG, LAMA with full candidate
lists): every (question, choice) pair goes through the task's template (default ``{question}
{choice}``, virtual tokens wherever the method puts them) as a row of its own, a new linear layer
scores the pooled vector of each row (pooling as the classification head), and the record's scores
are its choices' scores. The body simply sees one row per choice, so every method works unchanged.

Records: ``{"question": ..., "choices": [...], "label": index or choice text}`` (the question field is
the task's ``text_fields``, the label its ``label_field``; the choices are always ``choices`` and
reach the template as ``{choice}``). Records may have different numbers of choices: a batch holds
only real choice rows, and each record's score row is padded to the batch's most choices with
``-inf``, which the softmax gives probability 0, so a record scores the same alone or in any batch.
Metric: accuracy. Prompt ensembles and multi-task runs are refused (they repeat or route rows per
record, and a record here is several rows).

``multiple_choice_lm`` scores the same records with a causal LM's own head instead (no new weights):
the template ends with ``{choice}`` and a choice's score is the log-probability of its tokens after
the prompt, summed (or averaged with ``pooling: mean``). It is the zero-shot scorer of a
multiple-choice task (``ptune eval --zero-shot``) and trains with every method like any head.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..batching import ChoiceRows
from ..errors import ConfigError, DataError
from ..metrics import accuracy
from ..templates import Template, TemplateEncoder
from .base import Example, HeadBase, LMScores, MetricSpec, check_text_fields, cross_entropy, record_rows_mask
from .classification import ClassificationModule

if TYPE_CHECKING:
    from .config import HeadConfig

CHOICES = "choices"  # the record field holding the choices
CHOICE = "choice"  # the template field one choice fills


class MultipleChoiceModule(ClassificationModule):
    """A classification module with one output (a choice's score), regrouped per record."""

    def __init__(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> None:
        super().__init__(dataclasses.replace(config, num_labels=1), base, hidden_size, is_encoder)

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """hidden (N, T, d) for the N real choices of the batch -> (records, most choices), -inf where a
        record has no such choice."""
        mask = record_rows_mask(batch, hidden.shape[0], "multiple_choice", "choices", "ChoiceRows")
        scores = super().forward(hidden, batch).squeeze(-1)  # (N,)
        out = scores.new_full(mask.shape, float("-inf"))
        out[mask.to(scores.device)] = scores  # row-major: record by record, choice by choice
        return out


class MultipleChoiceHead(HeadBase):
    name = "multiple_choice"
    label_form = "choice"
    multi_row = True  # one row per (question, choice): ChoiceRows
    label_set = False
    metrics = (MetricSpec("accuracy"),)

    def check_config(self, config: HeadConfig) -> None:
        if config.num_labels not in (0, 1):
            raise ConfigError(f"a multiple_choice head scores each choice with one output (num_labels 1); "
                              f"got num_labels={config.num_labels}: the choices come with each record")

    def peft_task_type(self, is_encoder: bool) -> str | None:
        return None

    def default_template(self) -> str:
        return "{question} {choice}"

    def task_template(self, task: Any) -> str:
        return task.template or " ".join("{%s}" % f for f in task.text_fields) + " {choice}"

    def resolve(self, config: HeadConfig, template: Any, *, tokenizer: Any, label_words: Sequence[str],
                causal: bool) -> HeadConfig:
        if CHOICE not in template.fields:
            raise ConfigError(f"a multiple_choice template needs a {{{CHOICE}}} field where each choice goes, "
                              f"e.g. '{{question}} {{choice}}'; got {template.source!r}")
        if template.has_mask:
            raise ConfigError(f"a multiple_choice template scores a pooled vector and has no {{mask}} slot; "
                              f"remove it from {template.source!r}")
        return dataclasses.replace(config, num_labels=1)

    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module:
        return MultipleChoiceModule(config, base, hidden_size, is_encoder)

    def validate_record(self, task: Any, rec: dict, source: str, allow_unlabeled: bool) -> None:
        missing = [f for f in task.text_fields if f not in rec]
        if missing and "question" in rec:
            raise DataError(f"{source}: missing text field {missing[0]!r}; the record has 'question': give the task "
                            "text_fields: [question]")
        check_text_fields(task, rec, source)
        choices = rec.get(CHOICES)
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{source}: {CHOICES!r} must be a list of at least two choices "
                            f"(got {choices!r:.60})")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError(f"{source}: every choice must be non-empty text (got {choices!r:.80})")
        if len(set(choices)) < len(choices):
            dup = sorted({c for c in choices if choices.count(c) > 1})
            raise DataError(f"{source}: duplicate choices {dup}; each choice must appear once")
        label = rec.get(task.label_field)
        if label is None:
            if allow_unlabeled:
                return
            raise DataError(f"{source}: missing label field {task.label_field!r} (fields present: {sorted(rec)})")
        rec[task.label_field] = label_index(label, choices, source, task.label_field)

    def record_from_text(self, task: Any, text: str) -> dict:
        raise DataError(f"a multiple_choice run needs records with {task.text_fields[0]!r} and {CHOICES!r}, "
                        "not plain text; pass dicts (Python) or a JSONL file (CLI)")

    def encode(self, task: Any, encoder: Any, rec: dict, labelled: bool) -> Example:
        rows = [encoder.encode({**rec, CHOICE: c}) for c in rec[CHOICES]]
        longest = max(rows, key=lambda r: len(r.input_ids))
        target = None
        if labelled:
            target = label_index(rec.get(task.label_field), rec[CHOICES], "record", task.label_field)
        return Example(ChoiceRows(longest.input_ids, longest.virtual_index, choices=rows), target, rec)

    def decode(self, task: Any, example: Example, row: torch.Tensor) -> str:
        choices = example.record[CHOICES]
        return choices[int(row[:len(choices)].argmax())]

    def compute_metrics(self, task: Any, examples: Sequence[Example], rows: Sequence[Any]) -> dict[str, float]:
        preds = [self.decode(task, ex, row) for ex, row in zip(examples, rows)]
        refs = [ex.record[CHOICES][ex.target] for ex in examples]
        return {"accuracy": accuracy(preds, refs)}

    def result(self, task: Any, rec: dict, prediction: Any, row: torch.Tensor) -> dict[str, Any]:
        choices = rec[CHOICES]
        probs = torch.softmax(row[:len(choices)].float(), -1).tolist()
        return {"label": prediction, "index": choices.index(prediction), "probabilities": dict(zip(choices, probs))}


def label_index(label: Any, choices: list[str], source: str, field: str) -> int:
    """The index of the right choice: ``label`` is an index into ``choices`` or one choice's text."""
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(choices):
            return label
        raise DataError(f"{source}: {field} {label} is not an index of its {len(choices)} choices (0..{len(choices) - 1})")
    if isinstance(label, str) and label in choices:
        return choices.index(label)
    raise DataError(f"{source}: {field} {label!r} is not among the choices {choices!r:.80}; give the right "
                    "choice's index or its exact text")


class ChoiceLMModule(nn.Module):
    """Each choice's log-probability under the base's own (frozen) LM head: the sum over its tokens, or
    their mean (``pooling: mean``). Only the choice tokens' positions reach the vocabulary projection."""

    def __init__(self, config: HeadConfig, base: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.scores = LMScores(base)
        self.mean = config.pooling == "mean"

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask, tokens = batch.get("choice_mask"), batch.get("choice_tokens")
        if mask is None or tokens is None:
            raise ConfigError("a multiple_choice_lm head scores batches of choices with their tokens: collate "
                              "ChoiceRows encoded by the head (ptune.batching.collate gives choice_tokens)")
        if int(mask.sum()) != hidden.shape[0]:
            raise ConfigError(f"a multiple_choice batch has {int(mask.sum())} choices but the body ran "
                              f"{hidden.shape[0]} rows; prompt ensembles cannot score multiple choice")
        targets = tokens[:, 1:]  # position t predicts token t+1
        rows, pos = (targets != -100).nonzero(as_tuple=True)
        logp = torch.log_softmax(self.scores(hidden[rows, pos]).float(), -1)  # (choice tokens, vocab)
        token_lp = logp.gather(1, targets[rows, pos][:, None]).squeeze(1)
        per_row = token_lp.new_zeros(hidden.shape[0]).index_add(0, rows, token_lp)
        if self.mean:
            per_row = per_row / (targets != -100).sum(1).clamp(min=1)
        out = per_row.new_full(mask.shape, float("-inf"))
        out[mask.to(per_row.device)] = per_row
        return out

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels)


class MultipleChoiceLMHead(MultipleChoiceHead):
    """Multiple choice scored by a causal LM itself (no new weights): the template ends with ``{choice}``
    and a choice's score is the log-probability of its tokens after the prompt (summed; ``pooling:
    mean`` averages them). It answers untrained (``ptune eval --zero-shot`` on a multiple-choice task)
    and trains with every method like any head (the loss is the softmax over the choices' scores)."""

    name = "multiple_choice_lm"
    new_weights = False
    base_kinds = ("causal_lm",)

    def check_config(self, config: HeadConfig) -> None:
        super().check_config(config)
        if config.pooling not in ("auto", "mean"):
            raise ConfigError(f"a multiple_choice_lm head sums its choice tokens' log-probs (pooling auto) or "
                              f"averages them (pooling mean); pooling={config.pooling!r} does not apply")

    def base_kind(self, is_encoder: bool) -> str:
        if is_encoder:
            raise ConfigError("a multiple_choice_lm head scores choices by a causal LM's next-token log-probs; on "
                              "an encoder use the multiple_choice head (a trained linear layer)")
        return "causal_lm"

    def peft_task_type(self, is_encoder: bool) -> str | None:
        return "CAUSAL_LM"

    def resolve(self, config: HeadConfig, template: Any, *, tokenizer: Any, label_words: Sequence[str],
                causal: bool) -> HeadConfig:
        config = super().resolve(config, template, tokenizer=tokenizer, label_words=label_words, causal=causal)
        last = template.segments[-1]
        if not causal:
            self.base_kind(True)
        if (last.kind, last.value) != ("field", CHOICE) or template.fields.count(CHOICE) != 1:
            raise ConfigError(f"a multiple_choice_lm template must end with its one {{{CHOICE}}} (the LM scores the "
                              f"choice's tokens after the prompt); got {template.source!r}")
        return config

    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module:
        return ChoiceLMModule(config, base)

    def encode(self, task: Any, encoder: Any, rec: dict, labelled: bool) -> Example:
        prefix, sep = _prompt_encoder(encoder)
        rows = []
        for c in rec[CHOICES]:
            row = prefix.encode(rec, target=sep + c)
            last = max(i for i, t in enumerate(row.labels) if t != -100)
            if row.labels[last] == prefix.tokenizer.eos_token_id:  # score the choice, not an end of text after it
                row.labels[last] = -100
            rows.append(row)
        longest = max(rows, key=lambda r: len(r.input_ids))
        target = label_index(rec.get(task.label_field), rec[CHOICES], "record", task.label_field) if labelled else None
        return Example(ChoiceRows(longest.input_ids, longest.virtual_index, choices=rows), target, rec)


_PROMPT_ENCODERS: "weakref.WeakKeyDictionary[Any, tuple[TemplateEncoder, str]]" = weakref.WeakKeyDictionary()


def _prompt_encoder(encoder: TemplateEncoder) -> tuple[TemplateEncoder, str]:
    """The encoder of the template without its final ``{choice}``, and the text between them (the
    choice then follows as a causal-LM target, so its tokens are known and the prompt alone truncates)."""
    if encoder not in _PROMPT_ENCODERS:
        source = encoder.template.source.rstrip()
        head = source[:-len("{%s}" % CHOICE)]
        body = head.rstrip()
        _PROMPT_ENCODERS[encoder] = (TemplateEncoder(Template.parse(body), encoder.tokenizer,
                                                     max_length=encoder.max_length, causal=True), head[len(body):])
    return _PROMPT_ENCODERS[encoder]
