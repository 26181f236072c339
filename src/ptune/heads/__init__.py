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

from .base import Example, HeadBase, HeadKind, MetricSpec, lm_head_of
from .config import HeadConfig
from .registry import HEAD_KINDS, head_kind
from .verbalizer import collision_message, first_token_collisions, label_word_ids

__all__ = ["HEAD_KINDS", "head_kind", "HeadConfig", "HeadKind", "HeadBase", "MetricSpec", "Example",
           "lm_head_of", "label_word_ids", "first_token_collisions", "collision_message"]
