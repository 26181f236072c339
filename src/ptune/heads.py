"""Task heads: what turns the transformer's hidden states into predictions and a loss.

- ``classification``: a new linear layer on a pooled vector (``cls``: first position, as BERT;
  ``pooler``: the encoder's own pooler, as P-Tuning v2's code; ``mean``: mean of real tokens;
  ``last``: the last real token, the decoder default).
- ``tagging``: a new linear layer on every position (labels already aligned to first sub-tokens).
- ``verbalizer``: no new weights; the model's own LM head scores the label words at the label slot
  ([MASK] for masked LMs, the next token for causal LMs). Only the label-slot rows are computed.
- ``causal_lm``: the LM head over every position; loss on target tokens only (labels -100 elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

KINDS = ("classification", "tagging", "verbalizer", "causal_lm")
POOLINGS = ("auto", "cls", "pooler", "mean", "last")


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "classification"
    num_labels: int = 0
    label_word_ids: tuple[int, ...] = ()  # verbalizer: first token id of each label word
    pooling: str = "auto"  # auto: cls for encoders, last for decoders
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"head kind {self.kind!r} is not one of {KINDS}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.kind in ("classification", "tagging") and self.num_labels < 1:
            raise ConfigError(f"a {self.kind} head needs num_labels >= 1, got {self.num_labels}")
        # empty label_word_ids: apply() fills them in from the label words and the tokenizer
        if self.kind == "verbalizer" and self.label_word_ids and len(set(self.label_word_ids)) < 2:
            raise ConfigError("a verbalizer needs at least two label words whose first tokens differ; "
                              "choose label_words that start with different tokens")

    @property
    def needs_lm(self) -> bool:
        return self.kind in ("verbalizer", "causal_lm")


def lm_head_of(lm: nn.Module) -> nn.Module:
    """The module that maps hidden states to vocabulary logits (``cls``, ``lm_head``)."""
    body = lm.base_model
    children = [m for name, m in lm.named_children() if m is not body and not isinstance(m, nn.modules.loss._Loss)]
    if len(children) != 1:
        raise ConfigError(f"cannot find the LM head of {type(lm).__name__}: it has {len(children)} candidate modules")
    return children[0]


class Head(nn.Module):
    """One head for every task kind; the kind picks the computation, config picks the shape."""

    def __init__(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> None:
        super().__init__()
        self.config = config
        pooling = config.pooling
        self.pooling = ("cls" if is_encoder else "last") if pooling == "auto" else pooling
        self.dropout = nn.Dropout(config.dropout)
        self._lm_head: list[nn.Module] = []  # kept out of this module's parameters (it is the base's)
        self._pooler: list[nn.Module] = []
        self.softcap = None
        if config.kind in ("classification", "tagging"):
            self.classifier = nn.Linear(hidden_size, config.num_labels)
        else:
            if config.kind == "verbalizer" and not config.label_word_ids:
                raise ConfigError("a verbalizer head needs label_word_ids; give labels or label_words to apply()")
            self._lm_head.append(lm_head_of(base))
            self.softcap = getattr(base.config, "final_logit_softcapping", None)
            self.register_buffer("label_word_ids", torch.tensor(config.label_word_ids, dtype=torch.long),
                                 persistent=False)
        if self.pooling == "pooler":
            pooler = getattr(base.base_model, "pooler", None)
            if pooler is None:
                raise ConfigError(f"pooling='pooler' but {type(base).__name__} has no pooler; use cls or mean")
            self._pooler.append(pooler)

    def _lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head[0](h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """hidden (B, T, d) -> logits: (B, C) classification/verbalizer, (B, T, C) tagging, (B, T, V) LM."""
        kind = self.config.kind
        if kind == "tagging":
            return self.classifier(self.dropout(hidden))
        if kind == "causal_lm":
            return self._lm_logits(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if kind == "verbalizer":
            h = hidden[rows, batch["label_position"]]  # (B, d)
            return self._lm_logits(h)[:, self.label_word_ids]
        mask = batch["attention_mask"]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "pooler":
            pooled = self._pooler[0](hidden)
        elif self.pooling == "mean":
            w = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        else:  # last real token (right padding)
            pooled = hidden[rows, mask.long().sum(1) - 1]
        return self.classifier(self.dropout(pooled))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.kind == "causal_lm":  # predict token t+1 from position t
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def label_word_ids(tokenizer: Any, words: list[str], causal: bool) -> tuple[int, ...]:
    """First token id of each label word; causal LMs see the word after a space."""
    ids = []
    for w in words:
        toks = tokenizer((" " + w) if causal else w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"label word {w!r} tokenizes to nothing; pick another word")
        ids.append(toks[0])
    return tuple(ids)


def first_token_collisions(words: list[str], ids: Sequence[int]) -> list[list[str]]:
    """Groups of label words sharing a first token (``ids``: from :func:`label_word_ids`); a verbalizer
    scores first tokens only, so it cannot tell a group's words apart."""
    groups: dict[int, list[str]] = {}
    for w, i in zip(words, ids):
        groups.setdefault(i, []).append(w)
    return [g for g in groups.values() if len(g) > 1]


def collision_message(groups: list[list[str]]) -> str:
    shown = "; ".join(" / ".join(repr(w) for w in g) for g in groups[:3])
    more = f" and {len(groups) - 3} more groups" if len(groups) > 3 else ""
    return (f"label words share a first token, so a verbalizer cannot tell them apart: {shown}{more}; "
            "choose label_words that start differently")
