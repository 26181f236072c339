"""The prefix encoder of P-Tuning v2 and prefix tuning: deep prompts for every attention layer.

P-Tuning v2 (Liu et al. 2022) trains the (num_tasks, P, L*2*Hkv*D) table directly; prefix tuning
(Li & Liang 2021) produces it from a small embedding through a 2-layer tanh MLP. Both prefix
modules (decoder / encoder attention in ``prefix_tuning.py``, T5's three attentions in
``prefix_seq2seq.py``) build on this one class, so it sits below both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """Produces (num_tasks, P, L, 2, Hkv, D) prefixes, directly or through an MLP."""

    def __init__(self, config: Any, num_layers: int, kv_heads: int, head_dim: int,
                 hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.shape = (num_layers, 2, kv_heads, head_dim)
        out = num_layers * 2 * kv_heads * head_dim
        gen = torch.Generator().manual_seed(config.seed)
        T, P = config.num_tasks, config.num_virtual_tokens
        if config.prefix_projection:
            # rows of norm ~1 (the scale of word embeddings), not N(0, 1): from N(0, 1) AdamW's steps on the
            # MLP's wide output layer blew the prefixes up and training collapsed (issue #15)
            self.embedding = nn.Parameter(torch.randn(T, P, hidden_size, generator=gen) / hidden_size ** 0.5)
            self.transform = nn.Sequential(nn.Linear(hidden_size, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, out))
        else:
            self.embedding = nn.Parameter(torch.randn(T, P, out, generator=gen))
            self.transform = None
        self.dropout = nn.Dropout(config.prefix_dropout)

    def flat(self) -> torch.Tensor:  # (num_tasks, P, L*2*Hkv*D), HF PEFT's layout
        return self.transform(self.embedding) if self.transform is not None else self.embedding

    def prefixes(self, batch_size: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        flat = self.flat()
        rows = flat[:1].expand(batch_size, -1, -1) if task_ids is None else flat[task_ids]
        rows = self.dropout(rows).view(batch_size, rows.shape[1], *self.shape)  # (B, P, L, 2, Hkv, D)
        return rows.permute(0, 2, 3, 4, 1, 5)  # (B, L, 2, Hkv, P, D)
