"""The contract between a method and the model: typed Protocols, and the identity base every adapter extends.

An adapter enters the model at three points of :class:`ptune.PtuneModel`'s forward path:
``inject`` (fill the virtual-token placeholders of the input embeddings: prompt tuning, P-Tuning),
``attention_kwargs`` (per-layer arguments for the attention function: deep prompts) and ``route``
(a context around one body call that tells per-row weight deltas which rows are whose: the mixed
batches of ``ptune.AdapterSet``). Methods that change weights (LoRA, AdaLoRA, QLoRA, BitFit, full
fine-tuning) act inside the base's modules and keep all three identities. ``trains_base`` says the base's own modules carry trainable weights
(so its dropout stays on); ``set_enabled`` switches the method off and on for
``PtuneModel.disable_adapter()``. Loop hooks (:class:`TrainingHooks`, AdaLoRA) and
:class:`PeftExportable` / :class:`ReloadHook` are optional and checked with ``isinstance``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Adapter(Protocol):
    trains_base: bool

    def inject(self, embeds: torch.Tensor, virtual_index: torch.Tensor,
               task_ids: torch.Tensor | None) -> torch.Tensor: ...  # (B, T, d) -> (B, T, d)

    def attention_kwargs(self, batch_size: int, task_ids: torch.Tensor | None) -> dict[str, Any]: ...

    def route(self, task_ids: torch.Tensor | None) -> AbstractContextManager: ...  # around one body call

    def set_enabled(self, enabled: bool) -> None: ...


@runtime_checkable
class TrainingHooks(Protocol):
    """Adapters the training loop must drive (AdaLoRA's rank budget)."""

    def set_total_steps(self, total: int) -> None: ...  # before the first step
    def extra_loss(self) -> torch.Tensor: ...  # added to every training loss
    def after_optimizer_step(self, step: int) -> None: ...  # after optimizer.step(), before zero_grad()


@runtime_checkable
class PeftExportable(Protocol):
    def peft_export(self, facts: Any) -> tuple[dict, dict[str, torch.Tensor]]: ...  # (PEFT config, tensors)


@runtime_checkable
class ReloadHook(Protocol):
    def after_load(self) -> None: ...  # state derived from loaded tensors (AdaLoRA's rank pattern)


class IdentityHooks(nn.Module):
    """Every hook an identity, nothing to switch off: the base of every adapter."""

    trains_base = False
    keeps_base_dropout = False  # whether the base's own dropout stays on in training (BitFit, full: their weights train)
    first_layer = 0  # the lowest transformer layer the method acts in (0: the input or every layer; see ptune.frozen)

    def inject(self, embeds: torch.Tensor, virtual_index: torch.Tensor, task_ids: Any) -> torch.Tensor:
        return embeds

    def attention_kwargs(self, batch_size: int, task_ids: Any) -> dict[str, Any]:
        return {}

    def route(self, task_ids: Any) -> AbstractContextManager:
        """Weight deltas that act on some rows only would learn here which rows (per-row LoRA / bias)."""
        return nullcontext()

    def set_enabled(self, enabled: bool) -> None:
        """Input-side and deep prompts need nothing here: a disabled model skips every hook."""
