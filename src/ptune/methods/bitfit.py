"""BitFit (Ben Zaken et al. 2022, arXiv:2106.10199) and full fine-tuning: the two baselines.

BitFit trains only the base's bias terms (plus the task head); full fine-tuning trains everything.
Both act on the base's own parameters, so the base keeps dropout on while training. Neither has an
HF PEFT layout to export to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .lora import no_virtual_tokens


class BaseParamsAdapter(nn.Module):
    """Marks base parameters trainable; no input or attention hooks."""

    trains_base = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def inject(self, embeds: torch.Tensor, virtual_index: torch.Tensor, task_ids: Any) -> torch.Tensor:
        return embeds

    def attention_kwargs(self, batch_size: int, task_ids: Any) -> dict:
        return {}


@dataclass(frozen=True)
class BitFitConfig:
    method: ClassVar[str] = "bitfit"
    default_lr: ClassVar[float] = 1e-3

    def template_for(self, task_template: Template) -> Template:
        return no_virtual_tokens(self.method, task_template)


@dataclass(frozen=True)
class FullFinetuneConfig:
    method: ClassVar[str] = "full"
    default_lr: ClassVar[float] = 3e-5

    def template_for(self, task_template: Template) -> Template:
        return no_virtual_tokens(self.method, task_template)


def apply_bitfit(base: nn.Module, config: BitFitConfig, **_: Any) -> BaseParamsAdapter:
    biases = [p for n, p in base.named_parameters() if n.endswith("bias")]
    if not biases:
        raise ConfigError(f"bitfit: {type(base).__name__} has no bias terms (Llama-style models have none); "
                          "use lora instead")
    for p in biases:
        p.requires_grad_(True)
    return BaseParamsAdapter(config)


def apply_full(base: nn.Module, config: FullFinetuneConfig, **_: Any) -> BaseParamsAdapter:
    for p in base.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return BaseParamsAdapter(config)
