"""Separately trained adapters as one multi-adapter model: every row through its own adapter and head.

:class:`SetAdapter` meets the same :class:`~ptune.methods.base.Adapter` hooks a single method does, with
``task_ids`` naming each row's member (its index in the set), so :class:`SetModel` scores a mixed batch
through :class:`~ptune.multitask.MultiHeadModel`'s forward, i.e. ``PtuneModel.hidden_states``, the one
forward path of training and evaluation:

- ``inject``: input prompts (prompt tuning, P-Tuning): each member fills the placeholders of its rows;
- ``attention_kwargs``: deep prompts (P-Tuning v2, prefix tuning): every row's prefix is padded to the
  batch's longest and the padded prefix keys are masked per row (``ptune_prefix_mask`` of
  ``prefix_attention``); rows of other methods get an all-masked prefix, i.e. exactly the base's attention;
- ``route``: LoRA / AdaLoRA / QLoRA: each targeted layer is wrapped once by a
  :class:`~ptune.methods.low_rank.MultiLowRankLayer` whose branches act on their own rows (y = W x +
  sum_a mask_a * scale_a B_a A_a x, as batched multi-LoRA serving does); BitFit: trained biases kept as
  per-row deltas (trained minus the base's), added to the output of their layer on that member's rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..heads import HeadKind
from ..methods.base import IdentityHooks
from ..methods.low_rank import LowRankLayer, MultiLowRankLayer
from ..methods.prompt_tuning import scatter_prompts
from ..multitask import MultiHeadModel

@dataclass
class Member:
    """One adapter of the set: its spec and task, template encoder, head, and what it routes per row."""

    name: str
    path: Path
    spec: Any
    task: Any
    kind: HeadKind
    encoder: Any  # TemplateEncoder
    adapter: nn.Module
    head: nn.Module
    trainable: int
    bf16: bool = False  # its run trained (and Run scores it) under bf16 autocast
    prompts: torch.Tensor | None = None  # (num_tasks, N, d) input prompts, computed once
    prefix: torch.Tensor | None = None  # (L, 2, Hkv, P, D) deep prompts, computed once
    prefix_layers: torch.Tensor | None = None  # (L,) bool: the layers holding a prefix (a layer range); None: all
    branches: dict[str, LowRankLayer] = field(default_factory=dict)  # layer name -> low-rank branch
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> trained - base bias


def member_rows(task_ids: torch.Tensor | None, count: int) -> list[tuple[int, Any]]:
    """(member index, its rows) for each member present in ``task_ids`` (B,): a slice where its rows are
    contiguous (the scorer puts each member's rows side by side), else their indices; None where one
    member has every row. ``task_ids`` None: every row is member 0 (a set of one). A negative id is a
    row of no member: the bare base (decoding serves it beside the adapters)."""
    if task_ids is None:
        return [(0, None)] if count else []
    ids = task_ids.tolist()
    if ids and all(i == ids[0] for i in ids):
        return [(ids[0], None)] if ids[0] >= 0 else []
    out = []
    for t in sorted(i for i in set(ids) if i >= 0):
        first, last = ids.index(t), len(ids) - 1 - ids[::-1].index(t)
        if last - first + 1 == ids.count(t):
            out.append((t, slice(first, last + 1)))
        else:
            out.append((t, (task_ids == t).nonzero().squeeze(1)))
    return out


class SetAdapter(IdentityHooks):
    """The members' per-row parts behind the adapter hooks (see the module doc). ``members`` is the set's
    own ordered dict: a row's ``task_ids`` entry is its member's position in it."""

    def __init__(self, members: dict[str, Member]) -> None:
        super().__init__()
        self.members = members
        self.wrappers: dict[str, MultiLowRankLayer] = {}  # layer name -> the one wrapper on it
        self.bias_hooks: dict[str, Any] = {}  # module name -> forward hook handle
        self._bias_route: dict[str, list[tuple[Any, torch.Tensor]]] = {}
        self._kwargs_memo: tuple[Any, dict[str, Any]] | None = None  # the last batch composition's prefix arguments

    def _present(self, task_ids: torch.Tensor | None, count: int) -> list[tuple[Member, Any]]:
        order = list(self.members.values())
        return [(order[t], rows) for t, rows in member_rows(task_ids, count)]

    def inject(self, embeds: torch.Tensor, virtual_index: torch.Tensor, task_ids: Any) -> torch.Tensor:
        for m, rows in self._present(task_ids, embeds.shape[0]):
            if m.prompts is None:
                continue
            vi = virtual_index if rows is None else virtual_index[rows]
            if not bool((vi >= 0).any()):
                continue
            filled = scatter_prompts(embeds if rows is None else embeds[rows], vi, m.prompts, None)
            if rows is None:
                embeds = filled
            elif torch.is_grad_enabled():
                embeds = embeds.index_copy(0, _index(rows, embeds), filled)
            else:
                embeds[rows] = filled  # the embedding's fresh output, no graph to keep
        return embeds

    def attention_kwargs(self, batch_size: int, task_ids: Any) -> dict[str, Any]:
        if torch.is_grad_enabled():
            return self._attention_kwargs(batch_size, task_ids)
        # decoding calls this every step with the same rows: the padded prefixes are built once per batch
        # composition (and rebuilt when a member's prefix tensor is replaced: a member added or removed)
        key = (batch_size, None if task_ids is None else tuple(task_ids.tolist()),
               tuple((n, id(m.prefix), id(m.prefix_layers)) for n, m in self.members.items()))
        if self._kwargs_memo is None or self._kwargs_memo[0] != key:
            self._kwargs_memo = (key, self._attention_kwargs(batch_size, task_ids))
        return self._kwargs_memo[1]

    def _attention_kwargs(self, batch_size: int, task_ids: Any) -> dict[str, Any]:
        present = self._present(task_ids, batch_size)
        parts = [(rows, m.prefix) for m, rows in present if m.prefix is not None]
        if not parts:
            return {}
        ranged = [(rows, m.prefix_layers) for m, rows in present if m.prefix_layers is not None]
        if len(parts) == 1 and parts[0][0] is None:  # one adapter for the whole batch
            prefix = parts[0][1]
            extra = {"ptune_prefix": prefix.unsqueeze(0).expand(batch_size, *prefix.shape)}
            if ranged:
                extra["ptune_prefix_layers"] = ranged[0][1].unsqueeze(0).expand(batch_size, -1)
            return extra
        longest = max(p.shape[-2] for _, p in parts)
        L, two, H, _, D = parts[0][1].shape
        prefix = parts[0][1].new_zeros(batch_size, L, two, H, longest, D)
        keep = torch.zeros(batch_size, longest, dtype=torch.bool, device=prefix.device)
        for rows, p in parts:
            P = p.shape[-2]
            prefix[_all(rows), :, :, :, :P] = p
            keep[_all(rows), :P] = True
        extra = {"ptune_prefix": prefix}
        if not bool(keep.all()):
            extra["ptune_prefix_mask"] = keep
        if ranged:  # rows of a layer-ranged adapter see no prefix outside its layers
            on = torch.ones(batch_size, L, dtype=torch.bool, device=prefix.device)
            for rows, layers in ranged:
                on[_all(rows)] = layers
            extra["ptune_prefix_layers"] = on
        return extra

    @contextmanager
    def route(self, task_ids: Any) -> Iterator[None]:
        """Route rows to the members' low-rank branches and bias deltas for one forward call."""
        count = int(task_ids.shape[0]) if task_ids is not None else 1
        present = [(m.name, m, rows) for m, rows in self._present(task_ids, count)]
        for wrapper in self.wrappers.values():
            wrapper.route = [(name, rows) for name, _, rows in present if name in wrapper.branches]
        route: dict[str, list] = {}
        for _, m, rows in present:
            for module_name, delta in m.bias_deltas.items():
                route.setdefault(module_name, []).append((rows, delta))
        self._bias_route = route
        try:
            yield
        finally:
            for wrapper in self.wrappers.values():
                wrapper.route = []
            self._bias_route = {}

    def bias_hook(self, module_name: str) -> Any:
        """A forward hook adding the routed members' bias deltas to their rows of the module's output."""
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            route = self._bias_route.get(module_name)
            if not route:
                return None
            for rows, delta in route:
                d = delta.to(output.dtype)
                if rows is None:
                    output = output + d
                elif torch.is_grad_enabled():
                    index = _index(rows, output)
                    output = output.index_add(0, index, d.expand(len(index), *output.shape[1:]))
                else:
                    output[rows] += d  # the layer's fresh output: add in place on the rows' view
            return output
        return hook


def _all(rows: Any) -> Any:
    return slice(None) if rows is None else rows


def _index(rows: Any, like: torch.Tensor) -> torch.Tensor:
    return rows if isinstance(rows, torch.Tensor) else torch.arange(like.shape[0], device=like.device)[rows]


class SetModel(MultiHeadModel):
    """The set's base, its :class:`SetAdapter` and one head per member (``head``, keyed by member name,
    in the set's order). It has no single spec (``spec`` is None): each member's is in ``adapter.members``."""

    def __init__(self, base: nn.Module, adapter: SetAdapter) -> None:
        super().__init__(base, adapter, nn.ModuleDict(), None)  # type: ignore[arg-type]

    @property
    def kinds(self) -> tuple[HeadKind, ...]:
        return tuple(m.kind for m in self.adapter.members.values())

    def train(self, mode: bool = True) -> "SetModel":
        return super().train(False)  # the set scores only: every module stays in eval mode
