"""LoRA targets for a model ptune has no table entry for, found from the model's own modules.

Only linear layers inside attention blocks are considered (a module whose class name says
attention, or one named ``attention`` / ``attn`` / ``self_attn`` / ``self_attention``). In order:

1. the query and value projections (the LoRA paper's choice), recognised by name (``query``,
   ``q_proj``, ``q_lin``, ``q``, ``Wq``, ``query_proj`` / ``value``, ``v_proj``, ...) and by shape:
   input width the hidden size, output width the hidden size or heads x head_dim (query) or
   key/value heads x head_dim (value, grouped-query attention);
2. else a fused query/key/value projection (GPT-2's ``c_attn``, Falcon's ``query_key_value``,
   ``Wqkv``, ``qkv_proj``): input the hidden size, output heads x head_dim plus a key and a value
   of whole heads;
3. else every linear layer of the attention blocks.

:func:`discover_targets` returns the full module names and a line saying what was chosen and why.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import ConfigError
from ..models import arch_facts
from .low_rank import LowRankLayer, is_linear_like, layer_dims

ATTENTION_CLASS = re.compile("attention|attn", re.IGNORECASE)
ATTENTION_NAMES = {"attention", "attn", "self_attn", "self_attention", "selfattention"}
QUERY_NAMES = {"query", "q_proj", "q_lin", "q", "wq", "query_proj"}
VALUE_NAMES = {"value", "v_proj", "v_lin", "v", "wv", "value_proj"}
FUSED_NAMES = {"c_attn", "query_key_value", "wqkv", "qkv_proj", "qkv", "in_proj"}


def attention_linears(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every linear-like layer that sits inside an attention block, in model order
    (layers a low-rank adapter already wraps are left alone, as :func:`ptune.methods.lora.match_targets` does)."""
    blocks = {name for name, m in base.named_modules() if name and (
        ATTENTION_CLASS.search(type(m).__name__) or name.rsplit(".", 1)[-1].lower() in ATTENTION_NAMES)}
    wrapped = tuple(n + "." for n, m in base.named_modules() if isinstance(m, LowRankLayer))
    out = []
    for name, module in base.named_modules():
        parts = name.split(".")
        if is_linear_like(module) and not name.startswith(wrapped) \
                and any(".".join(parts[:i]) in blocks for i in range(1, len(parts))):
            out.append((name, module))
    return out


def discover_targets(base: nn.Module, method: str) -> tuple[list[str], str]:
    """(full names of the layers to wrap, one line saying what was chosen and why)."""
    f = arch_facts(base)
    d, hd = f.hidden_size, f.head_dim
    q_widths = {d, f.num_attention_heads * hd}
    v_widths = q_widths | {f.num_key_value_heads * hd}
    queries, values, fused = [], [], []
    candidates = attention_linears(base)
    for name, layer in candidates:
        leaf = name.rsplit(".", 1)[-1].lower()
        in_f, out_f = layer_dims(name, layer)
        if in_f != d:
            continue
        if leaf in QUERY_NAMES and out_f in q_widths:
            queries.append(name)
        elif leaf in VALUE_NAMES and out_f in v_widths:
            values.append(name)
        elif leaf in FUSED_NAMES and out_f > f.num_attention_heads * hd \
                and (out_f - f.num_attention_heads * hd) % (2 * hd) == 0:
            fused.append(name)
    where = f"{type(base).__name__} ({f.model_type}) has no entry in ptune's target table"
    if queries and values:
        names = sorted(queries + values, key=[n for n, _ in candidates].index)
        why = "its attention query and value projections, found by name and shape"
    elif fused:
        names, why = fused, "its fused query/key/value projections (no separate query and value layers)"
    elif candidates:
        names = [n for n, _ in candidates]
        why = "all linear layers of its attention blocks (no query/value projection recognised by name and shape)"
    else:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if is_linear_like(m)})
        raise ConfigError(f"{method}: {where} and no linear layer inside an attention block; its linear layers "
                          f"are named {linear[:12]}: pass target_modules (name suffixes, 're:<regex>' or 'all-linear')")
    return names, f"{method} targets {summary(names)}: {where}, so {why}"


def summary(names: list[str]) -> str:
    """'query_proj, value_proj (4 layers)': the distinct name suffixes and the count."""
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return f"{', '.join(leaves)} ({len(names)} layers)"
