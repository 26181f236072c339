"""Prompt templates: where virtual tokens, anchor words, input fields and the label slot go.

P-Tuning (Liu et al. 2021, "GPT Understands, Too") places trainable pseudo tokens anywhere in a
template, mixed with real "anchor" words. ptune applies a template at tokenization time: every
virtual token becomes a placeholder position in ``input_ids`` and ``virtual_index`` records which
prompt vector fills it, so attention masks, position ids, tagging labels and the label slot are
right by construction. Syntax (one string, parsed once):

    [P] or [P:n]   one or n virtual tokens (numbered left to right across all segments)
    {name}         an input field of the record, e.g. {text}, {text_b}, {tokens}
    {mask}         the label slot: [MASK] for masked LMs, the next token for causal LMs
    {start}        where the tokenizer's own start tokens go ([CLS], <s>, BOS); default: the row's beginning.
                   "[P:n]{start} {text}" puts the virtual tokens before [CLS], as HF PEFT does
    {{ }}          literal braces
    anything else  literal text (anchor words), tokenized as written, spaces included

Example: ``"[P:3] {text} [P:2] capital [P:1] {mask}"``. Truncation only ever shortens input fields:
virtual tokens, anchors, special tokens and the label slot are always kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import ConfigError, DataError, TemplateError

MASK = "mask"
START = "start"  # the slot of the tokenizer's special start tokens
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}  # escapes in literal text: a newline typed in a --template flag
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VIRTUAL_RE = re.compile(r"\[P(?::(\d+))?\]")


@dataclass(frozen=True)
class Segment:
    kind: str  # "virtual" | "field" | "text" | "mask" | "start"
    value: Any  # number of virtual tokens | field name | literal text | None


@dataclass(frozen=True)
class Template:
    """A parsed template. Build it with :meth:`Template.parse`."""

    source: str
    segments: tuple[Segment, ...]

    @classmethod
    def parse(cls, source: str) -> "Template":
        if not isinstance(source, str) or not source.strip():
            raise TemplateError("template is empty: give at least one input field, e.g. '{text}'")
        segs: list[Segment] = []
        text: list[str] = []
        i, n = 0, len(source)

        def flush() -> None:
            if text:
                segs.append(Segment("text", "".join(text)))
                text.clear()

        while i < n:
            c = source[i]
            if source.startswith("{{", i) or source.startswith("}}", i):
                text.append(c)
                i += 2
            elif c == "{":
                j = source.find("}", i)
                if j < 0:
                    raise TemplateError(
                        f"template {source!r}: '{{' at position {i} is never closed; write {{name}} "
                        "for a field or '{{{{' for a literal brace")
                name = source[i + 1:j].strip()
                if not _FIELD_RE.fullmatch(name):
                    raise TemplateError(
                        f"template {source!r}: {{{name}}} at position {i} is not a field name; "
                        "use letters, digits and '_' (e.g. {text}) or {mask} for the label slot")
                flush()
                segs.append(Segment("mask", None) if name == MASK else Segment("start", None) if name == START
                            else Segment("field", name))
                i = j + 1
            elif c == "}":
                raise TemplateError(
                    f"template {source!r}: unmatched '}}' at position {i}; write '}}}}' for a literal brace")
            elif source.startswith("[P", i) and (m := _VIRTUAL_RE.match(source, i)):
                count = int(m.group(1)) if m.group(1) is not None else 1
                if count < 1:
                    raise TemplateError(
                        f"template {source!r}: [P:{m.group(1)}] at position {i} asks for zero virtual "
                        "tokens; use [P:n] with n >= 1 or leave it out")
                flush()
                segs.append(Segment("virtual", count))
                i = m.end()
            elif source.startswith("[P:", i):
                raise TemplateError(
                    f"template {source!r}: malformed virtual-token marker at position {i}; "
                    "write [P] or [P:n] with a positive integer n")
            elif c == "\\" and source[i + 1:i + 2] in _ESCAPES:  # \n, \t, \\ as typed in a shell flag
                text.append(_ESCAPES[source[i + 1]])
                i += 2
            else:
                text.append(c)
                i += 1
        flush()
        tpl = cls(source, tuple(segs))
        if not tpl.fields:
            raise TemplateError(
                f"template {source!r} has no input field: add one such as {{text}} so the input reaches the model")
        if sum(s.kind == "mask" for s in segs) > 1:
            raise TemplateError(f"template {source!r} has more than one {{mask}} label slot; keep exactly one")
        if sum(s.kind == "start" for s in segs) > 1:
            raise TemplateError(f"template {source!r} has more than one {{start}} slot (where the tokenizer's start "
                                "tokens go); keep one")
        return tpl

    @property
    def num_virtual_tokens(self) -> int:
        return sum(s.value for s in self.segments if s.kind == "virtual")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(s.value for s in self.segments if s.kind == "field")

    @property
    def has_mask(self) -> bool:
        return any(s.kind == "mask" for s in self.segments)

    @property
    def has_start(self) -> bool:
        """Whether the template says where the tokenizer's start tokens go (``{start}``)."""
        return any(s.kind == "start" for s in self.segments)

    @property
    def prompts_first(self) -> bool:
        """Whether every virtual token comes before the start tokens and everything else (HF PEFT's layout):
        the template opens with ``[P:n]{start}`` and has no other virtual tokens."""
        kinds = [s.kind for s in self.segments]
        return kinds[:2] == ["virtual", "start"] and kinds.count("virtual") == 1

    def with_prefix_prompt(self, num_virtual_tokens: int, layout: str = "ptune") -> "Template":
        """The template with ``[P:k] `` prepended (prompt tuning's placement): after the tokenizer's start
        tokens (``layout="ptune"``), or before them (``"peft"``: ``[P:k]{start} ``, HF PEFT's placement)."""
        start = "{start}" if layout == "peft" else ""
        return Template.parse(f"[P:{num_virtual_tokens}]{start} {self.source}")

    def in_layout(self, layout: str) -> "Template":
        """This template (its virtual tokens already placed) in a prompt method's ``prompt_layout``: ``ptune``
        leaves it as written; ``peft`` needs one ``[P:n]`` group opening it and moves that group before the
        start tokens (``[P:n]{start} ...``). Any other placement of virtual tokens is refused."""
        if layout != "peft" or self.prompts_first or not self.num_virtual_tokens:
            return self
        lead = self.source.lstrip()
        first = _VIRTUAL_RE.match(lead)
        n = int(first.group(1) or 1) if first else 0
        if n != self.num_virtual_tokens or self.has_start:
            raise TemplateError(
                f"--prompt-layout peft (prompt_layout='peft') puts every virtual token before the tokenizer's "
                f"start tokens, where HF PEFT prepends them, but template {self.source!r} places virtual tokens "
                f"elsewhere; give a template opening with one [P:n] and no other [P] markers (e.g. "
                f"'[P:{self.num_virtual_tokens}] {{text}}'), or keep the default --prompt-layout ptune")
        rest = lead[first.end():]
        return Template.parse(f"[P:{n}]{{start}}{rest}")

    def __str__(self) -> str:
        return self.source


