"""The contract every head kind meets, and the pieces heads share.

A *head kind* (``classification``, ``tagging``, ``verbalizer``, ``causal_lm``, ...) is everything
ptune knows about one way of turning a transformer's hidden states into a task's answers: the
module that scores and computes the loss, how a record's label becomes training targets, how
scores decode to predictions, which metrics it reports (one :class:`MetricSpec` each), which base
it needs (a bare backbone, a masked LM or a causal LM), its default template and its HF PEFT task
type. The engine, evaluation, inference and the API only call these methods; no code outside
``ptune.heads`` branches on a head's name. Adding a head is one module here, one registry line in
``heads/__init__.py`` and one row in the shared test matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..templates import Encoded

if TYPE_CHECKING:
    from ..data.tasks import Task
    from ..templates import Template, TemplateEncoder
    from .config import HeadConfig

POOLINGS = ("auto", "cls", "pooler", "mean", "last")


@dataclass(frozen=True)
class MetricSpec:
    """One metric a head reports: its key in the metrics dict and which way is better."""

    name: str
    higher_is_better: bool = True
    aliases: tuple[str, ...] = ()  # older names a task file may use for it


@dataclass
class Example:
    """One record after the template and the head's label encoding."""

    encoded: Encoded
    target: int | None  # one class id per row (class heads); None for per-token labels or none
    record: dict
    task: int = 0  # the row's task in a multi-task run (index into the run's tasks)


@runtime_checkable
class HeadKind(Protocol):
    """What a head kind provides; each is a stateless object registered in ``ptune.heads``."""

    name: str
    label_form: str  # "class" | "tags" | "text" | "choice" | "span": heads of one form can stand in for each other on a task
    new_weights: bool  # whether the head adds weights that must be trained (zero-shot needs False)
    metrics: tuple[MetricSpec, ...]  # the first is the default main metric
    # capabilities, read by the engine, serving, studies and exports instead of comparing names or label forms
    multi_row: bool  # a record takes several model rows (a question's choices, a long context's windows)
    generates: bool  # answers are text it writes with generate() (predict, serving and --generate go there)
    label_set: bool  # the task's labels are a closed set of classes or tags (>= 2, no duplicates)
    one_label: bool  # one label per input (not per token, not text): a prompt ensemble may vote on it
    base_kinds: tuple[str, ...]  # the base kinds (ptune.models.BASE_KINDS) it runs on, the one it loads first
    data_formats: bool  # its records may be instructions or conversations (ptune.data.formats), bounded by
    #                     --max-source-length / --max-target-length

    def fits_labels_of(self, other: "HeadKind") -> bool: ...

    def check_config(self, config: HeadConfig) -> None: ...
    def base_kind(self, is_encoder: bool) -> str: ...
    def peft_task_type(self, is_encoder: bool) -> str | None: ...
    def default_template(self) -> str: ...
    def task_template(self, task: "Task") -> str: ...
    def resolve(self, config: HeadConfig, template: "Template", *, tokenizer: Any, label_words: Sequence[str],
                causal: bool) -> HeadConfig: ...
    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module: ...
    def validate_record(self, task: "Task", rec: dict, source: str, allow_unlabeled: bool) -> None: ...
    def record_from_text(self, task: "Task", text: str) -> dict: ...
    def encode(self, task: "Task", encoder: "TemplateEncoder", rec: dict, labelled: bool) -> Example: ...
    def rows(self, logits: torch.Tensor, labels: torch.Tensor | None, lengths: Sequence[int]) -> list[Any]: ...
    def decode(self, task: "Task", example: Example, row: Any) -> Any: ...
    def compute_metrics(self, task: "Task", examples: Sequence[Example], rows: Sequence[Any]) -> dict[str, float]: ...
    def result(self, task: "Task", rec: dict, prediction: Any, row: Any) -> dict[str, Any]: ...


