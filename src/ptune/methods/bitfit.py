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

from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .lora import no_virtual_tokens
from .manual import NoAdapter


class BaseParamsAdapter(NoAdapter):
    """Marks some of the base's own parameters trainable; identity input and attention hooks."""

    trains_base = True  # the base's own weights train: keep its dropout on

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config


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
    return BaseParamsAdapter(config)
