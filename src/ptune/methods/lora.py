"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685).

Each targeted linear layer computes W x + (alpha / r) B A dropout(x), with A (r x in) initialised
like HF PEFT (Kaiming-uniform, a = sqrt 5) and B (out x r) at zero, so the adapted model starts
equal to the base. The LoRA tensors live inside the base's modules (``<layer>.lora_A``), so saving
the trainable parameters saves them by name; the adapter object ptune holds only points at them.
The update can be merged into W and unmerged, or merged for good with ``merge_and_unload``.

Targets: module-name suffixes (default: the attention query and value projections, as the paper:
from ptune's table, or found by name and shape for an architecture it has no entry for, see
:mod:`ptune.methods.targets`),
a regular expression written ``"re:<pattern>"`` (full match, as PEFT), or ``"all-linear"`` (every
linear layer but the output head, as QLoRA). Wraps ``nn.Linear``, transformers' ``Conv1D`` (GPT-2,
weight stored transposed) and bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (QLoRA); quantized
layers cannot be merged. Per-row LoRA for mixed-adapter batches: :class:`MultiLowRankLayer` holds
several adapters' branches on one base layer, each applied to its own rows (used by
``ptune.AdapterSet``). Omitted: LoRA on embeddings and convolutions, DoRA / rsLoRA / PiSSA
initialisations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..models import arch_facts
from ..templates import Template
from .base import IdentityHooks
from .layers import check_layers, module_layers, resolve_layers
from .low_rank import LowRankLayer, MultiLowRankLayer, is_linear_like, layer_dims  # noqa: F401  (re-exported)
from .targets import discover_targets

# attention query / value projections per architecture (the LoRA paper's choice)
DEFAULT_TARGETS = {"bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
                   "electra": ("query", "value"), "camembert": ("query", "value"),
                   "distilbert": ("q_lin", "v_lin"), "gpt2": ("c_attn",),
                   "t5": ("q", "v"), "mt5": ("q", "v")}  # T5: in encoder self-, decoder self- and cross-attention
# any other architecture (Llama, Qwen, Phi, Falcon, DeBERTa, ALBERT, ...): found from its own modules (targets.py)
ALL_LINEAR = "all-linear"


def no_virtual_tokens(method: str, task_template: Template) -> Template:
    if task_template.num_virtual_tokens:
        raise ConfigError(f"{method} trains weights, not prompts; remove the [P] markers from template "
                          f"{task_template.source!r} (or use p_tuning)")
    return task_template


def normalize_targets(targets: Any) -> tuple[str, ...] | None:
    """``target_modules`` as a tuple (a lone string is one target); regexes are checked here."""
    if targets is None:
        return None
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ConfigError("target_modules is empty; name at least one module or leave it unset")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise ConfigError(f"target_modules entry {t!r} is not a valid regular expression ({e})") from e
    return targets


