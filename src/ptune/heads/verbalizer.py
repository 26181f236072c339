"""Verbalizer head ("GPT Understands, Too"; PET): the model's own LM head scores label words.

No new weights: at the label slot of the template (``[MASK]`` for masked LMs, the next token after
the template for causal LMs) the frozen LM head's logits of each label word's first token are the
class scores; only the label-slot rows are computed. Label words whose first tokens collide cannot
be told apart and are refused by name, or dropped with their records where the task says
``label_collisions: drop`` (probing relations with many candidate objects).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import LMScores, cross_entropy
from .classification import ClassLabels

if TYPE_CHECKING:
    from .config import HeadConfig


class VerbalizerModule(nn.Module):
    def __init__(self, config: HeadConfig, base: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.scores = LMScores(base)
        self.register_buffer("label_word_ids", torch.tensor(config.label_word_ids, dtype=torch.long),
                             persistent=False)

    def read_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The label slot: the one position per row ``forward`` reads (see ``ptune.frozen``)."""
        return batch["label_position"]

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h = hidden[rows, batch["label_position"]]  # (B, d): the label slot only
        return self.scores(h)[:, self.label_word_ids]  # (B, C)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels)


def label_word_ids(tokenizer: Any, words: Sequence[str], causal: bool) -> tuple[int, ...]:
    """First token id of each label word; causal LMs see the word after a space."""
    ids = []
    for w in words:
        toks = tokenizer((" " + w) if causal else w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"label word {w!r} tokenizes to nothing; pick another word")
        ids.append(toks[0])
    return tuple(ids)


def first_token_collisions(words: Sequence[str], ids: Sequence[int]) -> list[list[str]]:
    """Groups of label words sharing a first token (``ids``: from :func:`label_word_ids`)."""
    groups: dict[int, list[str]] = {}
    for w, i in zip(words, ids):
        groups.setdefault(i, []).append(w)
    return [g for g in groups.values() if len(g) > 1]


def collision_message(groups: list[list[str]]) -> str:
    shown = "; ".join(" / ".join(repr(w) for w in g) for g in groups[:3])
    more = f" and {len(groups) - 3} more groups" if len(groups) > 3 else ""
    return (f"label words share a first token, so a verbalizer cannot tell them apart: {shown}{more}; "
            "choose label_words that start differently")


class VerbalizerHead(ClassLabels):
    name = "verbalizer"
    new_weights = False
    base_kinds = ("masked_lm", "causal_lm")  # an encoder's MLM head, a decoder's LM head

    def check_config(self, config: HeadConfig) -> None:
        # empty label_word_ids: resolve() fills them in from the label words and the tokenizer
        if config.label_word_ids and len(set(config.label_word_ids)) < 2:
            raise ConfigError("a verbalizer needs at least two label words whose first tokens differ; "
                              "choose label_words that start with different tokens")

    def base_kind(self, is_encoder: bool) -> str:
        return "masked_lm" if is_encoder else "causal_lm"

    def peft_task_type(self, is_encoder: bool) -> str | None:
        return None if is_encoder else "CAUSAL_LM"

    def default_template(self) -> str:
        return "{text} {mask}"

    def task_template(self, task: Any) -> str:
        if task.verbalizer_template:
            return task.verbalizer_template
        return task.template or " ".join("{%s}" % f for f in task.text_fields) + " {mask}"

    def resolve(self, config: HeadConfig, template: Any, *, tokenizer: Any, label_words: Sequence[str],
                causal: bool) -> HeadConfig:
        if not template.has_mask:
            raise ConfigError(f"a verbalizer head needs a {{mask}} label slot in the template {template.source!r}")
        if config.label_word_ids:
            return config
        if tokenizer is None or not label_words:
            raise ConfigError("a verbalizer head needs a tokenizer and label words")
        ids = label_word_ids(tokenizer, label_words, causal)
        groups = first_token_collisions(label_words, ids)
        if groups:
            raise ConfigError(collision_message(groups))
        return dataclasses.replace(config, label_word_ids=ids, num_labels=len(ids))

    def resolve_labels(self, task: Any, splits: dict[str, list[dict]], tokenizer: Any, *, causal: bool,
                       log: Any = None) -> tuple[Any, dict[str, list[dict]]]:
        words = task.words()
        groups = first_token_collisions(words, label_word_ids(tokenizer, words, causal))
        if not groups:
            return task, splits
        if task.label_collisions != "drop":
            raise ConfigError(collision_message(groups) + "; or set label_collisions: drop in the task")
        by_word = {w: x for x, w in zip(task.labels, words)}
        dropped = {by_word[w] for group in groups for w in group}
        kept = tuple(x for x in task.labels if x not in dropped)
        if len(kept) < 2:
            raise ConfigError(f"task {task.name}: fewer than two labels remain once colliding label words are dropped")
        new_splits = {k: [r for r in v if r.get(task.label_field) not in dropped] for k, v in splits.items()}
        removed = sum(len(v) for v in splits.values()) - sum(len(v) for v in new_splits.values())
        if log:
            log(f"{task.name}: dropped {len(dropped)} of {len(task.labels)} labels whose first tokens collide "
                f"({', '.join(sorted(dropped)[:4])}{', ...' if len(dropped) > 4 else ''}) and their {removed} records")
        words_kept = {x: task.label_words[x] for x in kept} if task.label_words else None
        return dataclasses.replace(task, labels=kept, label_words=words_kept), new_splits

    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module:
        if not config.label_word_ids:
            raise ConfigError("a verbalizer head needs label_word_ids; give labels or label_words to apply()")
        return VerbalizerModule(config, base)
