"""Deep prompts (P-Tuning v2, prefix tuning) on encoder-decoder models of the T5 family.

A T5 has three kinds of attention, each with its own prefix, as Li & Liang did for BART: encoder
self-attention, decoder self-attention and decoder cross-attention (``encoder_decoder_parts`` picks
which; default all three). One prefix tensor (B, S, 2, H, P, D) carries a slot per attention module:
encoder layers first, then decoder self-attention, then cross-attention. Each module is told its slot
(``ptune_prefix_slot``) when the method is applied, because T5 numbers the self- and cross-attention
of a decoder block alike (``layer_idx``, which its KV cache uses).

Positions: T5 has no position embeddings but adds a learned relative-position bias to the attention
scores, which the attention function receives (``position_bias``). In self-attention the prefix sits
where P tokens before the input would sit (their bias is the stack's own bias for those distances),
which is what HF PEFT's ``past_key_values`` prefix computes in the decoder; in cross-attention T5 has
no position bias, and neither has the prefix. The prefix is never in the KV cache: every generation
step puts it in front of the cached keys again, so cross-attention's cached encoder keys stay the
base's own. Omitted: the ``layers`` option (it counts the layers of one stack).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..encoder_decoder import MODEL_TYPES  # T5Attention: one relative-position bias per stack (its first layer's)
from ..errors import ConfigError, UnsupportedModelError
from .base import IdentityHooks
from .layers import picks_layers
from .prefix_encoder import PrefixEncoder

ATTN_IMPL = "ptune_seq2seq_sdpa"
PARTS = ("encoder", "decoder", "cross")  # encoder self-, decoder self-, decoder cross-attention


def check_parts(value: Any) -> tuple[str, ...]:
    """``encoder_decoder_parts`` as a tuple in PARTS order ('decoder,cross' and lists accepted)."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value or ())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"encoder_decoder_parts={value!r}: give one or more of {', '.join(PARTS)} "
                          "(encoder self-attention, decoder self-attention, decoder cross-attention)")
    return tuple(p for p in PARTS if p in parts)


def prefix_position_bias(module: nn.Module, P: int, position_bias: torch.Tensor) -> torch.Tensor:
    """The bias (1, H, Tq, P) of the prefix keys: the stack's relative-position bias for P tokens before
    the first real one (self-attention), zero where the module has no position bias (cross-attention)."""
    source = getattr(module, "ptune_bias_source", None)
    if source is None:
        return position_bias.new_zeros(*position_bias.shape[:-1], P)
    Tq, Tk = position_bias.shape[-2:]
    past = Tk - Tq  # real tokens already in the KV cache (self-attention: the keys are past + current)
    bias = source[0].compute_bias(Tq, P, device=position_bias.device, past_seen_tokens=past + P)
    return bias.to(position_bias.dtype).expand(*position_bias.shape[:-1], P)


def prefix_seq2seq_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, ptune_prefix: torch.Tensor | None = None,
                             ptune_prefix_mask: torch.Tensor | None = None,
                             position_bias: torch.Tensor | None = None, **kwargs: Any):
    """SDPA with this module's prefix keys/values in front (query (B, H, Tq, D)); widens the mask and T5's
    position bias to match. ``ptune_prefix_mask`` (B, P) as in :func:`ptune.methods.prefix_tuning.prefix_attention`."""
    slot = getattr(module, "ptune_prefix_slot", None)
    if ptune_prefix is not None and slot is not None:
        pk = ptune_prefix[:, slot, 0].to(key.dtype)  # (B, H, P, D)
        pv = ptune_prefix[:, slot, 1].to(value.dtype)
        B, P, Tq, Tk = pk.shape[0], pk.shape[2], query.shape[2], key.shape[2]
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if attention_mask is None:  # the decoder's causal mask may come as None: write it out, now that Tk grows
            m = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device)
            attention_mask = (m.tril(diagonal=Tk - Tq) if module.is_causal else m)[None, None]
        keep = torch.ones(B, P, dtype=torch.bool, device=query.device) if ptune_prefix_mask is None \
            else ptune_prefix_mask.to(device=query.device, dtype=torch.bool)
        attention_mask = attention_mask.expand(B, *attention_mask.shape[1:])
        front = keep[:, None, None, :].expand(*attention_mask.shape[:-1], P)  # (B, heads or 1, Tq, P)
        if attention_mask.dtype != torch.bool:  # additive: 0 where visible, the dtype's lowest value where not
            front = torch.zeros(front.shape, dtype=attention_mask.dtype, device=attention_mask.device).masked_fill(
                ~front, torch.finfo(attention_mask.dtype).min)
        attention_mask = torch.cat([front, attention_mask], dim=-1)
        if position_bias is not None:
            position_bias = torch.cat([prefix_position_bias(module, P, position_bias), position_bias], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=position_bias, **kwargs)


AttentionInterface.register(ATTN_IMPL, prefix_seq2seq_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def attention_modules(base: nn.Module) -> dict[str, list[nn.Module]]:
    """Each part's attention modules in layer order (T5: ``block[i].layer[0].SelfAttention`` in both stacks,
    ``block[i].layer[1].EncDecAttention`` in the decoder)."""
    encoder, decoder = base.get_encoder(), base.get_decoder()
    return {"encoder": [b.layer[0].SelfAttention for b in encoder.block],
            "decoder": [b.layer[0].SelfAttention for b in decoder.block],
            "cross": [b.layer[1].EncDecAttention for b in decoder.block]}


def number_slots(base: nn.Module, parts: tuple[str, ...]) -> int:
    """Give every attention module its prefix slot (None: no prefix) and its stack's position-bias source;
    returns the number of slots."""
    found = attention_modules(base)
    slots = 0
    for part in PARTS:
        modules = found[part]
        source = None if part == "cross" else [modules[0]]  # the first layer computes the stack's bias
        for m in modules:
            m.ptune_bias_source = source  # a plain list: not a submodule, so no parameter is registered twice
            m.ptune_prefix_slot = slots if part in parts else None
            slots += part in parts
    return slots


class EncoderDecoderPrefixAdapter(IdentityHooks):
    """The prefix of every chosen attention module: (B, S, 2, H, P, D) from one :class:`PrefixEncoder`."""

    task_tables = ("encoder.embedding",)  # the first dimension is the prompt table (see ptune.transfer)

    def __init__(self, config: Any, slots: int, heads: int, head_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = PrefixEncoder(config, slots, heads, head_dim, hidden_size)

    def attention_kwargs(self, batch_size: int, task_ids: torch.Tensor | None) -> dict:
        return {"ptune_prefix": self.encoder.prefixes(batch_size, task_ids)}


def apply_encoder_decoder_prefix(base: nn.Module, config: Any) -> EncoderDecoderPrefixAdapter:
    cfg = base.config
    if cfg.model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{config.method} on encoder-decoder models is written for the T5 family ({', '.join(MODEL_TYPES)}); "
            f"{type(base).__name__} ({cfg.model_type}) is not one: use prompt_tuning, p_tuning or lora with it")
    if picks_layers(getattr(config, "layers", None)):  # auto (P-Tuning v2's default): every layer here
        raise ConfigError(f"layers={config.layers!r} counts the layers of one stack; on an encoder-decoder model pick "
                          "the attention that gets prefixes with encoder_decoder_parts instead")
    slots = number_slots(base, check_parts(config.encoder_decoder_parts))
    base.set_attn_implementation(ATTN_IMPL)
    return EncoderDecoderPrefixAdapter(config, slots, cfg.num_heads, cfg.d_kv, cfg.d_model)
