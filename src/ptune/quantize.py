"""Quantized bases through bitsandbytes: NF4 with double quantization (QLoRA) and int8.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores the frozen base in 4-bit NormalFloat: blocks
of 64 weights share one absmax scale, each weight is the nearest of the 16 NF4 values below times
that scale, and the scales themselves are quantized to 8 bits in blocks of 256 ("double
quantization"). Compute runs in bf16. bitsandbytes does the kernels (CPU included); this module
only configures them (``bnb_config`` for ``load_base``), quantizes already-built models
(``quantize_model``: tests, tiny models), quantizes a loaded decoder's token table and tied LM head too
(``quantize_base_embeddings``, which ``load_base`` calls: :mod:`ptune.quantized_embedding`), reports what it did (``describe_quantization``) and picks
the optimizer (``make_optimizer``: paged AdamW on CUDA, torch AdamW elsewhere). LoRA on top of the
quantized layers is :mod:`ptune.methods.qlora`.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from .errors import ConfigError

QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' layer classes, by name (bitsandbytes is optional)


def is_quantized_layer(module: nn.Module) -> bool:
    return type(module).__name__ in QUANTIZED_LAYERS


NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
# The 16 NF4 values (QLoRA paper, appendix E; bitsandbytes' table): quantiles of N(0, 1) scaled to
# [-1, 1], 8 on the positive side and 7 on the negative side so that 0 is represented exactly
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def bnb_config(kind: str, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """transformers' BitsAndBytesConfig for ``nf4`` (QLoRA's: double quantization, ``compute_dtype`` bf16 unless
    the run computes in another dtype) or ``int8``."""
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401  (present, or the config would fail later)
    except ImportError as e:
        raise ConfigError(f"--quantize {kind} needs bitsandbytes: pip install bitsandbytes (or ./install.sh quant)") from e
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"quantize={kind!r} is not one of nf4, int8")


def quantize_model(model: nn.Module, kind: str = "nf4",
                   skip: Iterable[str] = ("lm_head", "classifier", "score"), *, embeddings: bool = False) -> nn.Module:
    """Replace the model's nn.Linear layers (except heads) in place by bitsandbytes' quantized layers.

    ``nf4``: ``Linear4bit`` built from the fp weights, NF4 blocks of 64, double quantization, bf16
    compute (what ``load_base(..., quantize="nf4")`` gives). ``int8``: ``Linear8bitLt`` (LLM.int8()
    weights, no outlier threshold). For tiny models in tests and for models built in code; a model
    folder loads quantized directly through :func:`ptune.load_base`.

    Layers whose input width is not a multiple of 64 stay in full precision: bitsandbytes 0.50's
    native CPU kernel dequantizes such NF4 weights wrongly (errors up to the block's absmax where
    NF4 allows 0.14 of it), so quantizing them would corrupt the model rather than compress it.

    ``embeddings``: also quantize a decoder's token table and its (tied) LM head, as ``load_base`` does
    (:func:`ptune.quantized_embedding.quantize_embeddings`; any width: rows are padded to whole blocks).
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(f"quantize_model(kind={kind!r}) needs bitsandbytes: pip install bitsandbytes") from e
    if kind not in ("nf4", "int8"):
        raise ConfigError(f"quantize kind={kind!r} is not one of nf4, int8")
    skip = tuple(skip)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(s in name for s in skip):
            continue
        if kind == "nf4" and module.in_features % NF4_BLOCK:
            continue
        w = module.weight.data
        if kind == "nf4":
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(w.detach().float().cpu().clone(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4", blocksize=NF4_BLOCK)
        else:
            q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
            q.weight = bnb.nn.Int8Params(w.detach().float().cpu().clone(), requires_grad=False,
                                         has_fp16_weights=False)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.detach().clone(), requires_grad=False)
        q = q.to(w.device)  # packs the weight (4-bit codes + constants, or int8 + row scales)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    if embeddings:
        from .quantized_embedding import quantize_embeddings

        quantize_embeddings(model, kind)
    return hold_quantized_weights(model)


def hold_quantized_weights(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes from rewriting a frozen NF4 base in place.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` converts its weight to a CPU-packed layout
    on its first forward pass without gradients (an evaluation), rounding the block constants to bf16; its
    ``state_dict()`` converts back "best-effort", re-quantizing the constants. After one evaluation the
    frozen base then holds other numbers than it was loaded with, and differs between CPUs (seen here: the
    absmax / nested_absmax of every layer changed after three training steps with evaluations). With the
    conversion off every CPU computes with the weights as loaded."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def quantize_base_embeddings(model: nn.Module, kind: str) -> dict[str, Any]:
    """Quantize a loaded decoder's token table when its LM head shares it (tied: Gemma, ...) the same way as its
    linear layers (:func:`ptune.quantized_embedding.quantize_embeddings`), then drop every reference the
    model still holds to the loaded weight file: transformers memory-maps safetensors, and a full-precision
    parameter left viewing the map (a norm) keeps the map, with every page of the table already read,
    resident. The small remaining full-precision parameters are copied out of the map."""
    from .quantized_embedding import quantize_embeddings, release_memory, tied_table

    # only a table the LM head shares: an untied model keeps transformers' layout (and so stays what a PEFT
    # client loading the same base with BitsAndBytesConfig computes, which ptune's peft export promises)
    info = quantize_embeddings(model, kind) if tied_table(model) else {}
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_floating_point() and not is_quantized_layer(module):
                    p.data = p.data.clone()
    release_memory()
    model._ptune_quantized_embeddings = info
    return info


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight of a ``Linear4bit`` or ``Linear8bitLt`` layer."""
    import bitsandbytes.functional as F

    w = layer.weight
    if type(layer).__name__ == "Linear8bitLt":
        return w.data.float() * w.SCB.float().view(-1, 1) / 127  # int8 rows times their absmax
    state = w.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit layer for its CPU kernel the first time it runs in eval mode
        # without input gradients, keeping the block constants in fp32: unpack the codes (on copies)
        # and scale them by those exact constants
        absmax = state.absmax.T.reshape(-1).float()
        data, plain = F._convert_weight_packed_for_cpu_inverse(w.data.clone(), copy.copy(state))
        plain = copy.copy(plain)
        plain.absmax, plain.nested, plain.offset, plain.state2 = absmax, False, None, None
        return F.dequantize_4bit(data, plain).float()
    return F.dequantize_4bit(w.data, state).float()


def describe_quantization(model: nn.Module) -> dict[str, Any]:
    """What is quantized and how: layer counts, quant type, code book, block sizes, double quantization.

    ``bits_per_weight`` is the storage cost of one weight with its share of the block constants:
    4 + 32/64 = 4.5 without double quantization, 4 + 8/64 + 32/(64*256) = 4.127 with it (QLoRA, 3.1).
    """
    layers = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    plain = sum(1 for m in model.modules() if type(m) is nn.Linear)
    if not layers:
        return {"quantized_layers": 0, "unquantized_linear_layers": plain}
    first = layers[0]
    info: dict[str, Any] = {"quantized_layers": len(layers), "unquantized_linear_layers": plain,
                            "layer_type": type(first).__name__}
    state = getattr(first.weight, "quant_state", None)
    if state is not None:
        nested = bool(getattr(state, "original_nested", state.nested))  # as built, before any CPU repacking
        bits = 4 + (8 / state.blocksize + 32 / (state.blocksize * state.state2.blocksize) if nested
                    else 32 / state.blocksize)
        info.update(quant_type=state.quant_type, code=[round(float(v), 8) for v in state.code], blocksize=state.blocksize,
                    double_quant=nested, double_quant_blocksize=state.state2.blocksize if nested else None,
                    bits_per_weight=round(bits, 4), compute_dtype=str(getattr(first, "compute_dtype", None)))
    else:
        info.update(quant_type="int8", bits_per_weight=8.0)
    return info


def make_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0, *,
                   paged: bool = True) -> torch.optim.Optimizer:
    """AdamW for the trainable parameters; bitsandbytes' paged 32-bit AdamW on CUDA when ``paged``.

    QLoRA pages the optimizer state to CPU memory when the GPU runs short (long sequences, memory
    spikes) instead of failing with out-of-memory; the update itself is AdamW's. Paging needs CUDA's
    unified memory, so on CPU, or with ``paged=False``, torch's AdamW is returned: same maths,
    nothing to page. ``make_optimizer`` is what ptune's training loop uses for every method.
    """
    if paged and torch.cuda.is_available():
        try:
            import bitsandbytes as bnb
        except ImportError:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