class HeadBase:
    """Defaults most head kinds share; a head kind overrides what differs."""

    name = ""
    label_form = "class"
    metrics: tuple[MetricSpec, ...] = ()
    new_weights = True  # False: the base's own LM head answers, so the head works with nothing trained
    multi_row = False  # True: a record is several model rows (choices, windows): collate's ChoiceRows / WindowRows
    generates = False  # True: answers are written by generate() (Run.predict, serving), not picked by scoring
    label_set = True  # True: the task's labels are a closed set (classes, tags)
    one_label = True  # True: one label per input (a pooled class); False: per token, a span or text
    base_kinds: tuple[str, ...] = ("backbone",)  # any LM class of an encoder or decoder holds the backbone too
    data_formats = False  # True: records may be alpaca / chat / sharegpt / ChatGLM (prompt -> response heads)

    def fits_labels_of(self, other: "HeadKind") -> bool:
        """Whether this head can answer a task made for ``other`` (same form of label: encoding, metrics)."""
        return self.label_form == other.label_form

    def check_config(self, config: HeadConfig) -> None:
        if config.num_labels < 1:
            raise ConfigError(f"a {self.name} head needs num_labels >= 1, got {config.num_labels}")

    def base_kind(self, is_encoder: bool) -> str:
        return self.base_kinds[0]

    def peft_task_type(self, is_encoder: bool) -> str | None:
        return None

    def default_template(self) -> str:
        return "{text}"

    def task_template(self, task: "Task") -> str:
        return task.template or " ".join("{%s}" % f for f in task.text_fields)

    def resolve(self, config: HeadConfig, template: "Template", *, tokenizer: Any, label_words: Sequence[str],
                causal: bool) -> HeadConfig:
        """The config with everything derived from the tokenizer and template filled in (and checked)."""
        return config

    def resolve_labels(self, task: "Task", splits: dict[str, list[dict]], tokenizer: Any, *, causal: bool,
                       log: Any = None) -> tuple["Task", dict[str, list[dict]]]:
        """The task's labels as this head can use them (a verbalizer drops colliding label words)."""
        return task, splits

    def metric(self, name: str) -> MetricSpec:
        for m in self.metrics:
            if name == m.name or name in m.aliases:
                return m
        raise ConfigError(f"metric {name!r} does not fit a {self.name} head; use one of "
                          f"{[m.name for m in self.metrics]}")

    def rows(self, logits: torch.Tensor, labels: torch.Tensor | None, lengths: Sequence[int]) -> list[Any]:
        """Per-row fp32 CPU scores: (C,) for a pooled head, (T, C) over the row's real length for per-token."""
        logits = logits.float().cpu()
        return [logits[j] if logits.dim() == 2 else logits[j, :n] for j, n in enumerate(lengths)]

    def record_from_text(self, task: "Task", text: str) -> dict:
        return {task.text_fields[0]: text}


def check_text_fields(task: "Task", rec: dict, source: str) -> None:
    """Every text field of the task is present and non-empty text (heads whose inputs are plain text)."""
    for f in task.text_fields:
        value = rec.get(f)
        if value is None:
            raise DataError(f"{source}: missing text field {f!r} (fields present: {sorted(rec)})")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{source}: text field {f!r} is empty")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def lm_head_of(lm: nn.Module) -> nn.Module:
    """The module that maps hidden states to vocabulary logits (``cls``, ``lm_head``)."""
    body = lm.base_model
    children = [m for name, m in lm.named_children() if m is not body and not isinstance(m, nn.modules.loss._Loss)]
    if len(children) != 1:
        raise ConfigError(f"cannot find the LM head of {type(lm).__name__}: it has {len(children)} candidate modules")
    return children[0]


class LMScores(nn.Module):
    """Vocabulary logits from the base's own (frozen) LM head, with Gemma-style final soft-capping."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self._lm_head: list[nn.Module] = [lm_head_of(base)]  # a list: the base's module, not this head's
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head[0](h)
        return self._cap(logits)

    def few_rows(self, h: torch.Tensor) -> torch.Tensor:
        """The same logits for a few rows (B, H) at once, as a decoding step asks: with a plain linear head the
        vocabulary matrix is the left operand (``W @ h.T``), which the CPU GEMM runs 2-4x faster than
        ``F.linear``'s layout for 2-16 rows of a large vocabulary (Gemma's 262k x 640 in fp32, 8 rows, 2 busy
        cores: 108-178 vs 402-456 ms); one row, or a head with hooks or another type (a routed LoRA, 4-bit),
        goes through the module as :meth:`forward` does."""
        head = self._lm_head[0]
        if h.dim() != 2 or h.shape[0] < 2 or type(head) is not nn.Linear or head._forward_hooks \
                or head._forward_pre_hooks:
            return self(h)
        logits = (head.weight @ h.t()).t()
        return self._cap(logits if head.bias is None else logits + head.bias)

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def record_rows_mask(batch: dict, rows: int, head: str, what: str, collate_as: str) -> torch.Tensor:
    """The (records, most rows) mask of a head whose record is several model rows (choices, windows),
    checked against the ``rows`` the body ran: an ensemble's replicated rows cannot be regrouped."""
    mask = batch.get("choice_mask")
    if mask is None:
        raise ConfigError(f"a {head} head scores batches of {what}: collate {collate_as} "
                          "(ptune.batching.collate builds choice_mask from them)")
    if int(mask.sum()) != rows:
        raise ConfigError(f"a {head} batch has {int(mask.sum())} {what} but the body ran {rows} rows; prompt "
                          f"ensembles cannot score {head}, train without --ensemble")
    return mask
