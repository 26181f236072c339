"""One adapter, several tasks: per-task (or shared) prompts and one head per task on one frozen base.

P-Tuning v2's multi-task prompt pre-training and Lester et al.'s mixed-task batches: every row of a
batch carries its task's index; the adapter picks that task's prompt table (``prompt_index``: all 0
with ``share_prompt``), the body runs once for the whole batch, and each task's rows go through
that task's own head (classification, tagging and verbalizer heads side by side). The loss is the
row-weighted mean of the tasks' losses. Weight methods (LoRA, BitFit, ...) have no per-task tables:
every task shares them and keeps its own head.

``MultiTaskModel.view(name)`` is a plain :class:`PtuneModel` for one task (the same base, adapter
and head objects, rows fixed to that task's prompt table): evaluation, prediction and ``Run`` use it
unchanged. The spec (:class:`ptune.spec.MultiTaskSpec`) lists each task's resolved spec and is
saved as format 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .assembly import attach_adapter, base_spec_of, build_head, resolve_spec
from .errors import ConfigError
from .heads import HeadConfig, HeadKind, head_kind
from .model import Output, PtuneModel
from .models import arch_facts, fullest_base_kind
from .spec import MultiTaskSpec, RunSpec



@dataclass(frozen=True)
class TaskPart:
    """What :func:`apply_multitask` needs per task (the same arguments ``ptune.apply`` takes for one)."""

    task: Any  # a ptune.data.Task (its name keys the head)
    head: HeadConfig
    template: str | None = None
    max_length: int | None = None


class MultiHeadModel(PtuneModel):
    """``base`` + one adapter + ``head``: a ModuleDict of several heads. Every row of a batch names its
    head (``task_index`` (B,), an index into ``names``): the body runs once for the whole batch through
    :meth:`PtuneModel.hidden_states` (the adapter's hooks see ``table_ids(task_index)``), and each head
    scores its own rows. Subclasses: :class:`MultiTaskModel` (one adapter trained on several tasks) and
    ``ptune.adapter_set.SetModel`` (separately trained adapters, each row through its own)."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.head.keys())

    @property
    def kinds(self) -> tuple[HeadKind, ...]:
        """The head kind of each head, in ``names`` order."""
        raise NotImplementedError

    def task_table_ids(self, task_index: torch.Tensor) -> torch.Tensor | None:
        """What the adapter's hooks get as ``task_ids`` for rows of these heads."""
        return task_index

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                virtual_index: torch.Tensor | None = None, task_index: torch.Tensor | None = None,
                labels: Sequence[torch.Tensor | None] | None = None, label_position: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, choice_mask: torch.Tensor | None = None,
                choice_tokens: torch.Tensor | None = None, **_: Any) -> Output:
        """A batch whose rows may belong to different heads (``task_index`` (B,)). ``labels``: per head, the
        targets of that head's rows in batch order (None for a head with no rows). Returns the per-head
        logits as a list (None where a head has no rows) and the row-weighted mean loss. A batch of a
        head whose record is several rows (``choice_mask``) holds that head's rows only."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if task_index is None:
            raise ConfigError(f"a batch for several heads needs task_index (the head of each row, one of {self.names})")
        B = input_ids.shape[0]
        hidden = self.hidden_states(input_ids, attention_mask, virtual_index, self.task_table_ids(task_index),
                                    position_ids)
        logits: list[torch.Tensor | None] = []
        loss = None
        for t, name in enumerate(self.names):
            rows = (task_index == t).nonzero().squeeze(1)
            if rows.numel() == 0:
                logits.append(None)
                continue
            if choice_mask is not None and rows.numel() != B:
                raise ConfigError(f"head {name!r} scores several rows per record; its rows need a batch of their own")
            part = self.head_batch(attention_mask[rows], label_position[rows] if label_position is not None else None,
                                   choice_mask, choice_tokens[rows] if choice_tokens is not None else None)
            with self._route(task_index[rows]):  # a head on the base's own layers (a verbalizer's LM head)
                scores = self.head[name](hidden[rows], part)
            logits.append(scores)
            if labels is not None and labels[t] is not None:
                term = self.head[name].loss(scores, labels[t]) * (rows.numel() / B)
                loss = term if loss is None else loss + term
        return Output(logits, loss)  # type: ignore[arg-type]


class MultiTaskModel(MultiHeadModel):
    """``base`` + one adapter (a prompt table per task, or one shared) + ``head``: a ModuleDict of
    one head per task, keyed by task name."""

    def __init__(self, base: nn.Module, adapter: Any, heads: dict[str, nn.Module], spec: MultiTaskSpec) -> None:
        super().__init__(base, adapter, nn.ModuleDict(heads), spec)
        # plain list: the views share this model's modules and must not register them twice
        self.views = [PtuneModel(base, adapter, heads[t.task.name], t, prompt_index=i)
                      for t, i in zip(spec.tasks, spec.prompt_index)]

    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.names

    @property
    def kinds(self) -> tuple[HeadKind, ...]:
        return tuple(head_kind(t.head.kind) for t in self.spec.tasks)

    def view(self, name: str) -> PtuneModel:
        """The single-task model for ``name`` (shares every module with this one)."""
        self.spec.task(name)  # a clear error for an unknown name
        return self.views[self.names.index(name)]

    def train(self, mode: bool = True) -> "MultiTaskModel":
        super().train(mode)
        for v in getattr(self, "views", ()):
            v.training = mode
        return self

    def task_table_ids(self, task_index: torch.Tensor) -> torch.Tensor | None:
        """Each task's prompt table (None: every task shares table 0)."""
        if self.spec.share_prompt:
            return None
        return torch.tensor(self.spec.prompt_index, device=task_index.device)[task_index]

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise ConfigError(f"a multi-task adapter generates through one task's view: "
                          f"model.view(name).generate(...), name one of {', '.join(self.names)}")


