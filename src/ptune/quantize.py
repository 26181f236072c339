"""Quantized bases through bitsandbytes: NF4 with double quantization (QLoRA) and int8.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores the frozen base in 4-bit NormalFloat: blocks
of 64 weights share one absmax scale, each weight is the nearest of the 16 NF4 values below times
that scale, and the scales themselves are quantized to 8 bits in blocks of 256 ("double
quantization"). Compute runs in bf16. bitsandbytes does the kernels (CPU included); this module
only configures them, quantizes already-built models (tests, tiny models) and reports what it did.
A paged AdamW (bitsandbytes) is used where CUDA exists; on CPU paging has nothing to page, so plain
AdamW is returned.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .errors import ConfigError

NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
# The 16 NF4 values (QLoRA paper, appendix E; bitsandbytes' table)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def bnb_config(kind: str) -> Any:
    """transformers' BitsAndBytesConfig for ``nf4`` (QLoRA defaults) or ``int8``."""
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401  (present, or the config would fail later)
    except ImportError as e:
        raise ConfigError(f"--quantize {kind} needs bitsandbytes: pip install bitsandbytes (or ./install.sh quant)") from e
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"quantize={kind!r} is not one of nf4, int8")


def quantize_model(model: nn.Module, skip: Iterable[str] = ("lm_head", "classifier", "score")) -> nn.Module:
    """Replace every nn.Linear (except heads) by an NF4 ``Linear4bit`` with double quantization.

    Layers whose input width is not a multiple of the 64-weight block stay unquantized.
    """
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(s in name for s in skip):
            continue
        if module.in_features % NF4_BLOCK:
            # bitsandbytes 0.50's CPU path mis-quantizes rows that are not a whole number of blocks
            # (relative error up to 0.87 instead of <= 0.16): keep such layers in full precision
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=NF4_BLOCK)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        q = q.to(module.weight.device)  # packs the weight into 4 bits
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight a Linear4bit layer computes with."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def describe_quantization(model: nn.Module) -> dict[str, Any]:
    """What is quantized and how: layer count, quant type, block sizes, double quantization."""
    layers = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    if not layers:
        return {"quantized_layers": 0}
    first = layers[0]
    state = getattr(first.weight, "quant_state", None)
    info: dict[str, Any] = {"quantized_layers": len(layers), "layer_type": type(first).__name__}
    if state is not None:
        info.update(quant_type=state.quant_type, blocksize=state.blocksize,
                    double_quant=state.nested, double_quant_blocksize=state.state2.blocksize if state.nested else None,
                    compute_dtype=str(getattr(first, "compute_dtype", None)))
    return info


def make_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Paged 32-bit AdamW on CUDA (optimizer state pages to CPU under memory pressure), AdamW elsewhere."""
    if torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