@dataclass
class Encoded:
    """One tokenized example. Lists are aligned position by position."""

    input_ids: list[int]
    virtual_index: list[int]  # -1 for real tokens, k for the k-th virtual token of the template
    labels: list[int] | None = None  # per-token labels (tagging / causal LM), -100 = ignored
    label_position: int = -1  # position whose LM logits score the label words (verbalizer)
    word_ids: list[int] = field(default_factory=list)  # tagging: word index at first sub-token, else -1
    num_words: int = 0  # tagging: words in the record (some may be truncated away)


class TemplateEncoder:
    """Applies a :class:`Template` to records with a tokenizer.

    ``causal`` says whether the label slot means "the next token" (causal LM) rather than a
    ``[MASK]`` token (masked LM). Fields are tokenized separately and joined, so literal text keeps
    its own spacing ("capital" vs " capital" matter for BPE vocabularies).
    """

    def __init__(self, template: Template | str, tokenizer: Any, *, max_length: int = 128,
                 causal: bool = False) -> None:
        self.template = Template.parse(template) if isinstance(template, str) else template
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.causal = causal
        if self.max_length < 1:
            raise ConfigError(f"max_length={max_length} must be a positive integer")
        if causal and self.template.has_mask and self.template.segments[-1].kind != "mask":
            raise TemplateError(
                f"template {self.template.source!r}: for a causal LM the label slot {{mask}} must end the "
                "template (the label is the next token); move {mask} to the end")
        if not causal and self.template.has_mask and tokenizer.mask_token_id is None:
            raise TemplateError(
                "template has a {mask} slot but the tokenizer has no mask token; use a masked LM "
                "or a causal LM (next-token verbalizer)")
        self.placeholder_id = next(
            t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0) if t is not None)
        self._prefix_ids, self._suffix_ids = _special_tokens(tokenizer)
        self._text_cache: dict[str, list[int]] = {}

    def _tok(self, text: str) -> list[int]:
        ids = self._text_cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._text_cache) < 4096:
                self._text_cache[text] = ids
        return ids

    def encode(self, record: dict, *, tagging_field: str | None = None,
               tags: Sequence[int] | None = None, target: str | None = None,
               token_fields: dict[str, Sequence[int]] | None = None) -> Encoded:
        """Tokenize ``record`` through the template.

        ``tagging_field``/``tags``: the field holding a list of words and their label ids (aligned
        to the first sub-token of each word). ``target``: causal-LM target text appended after the
        template; the loss then falls on the target tokens only. ``token_fields``: fields given as
        token ids (one window of a long context, span QA): placed as they are and never truncated;
        ``word_ids`` numbers their tokens 0, 1, ... where they land.
        """
        tpl = self.template
        # 1. tokenize every piece; fields are truncatable, the rest is fixed
        pieces: list[tuple[str, list[int], list[int]]] = []  # (kind, ids, word_ids)
        vcount = 0
        pending_space = ""
        for seg in tpl.segments:
            if seg.kind == "text":
                if seg.value.strip() == "":
                    pending_space += seg.value
                    continue
                # trailing spaces belong to the next piece: "of {x}" must give " France", as in running text
                body = seg.value.rstrip()
                pieces.append(("text", self._tok(pending_space + body), []))
                pending_space = seg.value[len(body):]
            elif seg.kind == "virtual":
                pieces.append(("virtual", list(range(vcount, vcount + seg.value)), []))
                vcount += seg.value
            elif seg.kind == "mask":
                pieces.append(("mask", [] if self.causal else [self.tokenizer.mask_token_id], []))
            elif seg.kind == "start":  # invisible in the text: the space before it carries on to what follows
                pieces.append(("start", list(self._prefix_ids), []))
            elif token_fields is not None and seg.value in token_fields:
                ids = list(token_fields[seg.value])
                pieces.append(("tokens", ids, list(range(len(ids)))))
                pending_space = ""
            else:
                value = record.get(seg.value)
                if value is None:
                    raise DataError(f"record has no field {seg.value!r} used by template {tpl.source!r}; "
                                    f"its fields are {sorted(record)}")
                if seg.value == tagging_field:
                    ids, wids = [], []
                    for w, word in enumerate(value):
                        sub = self._tok((pending_space if w == 0 else " ") + str(word)) or [self.placeholder_id]
                        ids.extend(sub)
                        wids.extend([w] + [-1] * (len(sub) - 1))
                    pieces.append(("field", ids, wids))
                else:
                    pieces.append(("field", self._tok(pending_space + str(value)), []))
                pending_space = ""
        target_ids: list[int] = []
        if target is not None:
            target_ids = self._tok(target) + ([self.tokenizer.eos_token_id]
                                              if self.tokenizer.eos_token_id is not None else [])
        # 2. truncate the longest field until everything fits
        fixed = len(self._prefix_ids) + len(self._suffix_ids) + len(target_ids) + sum(
            len(p[1]) for p in pieces if p[0] not in ("field", "start"))
        budget = self.max_length - fixed
        if budget < len([p for p in pieces if p[0] == "field"]):
            raise ConfigError(
                f"max_length={self.max_length} leaves no room for the input: the template's virtual tokens, "
                f"anchors, special tokens and target take {fixed}; raise max_length or shorten the template")
        lengths = [len(p[1]) if p[0] == "field" else 0 for p in pieces]
        while sum(lengths) > budget:
            k = max(range(len(lengths)), key=lambda j: lengths[j])
            lengths[k] -= 1
        # 3. assemble (the start tokens open the row, unless the template's {start} says where they go)
        input_ids = [] if tpl.has_start else list(self._prefix_ids)
        vindex = [-1] * len(input_ids)
        word_ids = [-1] * len(input_ids)
        label_position = -1
        for (kind, ids, wids), keep in zip(pieces, lengths):
            if kind == "virtual":
                input_ids.extend([self.placeholder_id] * len(ids))
                vindex.extend(ids)
                word_ids.extend([-1] * len(ids))
                continue
            if kind == "field":
                ids, wids = ids[:keep], (wids[:keep] if wids else [-1] * keep)
            elif kind == "mask":
                label_position = len(input_ids) - 1 if self.causal else len(input_ids)
                wids = [-1] * len(ids)
            elif kind != "tokens":
                wids = [-1] * len(ids)
            input_ids.extend(ids)
            vindex.extend([-1] * len(ids))
            word_ids.extend(wids)
        if self.causal and tpl.has_mask:
            suffix: list[int] = []  # nothing may follow the next-token slot
        else:
            suffix = list(self._suffix_ids)
        labels = None
        if target is not None:
            start = len(input_ids)
            input_ids.extend(target_ids)
            vindex.extend([-1] * len(target_ids))
            word_ids.extend([-1] * len(target_ids))
            labels = [-100] * start + target_ids
        input_ids.extend(suffix)
        vindex.extend([-1] * len(suffix))
        word_ids.extend([-1] * len(suffix))
        if labels is not None:
            labels.extend([-100] * len(suffix))
        num_words = 0
        if tagging_field is not None:
            num_words = len(record[tagging_field])
            if tags is not None:
                labels = [tags[w] if w >= 0 else -100 for w in word_ids]
        return Encoded(input_ids, vindex, labels, label_position, word_ids, num_words)


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a single sequence ([CLS] ... [SEP], <bos> ...)."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start:start + len(probe)] == probe:
            return list(full[:start]), list(full[start + len(probe):])
    return [], []
