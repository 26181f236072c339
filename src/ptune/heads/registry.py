"""The registry of head kinds: one line per kind (see ``heads/base.py`` for the contract)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import HeadKind
from .causal_lm import CausalLMHead
from .classification import ClassificationHead
from .multiple_choice import MultipleChoiceHead, MultipleChoiceLMHead
from .seq2seq import Seq2SeqHead
from .span_qa import SpanQAHead
from .tagging import TaggingHead
from .verbalizer import VerbalizerHead

HEAD_KINDS: dict[str, HeadKind] = {
    "classification": ClassificationHead(),
    "tagging": TaggingHead(),
    "verbalizer": VerbalizerHead(),
    "causal_lm": CausalLMHead(),
    "multiple_choice": MultipleChoiceHead(),
    "multiple_choice_lm": MultipleChoiceLMHead(),
    "span_qa": SpanQAHead(),
    "seq2seq": Seq2SeqHead(),
}


def head_kind(name: str) -> HeadKind:
    if name not in HEAD_KINDS:
        raise ConfigError(f"head kind {name!r} is not one of {tuple(HEAD_KINDS)}")
    return HEAD_KINDS[name]
