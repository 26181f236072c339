"""Full fine-tuning: every weight of the base trains (plus the task head); the upper baseline the
parameter-efficient methods are measured against.

Saving stores every trainable tensor, so an adapter file holds the whole model. A quantized base
(4/8-bit weights) cannot be fine-tuned this way and is refused with a pointer to QLoRA. Omitted:
layer-wise learning rates and freezing schedules; no HF PEFT layout exists to export to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .bitfit import BaseParamsAdapter
from .lora import no_virtual_tokens


@dataclass(frozen=True)
class FullFinetuneConfig:
    method: ClassVar[str] = "full"
    default_lr: ClassVar[float] = 3e-5

    def template_for(self, task_template: Template) -> Template:
        return no_virtual_tokens(self.method, task_template)


def apply_full(base: nn.Module, config: FullFinetuneConfig, **_: Any) -> BaseParamsAdapter:
    quantized = [n for n, p in base.named_parameters() if not p.is_floating_point()]
    if quantized:
        raise ConfigError(f"full fine-tuning cannot train quantized weights ({quantized[0]} and {len(quantized) - 1} "
                          "more); use qlora on a quantized base, or load the base without --quantize")
    params = list(base.parameters())
    for p in params:
        p.requires_grad_(True)
    return BaseParamsAdapter(config, params, keep_original=False)