@dataclass(frozen=True)
class LoraConfig:
    method: ClassVar[str] = "lora"
    renamed: ClassVar[dict[str, str]] = {"dropout": "lora_dropout"}  # older option names (format-1 adapters)
    default_lr: ClassVar[float] = 5e-4  # learning rate when --lr is not given
    r: int = 8
    """rank of the update"""
    alpha: float = 16.0
    """scaling numerator: the update is multiplied by alpha / r"""
    lora_dropout: float = 0.0
    """dropout on the LoRA branch's input (PEFT's lora_dropout)"""
    target_modules: tuple[str, ...] | None = None
    """suffixes, "re:<regex>" or "all-linear"; None: per architecture"""
    layers: str | None = None
    """transformer layers that get LoRA: 'top:6', '7-12' (1-based, inclusive), '1,3'; None = all. Layers below the lowest one run without a backward pass, and their outputs can be cached (ptune.frozen)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", check_layers(self.layers))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"r={self.r!r} must be a positive integer")
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r} must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        object.__setattr__(self, "target_modules", normalize_targets(self.target_modules))

    def template_for(self, task_template: Template) -> Template:
        return no_virtual_tokens(self.method, task_template)


class LoraLinear(LowRankLayer):
    """W x + (alpha / r) B A dropout(x); A (r, in) Kaiming-uniform, B (out, r) zero."""

    def __init__(self, name: str, base_layer: nn.Module, r: int, alpha: float, dropout: float) -> None:
        super().__init__(name, base_layer, dropout)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear(in, r), as PEFT
        self.scaling = alpha / r

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def update(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.lora_A.T) @ self.lora_B.T * self.scaling


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def find_targets(base: nn.Module, targets: tuple[str, ...] | None, method: str) -> list[str]:
    """Names of the modules to wrap, in model order; a clear error if none match."""
    return resolve_targets(base, targets, method)[0]


def resolve_targets(base: nn.Module, targets: tuple[str, ...] | None, method: str) -> tuple[list[str], str | None]:
    """(names of the modules to wrap, a line saying how they were found when ptune had to find them).

    The user's targets win; then ptune's table; an architecture it has no entry for gets its attention
    query/value projections found by name and shape (:func:`ptune.methods.targets.discover_targets`).
    """
    model_type = getattr(base.config, "model_type", "")
    if not targets and model_type not in DEFAULT_TARGETS:
        return discover_targets(base, method)
    return match_targets(base, targets or DEFAULT_TARGETS[model_type], method), None


def match_targets(base: nn.Module, targets: tuple[str, ...], method: str) -> list[str]:
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    inside = tuple(n + "." for n, m in base.named_modules() if isinstance(m, LowRankLayer))
    names = []
    for name, module in base.named_modules():
        if not name or name.startswith(inside) or isinstance(module, LowRankLayer):
            continue
        if ALL_LINEAR in targets and is_linear_like(module) and module is not head:
            names.append(name)
        elif any(_matches(name, t) for t in targets if t != ALL_LINEAR):
            layer_dims(name, module)  # a clear error for a non-linear match
            names.append(name)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if is_linear_like(m)})
        example = next((n for n, m in base.named_modules() if is_linear_like(m)), "")
        raise ConfigError(f"{method}: target_modules {list(targets)} match no module of {type(base).__name__}; "
                          f"its linear layers are named {linear[:12]} (full names like {example!r}); "
                          "give name suffixes, 're:<regex>' or 'all-linear'")
    return names


def in_layers(base: nn.Module, names: list[str], layers: str | None, method: str) -> tuple[list[str], int]:
    """``names`` kept to the modules inside the chosen layers, and the lowest layer they touch
    (0 when some target sits outside every layer, e.g. a pooler, or when all layers are chosen)."""
    if layers is None:
        return names, 0
    chosen = resolve_layers(layers, arch_facts(base).num_layers)
    where = module_layers(base)
    kept = [n for n in names if where.get(id(base.get_submodule(n))) in chosen]
    if not kept:
        raise ConfigError(f"{method}: none of the target modules lies in layers={layers!r}; pick other layers or "
                          "target_modules")
    return kept, min(where[id(base.get_submodule(n))] for n in kept)


def check_rank(base: nn.Module, names: list[str], r: int, field: str) -> None:
    for name in names:
        in_f, out_f = layer_dims(name, base.get_submodule(name))
        if r > min(in_f, out_f):
            raise ConfigError(f"{field}={r} exceeds the width of {name} ({in_f} -> {out_f}); "
                              f"use {field} <= {min(in_f, out_f)} or leave that layer out of target_modules")


def wrap_layers(base: nn.Module, names: list[str], make: Callable[[str, nn.Module], nn.Module]) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, make(name, getattr(parent, child)))


def peft_targets(base: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT ``target_modules`` that select exactly ``names``: their suffixes, or else a regex of the names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    hits = {n for n, m in base.named_modules() if isinstance(m, LowRankLayer)
            or (is_linear_like(m) and any(n == s or n.endswith("." + s) for s in suffixes))}
    hits -= {n for n in hits if n.endswith(".base_layer")}
    return suffixes if hits == set(names) else "(" + "|".join(re.escape(n) for n in names) + ")"


def peft_task_type(base: nn.Module) -> dict:
    """A bare transformer body (ptune's own head sits on top) is a feature extractor to PEFT."""
    body = getattr(base, "base_model", None)
    return {"task_type": "FEATURE_EXTRACTION"} if body is None or body is base else {}


class WeightAdapter(IdentityHooks):
    """Bookkeeping for low-rank layers living inside the base: the parameters belong to the base."""

    trains_base = True  # the base's own modules carry trainable weights (the low-rank pairs)
    # the base's weights stay frozen: its dropout only adds noise (and costs ~40% of a CPU step); the
    # low-rank branch has its own lora_dropout. --base-dropout on restores the base's.

    def __init__(self, config: Any, base: nn.Module, names: list[str], note: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.names = names
        self.note = note  # how the targets were found, when ptune found them (shown by PtuneModel.describe)
        self._base = [base]  # a plain list: not a submodule, so no parameter is registered twice

    def layers(self) -> dict[str, LowRankLayer]:
        return {n: self._base[0].get_submodule(n) for n in self.names}

    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers().values():
            if not enabled and layer.merged:  # merged for inference (Run): the base's own weight back meanwhile
                layer.unmerge()
                layer.merge_back = True
            elif enabled and getattr(layer, "merge_back", False):
                layer.merge(keep_original=True)
                layer.merge_back = False
            layer.disabled = not enabled

    def merge(self, keep_original: bool = False) -> None:
        for layer in self.layers().values():
            layer.merge(keep_original)

    def unmerge(self) -> None:
        for layer in self.layers().values():
            layer.unmerge()


class LoraAdapter(WeightAdapter):
    def peft_export(self, facts: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's LoRA layout; keys are relative to the model PEFT wraps (the base)."""
        layers = self.layers()
        cfg = {"peft_type": "LORA", "r": self.config.r, "lora_alpha": self.config.alpha,
               "lora_dropout": self.config.lora_dropout, "bias": "none",
               "target_modules": peft_targets(self._base[0], self.names),
               "fan_in_fan_out": any(layer.transposed for layer in layers.values()),
               **peft_task_type(self._base[0])}
        tensors = {}
        for name, layer in layers.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().clone()
        return cfg, tensors


def apply_lora(base: nn.Module, config: LoraConfig, **_: Any) -> LoraAdapter:
    names, note = resolve_targets(base, config.target_modules, config.method)
    names, first = in_layers(base, names, config.layers, config.method)
    check_rank(base, names, config.r, "r")
    wrap_layers(base, names, lambda name, layer: LoraLinear(name, layer, config.r, config.alpha, config.lora_dropout))
    adapter = LoraAdapter(config, base, names, note)
    adapter.first_layer = first
    return adapter


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every low-rank update into its layer and put the plain layers back (a PtuneModel or a base)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)
    return model
