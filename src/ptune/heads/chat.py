"""Chat records through the tokenizer's chat template, with the loss on every assistant turn and nothing else.

A conversation (``[{"role", "content"}, ...]``, see :mod:`ptune.data.formats`) is rendered with
``tokenizer.apply_chat_template``. The assistant turns are found by rendering incrementally: the text of
turns ``[:k]`` with the generation prompt ends where assistant turn ``k``'s content starts, and the text of
turns ``[:k+1]`` ends after it, its end-of-turn marker included (trailing whitespace after the marker is
not the model's to write). Tokens whose first character falls in such a span are labelled (a fast
tokenizer's offsets; a slow one: tokenized prefixes). A template that does not render a conversation as
the prefix of its continuation (one that rewrites earlier turns) is refused, since its assistant tokens
cannot be told apart.

Truncation: the target is the last assistant turn, the source everything before it. A target longer than
the task's ``max_target_length`` is refused; while the source is longer than ``max_source_length`` or the
row longer than ``max_length``, the oldest exchange (after any system turn) is dropped, then the end of
the last user turn is cut. The template's virtual tokens lead the row (after a leading BOS), the rendered
conversation fills its one field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from ..templates import Encoded, TemplateEncoder

if TYPE_CHECKING:
    from ..data.tasks import Task

Turns = list[dict[str, str]]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_chat_template(tokenizer: Any, what: str) -> None:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ConfigError(f"{what} are rendered with the tokenizer's chat template, and {name}'s tokenizer has none; "
                          "use a chat model, give its tokenizer a chat_template (tokenizer_config.json), or write "
                          "the records as prompt/response")


def render(tokenizer: Any, turns: Turns, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError, or whatever the template raises
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"the chat template refuses this conversation: {first[:200]}") from None


def assistant_spans(tokenizer: Any, turns: Turns) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (content + end-of-turn)."""
    text = render(tokenizer, turns, False)
    spans = []
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, turns[:k], True) if k else ""
        after = render(tokenizer, turns[:k + 1], False)
        if not (after.startswith(before) and text.startswith(after)):
            raise DataError("the chat template does not render a conversation as the prefix of its continuation "
                            "(it rewrites earlier turns), so its assistant tokens cannot be told apart")
        spans.append((len(before), len(after.rstrip())))
    return text, spans


def tokenize_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and, per token, the index of the span it starts in (-1: none)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        owner = [next((j for j, (a, b) in enumerate(spans) if a <= s < b), -1) for s, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), owner
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    owner = [-1] * len(ids)
    for j, (a, b) in enumerate(spans):
        start = len(tokenizer(text[:a], add_special_tokens=False)["input_ids"])
        end = len(tokenizer(text[:b], add_special_tokens=False)["input_ids"])
        owner[start:end] = [j] * (end - start)
    return ids, owner


def _drop_oldest_exchange(turns: Turns) -> Turns | None:
    """The turns without their oldest exchange (kept: a leading system turn, the last user turn onward)."""
    start = 1 if turns and turns[0]["role"] == "system" else 0
    users = [k for k, t in enumerate(turns) if t["role"] == "user" and k > start]
    if not users:
        return None
    return turns[:start] + turns[users[0]:]


def _cut_last_prompt(tokenizer: Any, turns: Turns, overflow: int) -> Turns | None:
    """The turns with the last user turn's content ``overflow`` tokens shorter (cut from its end)."""
    last = max((k for k, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last is None:
        return None
    ids = tokenizer(turns[last]["content"], add_special_tokens=False)["input_ids"]
    keep = len(ids) - max(overflow, 1)
    if keep < 1:
        return None
    out = [dict(t) for t in turns]
    out[last]["content"] = tokenizer.decode(ids[:keep])
    return out


def encode_conversation(encoder: TemplateEncoder, task: "Task", rec: dict, labelled: bool) -> Encoded:
    """One chat record as a model row: the template's virtual tokens and the rendered conversation, labels
    on the assistant turns' tokens (``labelled``), or ending in the generation prompt (not ``labelled``)."""
    tok = encoder.tokenizer
    check_chat_template(tok, "chat records")
    turns = task.conversation(rec, labelled=labelled)
    tpl = encoder.template
    if tpl.has_mask or len(tpl.fields) != 1:
        raise ConfigError(f"template {tpl.source!r}: a chat record fills a template's one field with the rendered "
                          "conversation (virtual tokens and text around it allowed, no {mask})")
    pieces: list[tuple[list[int], list[int]] | None] = []  # per segment: (ids, virtual index); None: the field
    vcount = 0
    for seg in tpl.segments:
        if seg.kind == "virtual":
            pieces.append(([encoder.placeholder_id] * seg.value, list(range(vcount, vcount + seg.value))))
            vcount += seg.value
        elif seg.kind == "text" and seg.value.strip():
            piece = tok(seg.value.strip(), add_special_tokens=False)["input_ids"]
            pieces.append((piece, [-1] * len(piece)))
        elif seg.kind == "field":
            pieces.append(None)
    n_fixed = sum(len(p[0]) for p in pieces if p is not None)
    src_max, tgt_max, row_max = task.max_source_length, task.max_target_length, encoder.max_length
    while True:
        if labelled:
            text, spans = assistant_spans(tok, turns)
        else:
            text, spans = render(tok, turns, True), []
        ids, owner = tokenize_spans(tok, text, spans)
        last = len(spans) - 1
        target = [i for i, o in enumerate(owner) if o == last] if labelled else []
        if tgt_max is not None and len(target) > tgt_max:
            raise DataError(f"the last assistant turn is {len(target)} tokens, longer than max_target_length="
                            f"{tgt_max} (--max-target-length); raise it or shorten the response")
        source = target[0] if target else len(ids)
        overflow = max(source - src_max if src_max is not None else 0, n_fixed + len(ids) - row_max)
        if overflow <= 0:
            break
        shorter = _drop_oldest_exchange(turns) or _cut_last_prompt(tok, turns, overflow)
        if shorter is None:
            raise ConfigError(f"max_length={row_max} (--max-length) or max_source_length={src_max} "
                              f"(--max-source-length) leaves no room for the prompt: the chat template, virtual "
                              f"tokens and response take {n_fixed + len(ids) - source} tokens besides it; raise them")
        turns = shorter
    # the row: the conversation's own BOS first, then the template's virtual tokens / text around the conversation
    lead = 1 if ids and tok.bos_token_id is not None and ids[0] == tok.bos_token_id else 0
    input_ids, vindex, labels = ids[:lead], [-1] * lead, [-100] * lead
    for piece in pieces:
        if piece is None:
            input_ids += ids[lead:]
            vindex += [-1] * (len(ids) - lead)
            labels += [t if o >= 0 else -100 for t, o in zip(ids[lead:], owner[lead:])]
        else:
            input_ids += piece[0]
            vindex += piece[1]
            labels += [-100] * len(piece[0])
    return Encoded(input_ids, vindex, labels if labelled else None)


class ChatEncoder(TemplateEncoder):
    """A TemplateEncoder whose unlabelled records of a chat-format task (a prompt to answer: generation,
    predict) are rendered with the chat template and its generation prompt."""

    def __init__(self, template: Any, tokenizer: Any, task: "Task", *, max_length: int = 128,
                 causal: bool = True) -> None:
        super().__init__(template, tokenizer, max_length=max_length, causal=causal)
        self.task = task

    def encode(self, record: dict, **kwargs: Any) -> Encoded:  # type: ignore[override]
        if kwargs or self.task.conversation(record, labelled=False) is None:
            return super().encode(record, **kwargs)
        return encode_conversation(self, self.task, record, labelled=False)
