"""The low-rank layer under LoRA, AdaLoRA and QLoRA, and its per-row form for mixed-adapter batches.

:class:`LowRankLayer` wraps a frozen linear-like layer (``nn.Linear``, transformers' ``Conv1D``,
bitsandbytes' 4/8-bit layers) with a trainable branch that a method defines (``update``);
:class:`MultiLowRankLayer` holds several adapters' branches on one base layer, each applied to its
own rows (batched multi-LoRA, as vLLM / punica do). It sits below the method modules and the target
discovery (``targets.py``), which read its layer helpers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' 4/8-bit layers subclass it) or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def layer_dims(name: str, layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if type(layer).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise ConfigError(f"{name} is a {type(layer).__name__}; LoRA wraps linear layers only, so pick target_modules "
                      "that name linear layers (e.g. query, value, q_proj, c_attn)")


class LowRankLayer(nn.Module):
    """A frozen linear-like layer plus a trainable low-rank branch (shared by LoRA and AdaLoRA)."""

    def __init__(self, name: str, base_layer: nn.Module, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_dims(name, base_layer)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.transposed = type(base_layer).__name__ == "Conv1D"
        self.merged = False
        self.disabled = False  # PtuneModel.disable_adapter(): the frozen layer alone

    @property
    def weight(self) -> torch.Tensor:  # for code that reads ``layer.weight`` (dtype, device checks)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        raise NotImplementedError

    def update(self, h: torch.Tensor) -> torch.Tensor:  # h (..., in) -> (..., out)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            if self.disabled:
                raise ConfigError("the low-rank update is merged into the weights and cannot be switched off; "
                                  "unmerge() first")
            return y
        if self.disabled:
            return y
        return y + self.update(self.dropout(x).to(self.lora_A.dtype)).to(y.dtype)

    def _add_to_weight(self, sign: float) -> None:
        w = self.base_layer.weight
        if not w.is_floating_point():
            raise ConfigError("cannot merge a low-rank update into a quantized layer; load the base unquantized "
                              "(without --quantize) and put the saved adapter on it, then merge")
        delta = self.delta_weight().to(w.dtype)
        with torch.no_grad():
            w.add_(sign * (delta.T if self.transposed else delta))

    def merge(self, keep_original: bool = False) -> None:
        """W += the update. ``keep_original``: keep a copy of W so that unmerge() restores it bit for bit
        (an inference-merged Run switched off with disable_adapter() computes exactly the base)."""
        if not self.merged:
            if keep_original:
                self._original = self.base_layer.weight.detach().clone()  # a plain attribute: not saved
            self._add_to_weight(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            original = self.__dict__.pop("_original", None)
            if original is None:
                self._add_to_weight(-1.0)
            else:
                with torch.no_grad():
                    self.base_layer.weight.copy_(original)
            self.merged = False


class MultiLowRankLayer(nn.Module):
    """One frozen linear-like layer shared by several low-rank branches, each applied to its own rows.

    Batched multi-LoRA serving (``ptune.AdapterSet``): y = W x + sum over branches a of
    mask_a * update_a(x), where ``update_a`` is a :class:`LowRankLayer`'s branch (LoRA, AdaLoRA,
    QLoRA) computed on branch a's rows only. ``branches`` maps a key to a layer built on this same
    base layer (only its ``update`` and ``dropout`` are used; it is kept in a plain dict, so its
    tensors are not registered as the base's parameters). ``route`` lists, for the forward call in
    progress, (key, rows) pairs, rows being a slice of the batch (cheapest: a view, updated in place
    under ``torch.no_grad``), a tensor of row indices, or None for every row; rows routed to no
    branch get W x alone.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.branches: dict[str, LowRankLayer] = {}
        self.route: list[tuple[str, slice | torch.Tensor | None]] = []

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for key, rows in self.route:
            branch = self.branches.get(key)
            if branch is None or branch.disabled:
                continue
            h = x if rows is None else x[rows]
            delta = branch.update(branch.dropout(h).to(branch.lora_A.dtype)).to(y.dtype)
            if rows is None:
                y = y + delta
            elif isinstance(rows, slice) and not torch.is_grad_enabled():
                y[rows] += delta  # a fresh output, no graph to keep: add in place on the rows' view
            else:
                index = rows if isinstance(rows, torch.Tensor) else torch.arange(y.shape[0], device=y.device)[rows]
                y = y.index_add(0, index, delta)
        return y
