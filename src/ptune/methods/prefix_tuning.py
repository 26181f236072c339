"""P-Tuning v2 (Liu et al. 2022, arXiv:2110.07602) and prefix tuning (Li & Liang 2021, arXiv:2101.00190).

Deep prompts: every attention layer gets P trainable key and value vectors per key/value head,
attended to by every query and never masked. P-Tuning v2 trains them directly (``prefix_projection``
off); prefix tuning produces them from a small embedding through a 2-layer tanh MLP (on).

Mechanism: instead of feeding prefixes through ``past_key_values`` (whose API churn broke HF PEFT
more than once), ptune registers an attention function with transformers' ``AttentionInterface``.
The prefix travels to every layer as a keyword argument (``ptune_prefix``, batch first, so a batch
may mix tasks and ``generate()`` expands it for beams); the function concatenates the layer's slice
to the keys/values and widens the mask. Position ids, the KV cache, generation and gradient
checkpointing stay untouched; real tokens keep positions 0..T-1. Models that do not route attention
through the interface (MPNet, DeBERTa-v2, Falcon, ...) or share one attention module across layers
(ALBERT) are refused with a list of the alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention import ATTN_IMPL, attention_forward
from ..errors import ConfigError, UnsupportedModelError
from ..models import arch_facts, backbone_of
from ..templates import Template
from .base import IdentityHooks
from .layers import check_layers, resolve_layers
from .targets import ATTENTION_CLASS
from .prompt_tuning import NoPrompt, check_prompt_length
from .prefix_encoder import PrefixEncoder
from .prefix_seq2seq import PARTS, apply_encoder_decoder_prefix, check_parts



def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, ptune_prefix: torch.Tensor | None = None,
                     ptune_prefix_mask: torch.Tensor | None = None,
                     ptune_prefix_layers: torch.Tensor | None = None, **kwargs: Any):
    """Attention (:func:`ptune.attention.attention_forward`: SDPA, or the matmul kernel where that pays) with
    this layer's prefix keys/values in front, if any. query (B, H, Tq, D).

    ``ptune_prefix_mask`` (B, P) bool, optional: which prefix positions each row attends to, for a
    batch whose rows carry prefixes of different lengths padded to the longest (or none at all:
    an all-False row computes what the base computes); None: every prefix position is visible.
    ``ptune_prefix_layers`` (B, L) bool, optional: which layers hold a prefix for each row (a ``layers``
    range); a layer no row has a prefix in computes exactly what the base computes.
    """
    if ptune_prefix is not None and ptune_prefix_layers is not None:
        on = ptune_prefix_layers[:, module.layer_idx].to(query.device)
        if not bool(on.any()):
            ptune_prefix = None
        elif not bool(on.all()):
            on = on[:, None].expand(on.shape[0], ptune_prefix.shape[-2])
            ptune_prefix_mask = on if ptune_prefix_mask is None else on & ptune_prefix_mask.to(on.device, torch.bool)
    if ptune_prefix is not None:
        pk = ptune_prefix[:, module.layer_idx, 0].to(key.dtype)  # (B, Hkv, P, D)
        pv = ptune_prefix[:, module.layer_idx, 1].to(value.dtype)
        B, P, Tq, Tk = pk.shape[0], pk.shape[2], query.shape[2], key.shape[2]
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        causal = kwargs.get("is_causal", getattr(module, "is_causal", False))
        if attention_mask is None:
            if not causal and ptune_prefix_mask is None:
                # every key visible: no mask, so SDPA keeps its unmasked fast path
                return attention_forward(module, query, key, value, None, **kwargs)
            m = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device)
            attention_mask = (m.tril(diagonal=Tk - Tq) if causal else m)[None, None]  # causal, now that Tk grows
        if ptune_prefix_mask is None:
            if attention_mask.dtype == torch.bool:
                front = attention_mask.new_ones(attention_mask.shape[:-1] + (P,))
            else:
                front = attention_mask.new_zeros(attention_mask.shape[:-1] + (P,))
        else:
            attention_mask = attention_mask.expand(B, *attention_mask.shape[1:])
            keep = ptune_prefix_mask.to(device=query.device, dtype=torch.bool)[:, None, None, :]
            keep = keep.expand(*attention_mask.shape[:-1], P)  # (B, heads or 1, Tq, P)
            if attention_mask.dtype == torch.bool:
                front = keep
            else:  # an additive mask: 0 where visible, the dtype's lowest value where not
                front = torch.zeros(keep.shape, dtype=attention_mask.dtype, device=attention_mask.device)
                front = front.masked_fill(~keep, torch.finfo(attention_mask.dtype).min)
        attention_mask = torch.cat([front, attention_mask], dim=-1)
    return attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, prefix_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


@dataclass(frozen=True)
class PrefixTuningConfig:
    method: ClassVar[str] = "prefix_tuning"
    renamed: ClassVar[dict[str, str]] = {"dropout": "prefix_dropout"}  # older option names (format-1 adapters)
    default_lr: ClassVar[float] = 3e-3  # when --lr is not given; 1e-2 from a N(0, 1) init collapsed (issue #15)
    num_virtual_tokens: int = 20
    """prefix length P per layer; 0 = no virtual tokens at all (the frozen base and the head alone: an ablation / sweep baseline)"""
    prefix_projection: bool = True
    """reparameterize through an MLP (prefix tuning); False = P-Tuning v2"""
    encoder_hidden_size: int = 512
    """MLP hidden size when prefix_projection"""
    prefix_dropout: float = 0.0
    """on the prefix keys/values (P-Tuning v2 uses the model's hidden dropout)"""
    num_tasks: int = 1
    """prompts stored side by side, selected per row by task_ids"""
    seed: int = 0
    """seed of the prompt's initialisation"""
    layers: str | None = None
    """transformer layers that get deep prompts: 'top:6', '7-12' (1-based, inclusive), '1,3'; None = all. Layers below the lowest one run without a backward pass, and their outputs can be cached (ptune.frozen)"""
    encoder_decoder_parts: tuple[str, ...] = PARTS
    """encoder-decoder models (T5): the attention that gets prefixes, any of encoder (self-attention), decoder (self-attention), cross (decoder cross-attention)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", check_layers(self.layers))
        object.__setattr__(self, "encoder_decoder_parts", check_parts(self.encoder_decoder_parts))
        check_prompt_length(self.num_virtual_tokens)
        if self.encoder_hidden_size < 1:
            raise ConfigError(f"encoder_hidden_size={self.encoder_hidden_size} must be >= 1")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ConfigError(f"prefix_dropout={self.prefix_dropout} must be in [0, 1)")
        if self.num_tasks < 1:
            raise ConfigError(f"num_tasks={self.num_tasks} must be >= 1")

    def template_for(self, task_template: Template) -> Template:
        if task_template.num_virtual_tokens:
            raise ConfigError(
                f"{self.method} puts its prompts inside the attention layers; template "
                f"{task_template.source!r} must not contain [P] markers (use p_tuning for input prompts)")
        return task_template


@dataclass(frozen=True)
class PTuningV2Config(PrefixTuningConfig):
    method: ClassVar[str] = "p_tuning_v2"
    default_lr: ClassVar[float] = 1e-2  # learning rate when --lr is not given
    # what a saved config without the key meant: adapters saved before the option had prompts in every layer
    absent_means: ClassVar[dict[str, Any]] = {"layers": None}
    prefix_projection: bool = False
    layers: str | None = "auto"
    """transformer layers that get deep prompts: 'auto' (default) = the upper half (rounded up; every layer on an encoder-decoder model), 'all', 'top:6', '7-12' (1-based, inclusive), '1,3'. P-Tuning v2's paper: prompts in the upper layers do about as well as in every layer; layers below the lowest one run without a backward pass and their outputs are cached (ptune.frozen). 'all' for an adapter PEFT can load"""


class PrefixAdapter(IdentityHooks):
    task_tables = ("encoder.embedding",)  # the first dimension is the prompt table (see ptune.transfer)
    def __init__(self, config: PrefixTuningConfig, facts: Any) -> None:
        super().__init__()
        self.config = config
        self.num_layers = facts.num_layers
        self.chosen = resolve_layers(config.layers, facts.num_layers)  # 0-based layers holding a prefix
        self.first_layer = self.chosen[0]
        self.encoder = PrefixEncoder(config, len(self.chosen), facts.num_key_value_heads, facts.head_dim,
                                     facts.hidden_size)

    def attention_kwargs(self, batch_size: int, task_ids: torch.Tensor | None) -> dict:
        prefix = self.encoder.prefixes(batch_size, task_ids)  # (B, chosen layers, 2, Hkv, P, D)
        if len(self.chosen) == self.num_layers:
            return {"ptune_prefix": prefix}
        index = torch.tensor(self.chosen, device=prefix.device)
        full = prefix.new_zeros(batch_size, self.num_layers, *prefix.shape[2:]).index_copy(1, index, prefix)
        on = torch.zeros(batch_size, self.num_layers, dtype=torch.bool, device=prefix.device)
        on[:, index] = True
        return {"ptune_prefix": full, "ptune_prefix_layers": on}

    def peft_export(self, facts: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        if len(self.chosen) != self.num_layers:
            raise ConfigError(f"PEFT's prefix tuning puts a prefix in every layer; this adapter has prefixes in "
                              f"layers={self.config.layers!r} only, so it has no PEFT form (use it with ptune, or "
                              "train with --layers all for an adapter PEFT can load)")
        cfg = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": self.config.num_virtual_tokens,
               "prefix_projection": False, "encoder_hidden_size": self.config.encoder_hidden_size}
        with torch.no_grad():
            return cfg, {"prompt_embeddings": self.encoder.flat()[0].detach().clone()}


def check_attention_interface(base: nn.Module, method: str) -> None:
    body = backbone_of(base)
    if not getattr(type(body), "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{method} needs a model whose attention runs through transformers' AttentionInterface; "
            f"{type(body).__name__} does not. Use prompt_tuning, p_tuning, lora or bitfit with it, "
            "or a BERT/RoBERTa/ELECTRA/GPT-2/Llama/Gemma/Qwen-family model")
    number_attention_layers(body, arch_facts(base).num_layers, method)


def number_attention_layers(body: nn.Module, num_layers: int, method: str) -> None:
    """Make sure each attention module knows its depth (``layer_idx``, which picks its prefix).

    Most models number their attention modules; some that run attention through the interface do not
    (DistilBERT): one distinct module per layer, in order, gets its number here. Modules shared across
    depth (ALBERT) compute several layers with one module, so no number can tell them apart: refused.
    """
    found = [(n, m) for n, m in body.named_modules() if n and ATTENTION_CLASS.search(type(m).__name__)]
    inner = [m for n, m in found if not any(o.startswith(n + ".") for o, _ in found)]  # the attention itself
    if inner and all(isinstance(getattr(m, "layer_idx", None), int) for m in inner):
        return
    if len(inner) != num_layers or any(hasattr(m, "layer_idx") for m in inner):
        raise UnsupportedModelError(
            f"{method} puts a prefix in each of the {num_layers} attention layers, but {type(body).__name__} has "
            f"{len(inner)} attention module(s) that do not say which layer they compute (shared across depth?). "
            "Use prompt_tuning, p_tuning, lora or bitfit with it")
    for i, m in enumerate(inner):
        m.layer_idx = i


def apply_prefix_tuning(base: nn.Module, config: PrefixTuningConfig, **_: Any) -> IdentityHooks:
    if config.num_virtual_tokens == 0:
        return NoPrompt()  # no prefixes: the base's attention stays as it is
    if getattr(base.config, "is_encoder_decoder", False):  # T5: three kinds of attention (methods/prefix_seq2seq.py)
        return apply_encoder_decoder_prefix(base, config)
    check_attention_interface(base, config.method)
    base.set_attn_implementation(ATTN_IMPL)
    return PrefixAdapter(config, arch_facts(base))
