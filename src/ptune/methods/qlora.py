"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314).

LoRA on a frozen base stored in 4-bit NormalFloat (NF4, blocks of 64) with double quantization
(the block constants themselves quantized to 8 bits in blocks of 256), computing in bf16. The
quantization is the base's business, not the method's: load the base with ``quantize="nf4"``
(``--quantize nf4``) or quantize a built model with :func:`ptune.quantize.quantize_model`; this
method checks that it got such a base and then is LoRA (:mod:`ptune.methods.lora`), whose layers
wrap ``Linear4bit`` as they wrap ``nn.Linear``. As the paper finds LoRA on every linear layer
necessary to match full fine-tuning, the default targets are ``all-linear``. The paged optimizer
lives in :func:`ptune.quantize.make_optimizer`. Omitted: merging into the 4-bit weights
(re-quantizing would add error; merge on an unquantized copy of the base instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from .lora import ALL_LINEAR, LoraAdapter, LoraConfig, apply_lora


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """LoRA on a 4-bit NF4 base (load it with ``quantize="nf4"`` / ``--quantize nf4``)."""

    method: ClassVar[str] = "qlora"
    target_modules: tuple[str, ...] | None = (ALL_LINEAR,)
    """every linear layer but the output head"""


def apply_qlora(base: nn.Module, config: QLoraConfig, **kwargs: Any) -> LoraAdapter:
    if not any(type(m).__name__ == "Linear4bit" for m in base.modules()):
        raise ConfigError(f"qlora expects a 4-bit quantized base but {type(base).__name__} has no Linear4bit layer: "
                          "pass --quantize nf4 (or load_base(..., quantize='nf4'), or "
                          "ptune.quantize.quantize_model(model)); for an unquantized base use lora")
    return apply_lora(base, config, **kwargs)
