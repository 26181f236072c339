"""Head kinds: the registry. One module per kind, one line here (see ``heads/base.py`` for the contract).

- ``classification``: a new linear layer on a pooled vector (cls / pooler / mean / last token).
- ``tagging``: a new linear layer on every position (sequence labelling; entity F1 with seqeval).
- ``verbalizer``: the base's own LM head scores label words at the label slot (no new weights).
- ``causal_lm``: the LM head over every position; loss on target tokens only.
- ``multiple_choice``: a new linear layer scores each (question, choice) row; softmax over a record's choices.
- ``multiple_choice_lm``: a causal LM's own log-probability of each choice's tokens scores it (no new weights).
- ``span_qa``: a new linear layer gives start / end logits on every position; answers are spans of the context.
- ``seq2seq``: text to text on an encoder-decoder base (T5): the decoder writes the target; loss on its tokens.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Example, HeadBase, HeadConfig, HeadKind, MetricSpec, lm_head_of
from .causal_lm import CausalLMHead
from .classification import ClassificationHead
from .multiple_choice import MultipleChoiceHead, MultipleChoiceLMHead
from .seq2seq import Seq2SeqHead
from .span_qa import SpanQAHead
from .tagging import TaggingHead
from .verbalizer import VerbalizerHead, collision_message, first_token_collisions, label_word_ids

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


__all__ = ["HEAD_KINDS", "head_kind", "HeadConfig", "HeadKind", "HeadBase", "MetricSpec", "Example",
           "lm_head_of", "label_word_ids", "first_token_collisions", "collision_message"]
