"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685).

Each targeted linear layer computes W x + (alpha / r) B A dropout(x), with A (r x in) initialised
like HF PEFT (Kaiming-uniform) and B (out x r) at zero, so the adapted model starts equal to the
base. The update can be merged into W (and unmerged), or merged for good with ``merge_and_unload``.
Targets: module-name suffixes (default: the attention query and value projections, as the paper)
or a regular expression written ``"re:<pattern>"``. Handles ``nn.Linear``, transformers' ``Conv1D``
(GPT-2, weight stored transposed) and bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (QLoRA).
Omitted: per-row LoRA pairs for mixed-task batches, LoRA on embeddings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..templates import Template

DEFAULT_TARGETS = {"bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
                   "electra": ("query", "value"), "distilbert": ("q_lin", "v_lin"), "gpt2": ("c_attn",)}
FALLBACK_TARGETS = ("q_proj", "v_proj")  # Llama, Gemma, Qwen, Mistral, ...


def no_virtual_tokens(method: str, task_template: Template) -> Template:
    if task_template.num_virtual_tokens:
        raise ConfigError(f"{method} trains weights, not prompts; remove the [P] markers from template "
                          f"{task_template.source!r} (or use p_tuning)")
    return task_template


@dataclass(frozen=True)
class LoraConfig:
    method: ClassVar[str] = "lora"
    default_lr: ClassVar[float] = 5e-4  # learning rate when --lr is not given
    r: int = 8  # rank of the update
    alpha: float = 16.0  # scaling numerator: the update is multiplied by alpha / r
    dropout: float = 0.0  # on the LoRA branch's input
    target_modules: tuple[str, ...] | None = None  # name suffixes, or "re:<regex>"; None: per architecture

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r={self.r!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.target_modules is not None:
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
            if not targets:
                raise ConfigError("target_modules is empty; name at least one module or leave it unset")
            object.__setattr__(self, "target_modules", targets)

    def template_for(self, task_template: Template) -> Template:
        return no_virtual_tokens(self.method, task_template)


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    if type(layer).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
        return layer.weight.shape[0], layer.weight.shape[1]
    raise ConfigError(f"LoRA cannot wrap a {type(layer).__name__}; target linear layers")


class LoraLinear(nn.Module):
    """A frozen linear-like layer plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_f, out_f = layer_dims(base_layer)
        self.lora_A = nn.Parameter(torch.empty(r, in_f))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.transposed = type(base_layer).__name__ == "Conv1D"

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        return y + ((h @ self.lora_A.T) @ self.lora_B.T * self.scaling).to(y.dtype)

    def _add_to_weight(self, sign: float) -> None:
        w = self.base_layer.weight
        if not w.is_floating_point():
            raise ConfigError("cannot merge LoRA into a quantized layer; dequantize the base first")
        delta = self.delta_weight().to(w.dtype)
        with torch.no_grad():
            w.add_(sign * (delta.T if self.transposed else delta))

    def merge(self) -> None:
        if not self.merged:
            self._add_to_weight(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False


def find_targets(base: nn.Module, targets: tuple[str, ...] | None, method: str) -> list[str]:
    """Names of the modules to wrap; a clear error if none match."""
    model_type = getattr(base.config, "model_type", "")
    targets = targets or DEFAULT_TARGETS.get(model_type, FALLBACK_TARGETS)
    names = []
    for name, module in base.named_modules():
        if isinstance(module, LoraLinear) or ".base_layer" in name:
            continue
        for t in targets:
            hit = re.fullmatch(t[3:], name) if t.startswith("re:") else (name == t or name.endswith("." + t))
            if hit:
                names.append(name)
                break
    if not names:
        sample = [n for n, m in base.named_modules() if n and not list(m.children())][:8]
        raise ConfigError(f"{method}: target_modules {list(targets)} match no module of {type(base).__name__}; "
                          f"its layers are named like {sample}")
    return names


def wrap_layers(base: nn.Module, names: list[str], make: Any) -> list[str]:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, make(name, getattr(parent, child)))
    return names


class LoraAdapter(nn.Module):
    """Bookkeeping for LoRA layers living inside the base (their parameters belong to the base)."""

    trains_base = True  # the base's own layers carry trainable weights: keep its dropout on

    def __init__(self, config: LoraConfig, base: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.config = config
        self.names = names
        self._base = [base]  # a plain list: not a submodule, so parameters are not registered twice

    def layers(self) -> dict[str, LoraLinear]:
        return {n: self._base[0].get_submodule(n) for n in self.names}

    def inject(self, embeds: torch.Tensor, virtual_index: torch.Tensor, task_ids: Any) -> torch.Tensor:
        return embeds

    def attention_kwargs(self, batch_size: int, task_ids: Any) -> dict:
        return {}

    def merge(self) -> None:
        for layer in self.layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers().values():
            layer.unmerge()

    def peft_export(self, facts: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        cfg = {"peft_type": "LORA", "r": self.config.r, "lora_alpha": self.config.alpha,
               "lora_dropout": self.config.dropout, "bias": "none",
               "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.names}),
               "fan_in_fan_out": any(layer.transposed for layer in self.layers().values())}
        tensors = {}
        for name, layer in self.layers().items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().clone()
        return cfg, tensors


def apply_lora(base: nn.Module, config: LoraConfig, **_: Any) -> LoraAdapter:
    names = find_targets(base, config.target_modules, config.method)
    for name in names:
        in_f, out_f = layer_dims(base.get_submodule(name))
        if config.r > min(in_f, out_f):
            raise ConfigError(f"r={config.r} exceeds the width of {name} ({in_f} -> {out_f}); "
                              f"use r <= {min(in_f, out_f)}")
    wrap_layers(base, names, lambda _, layer: LoraLinear(layer, config.r, config.alpha, config.dropout))
    return LoraAdapter(config, base, names)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA update into its layer and put the plain layers back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)
    return model


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """LoRA on a 4-bit NF4 base (load it with ``quantize="nf4"`` / ``--quantize nf4``)."""

    method: ClassVar[str] = "qlora"


def apply_qlora(base: nn.Module, config: QLoraConfig, **kwargs: Any) -> LoraAdapter:
    if not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in base.modules()):
        raise ConfigError("qlora expects a quantized base: pass --quantize nf4 (or load_base(..., quantize='nf4')); "
                          "for an unquantized base use lora")
    return apply_lora(base, config, **kwargs)