def base_kind_for(heads: Sequence[HeadConfig], is_encoder: bool) -> str:
    """The one transformers class that can serve every head (an LM class also gives the bare body)."""
    return fullest_base_kind({head_kind(h.kind).base_kind(is_encoder) for h in heads})


def apply_multitask(base: nn.Module, config: Any, parts: Sequence[TaskPart], *, tokenizer: Any = None,
                    share_prompt: bool = False) -> MultiTaskModel:
    """Freeze ``base``, attach the method with one prompt table per task (``config.num_tasks`` must
    be the number of tasks, or 1 with ``share_prompt`` / a method without prompt tables) and a head
    per task."""
    if len(parts) < 2:
        raise ConfigError("a multi-task model needs at least two tasks; use ptune.apply for one")
    tables = getattr(config, "num_tasks", 1)
    if share_prompt or not hasattr(config, "num_tasks"):
        if tables != 1:
            raise ConfigError(f"a shared prompt is one table: num_tasks must be 1, not {tables}")
        index = (0,) * len(parts)
    else:
        if tables != len(parts):
            raise ConfigError(f"{len(parts)} tasks with a prompt each need num_tasks={len(parts)}, not {tables}")
        index = tuple(range(len(parts)))
    for p in parts:
        if head_kind(p.head.kind).multi_row:
            raise ConfigError(f"task {p.task.name}: a {p.head.kind} head scores several rows per record and cannot "
                              "share multi-task batches; train it as a task of its own")
    kind = base_kind_for([p.head for p in parts], arch_facts(base).is_encoder)
    base_spec = base_spec_of(base, kind)
    specs = tuple(resolve_spec(base_spec, config, head=p.head, template=p.template, tokenizer=tokenizer,
                               labels=p.task.labels, label_words=p.task.words(), task=p.task,
                               max_length=p.max_length) for p in parts)
    return _build(base, MultiTaskSpec(specs, index), tokenizer)


def multitask_from_spec(spec: MultiTaskSpec, base: nn.Module, tokenizer: Any = None) -> MultiTaskModel:
    """A fresh multi-task model (untrained adapter) from a saved spec, on ``base``."""
    base_spec = base_spec_of(base, spec.base.kind)
    parts = [resolve_spec(base_spec, t.method_config, head=t.head, template=t.template.source, tokenizer=tokenizer,
                          labels=t.labels, label_words=t.label_words or None, task=t.task, max_length=t.max_length)
             for t in spec.tasks]
    return _build(base, MultiTaskSpec(tuple(parts), spec.prompt_index), tokenizer)


def _build(base: nn.Module, spec: MultiTaskSpec, tokenizer: Any) -> MultiTaskModel:
    counts = {t.task.name: t.template.num_virtual_tokens for t in spec.tasks}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"the tasks' templates must hold the same number of virtual tokens to share one "
                          f"prompt layout; they hold {counts}")
    first: RunSpec = spec.tasks[0]
    adapter = attach_adapter(base, first, tokenizer)
    heads = {t.task.name: build_head(t, base) for t in spec.tasks}
    return MultiTaskModel(base, adapter, heads, spec)
