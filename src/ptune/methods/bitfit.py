"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", arXiv:2106.10199): a baseline.

Only the base's bias terms train (every one: attention, feed-forward and LayerNorm biases, as the
paper), plus the task head. The biases are the base's own parameters, so saving the trainable
tensors saves them by name and the base keeps dropout on while training. Models built without
biases (Llama, Gemma, Qwen, Mistral) are refused with a pointer to LoRA. Omitted: the paper's
query-and-intermediate-bias-only variant; there is no HF PEFT layout to export to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .lora import no_virtual_tokens
from .base import IdentityHooks


class BaseParamsAdapter(IdentityHooks):
    """Marks some of the base's own parameters trainable; identity input and attention hooks.

    ``set_enabled(False)`` puts the original values back (kept at apply time, on the CPU) and
    ``set_enabled(True)`` the trained ones; ``keep_original=False`` (full fine-tuning: a second
    copy of the whole model) makes disabling an error instead.
    """

    trains_base = True  # the base's own modules carry trainable weights
    keeps_base_dropout = True  # and those weights are the base's own: it trains as usual, dropout on

    def __init__(self, config: Any, params: list[nn.Parameter], keep_original: bool = True) -> None:
        super().__init__()
        self.config = config
        self._params = params  # a plain list: the base owns them
        self._original = [p.detach().cpu().clone() for p in params] if keep_original else None
        self._trained: list[torch.Tensor] | None = None

    def set_enabled(self, enabled: bool) -> None:
        if self._original is None:
            raise ConfigError(f"{self.config.method} trains the base's own weights and keeps no copy of the "
                              "originals; load a fresh base to compare with it")
        with torch.no_grad():
            if not enabled and self._trained is None:
                self._trained = [p.detach().clone() for p in self._params]
                for p, v in zip(self._params, self._original):
                    p.copy_(v)
            elif enabled and self._trained is not None:
                for p, v in zip(self._params, self._trained):
                    p.copy_(v)
                self._trained = None


@dataclass(frozen=True)
class BitFitConfig:
    method: ClassVar[str] = "bitfit"
    default_lr: ClassVar[float] = 1e-3  # the paper searched 1e-4..1e-3

    def template_for(self, task_template: Template) -> Template:
        return no_virtual_tokens(self.method, task_template)


def apply_bitfit(base: nn.Module, config: BitFitConfig, **_: Any) -> BaseParamsAdapter:
    biases = [p for n, p in base.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and p.is_floating_point()]
    if not biases:
        raise ConfigError(f"bitfit: {type(base).__name__} has no bias terms to train (Llama-style models are built "
                          "without biases); use lora instead")
    for p in biases:
        p.requires_grad_(True)
    return BaseParamsAdapter(config, biases)
