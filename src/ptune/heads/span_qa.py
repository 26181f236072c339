"""Extractive question answering (span QA): start / end logits over the context tokens.

The BERT / P-Tuning v2 recipe: a new linear layer maps every position's hidden state to a start and an
end logit, and the answer is the best span of context tokens. The task's last text field is the context,
the others the question (``text_fields: [question, context]``); the template places them (default
``{question} [SEP] {context}``, virtual tokens wherever the method puts them; only context tokens can be
answers, never the question, anchors, special tokens or prompt placeholders). Answers are the task's
``label_field`` (``answers``) as HF's squad data sets hold them: ``{"text": [...], "answer_start": [...]}``
(character offsets into the context; a list of ``{"text", "answer_start"}`` is read too).

Windows. A context is tokenized once with the fast tokenizer's offsets. When question and context do not
fit ``max_length``, the context is cut into windows that overlap: each window is as many context tokens
as fit beside the question (at least half the room: a longer question is truncated), and windows start
``doc_stride`` tokens apart (the task's; 0 = half a window; never more than a window, so no token is
skipped). A record travels as one :class:`~ptune.batching.WindowRows` whose rows are its windows (the
body sees one row per window, as multiple choice sees one per choice), and the head regroups the windows
per record: logits (records, windows, T, 2), ``-inf`` where a record has fewer windows.

Training targets: in a window that holds the (first) answer whole, its first and last tokens; in any other
window position 0 (``[CLS]`` for BERT-like tokenizers), SQuAD 2.0's "no answer" slot, which also trains
windows without the answer in SQuAD 1.1 style tasks (as BERT's run_squad does). The softmax runs over the
window's context tokens and position 0. Prediction: over all windows of a record, the best span with
start <= end, at most ``max_answer_length`` tokens, both ends context tokens (score: start + end logit);
when the task has ``allow_no_answer``, "no answer" wins if the smallest null score of the record's windows
(start + end logit at position 0) beats the best span. The answer is cut from the original context by the
tokens' character offsets, so it is an exact substring. Metrics: SQuAD exact match and token F1
(``ptune.metrics.squad_scores``: the official v2.0 normalisation, max over gold answers, no answer = "").
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import WindowRows
from ..errors import ConfigError, DataError
from ..metrics import squad_scores
from ..templates import Encoded
from .base import Example, HeadBase, MetricSpec, check_text_fields, record_rows_mask

if TYPE_CHECKING:
    from .config import HeadConfig

NULL = 0  # the position whose start and end logits score "no answer"
START, END = 1, 2  # target codes in a window's labels: 0 a candidate position, -100 none, START | END the answer's ends


@dataclass
class Window(Encoded):
    """One window of a record: the template with a slice of the context's tokens, and per position the
    character span in the context of the token there (None off the context: question, prompt, specials)."""

    offsets: list[tuple[int, int] | None] = field(default_factory=list)


class SpanQAModule(nn.Module):
    def __init__(self, config: HeadConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.qa_outputs = nn.Linear(hidden_size, 2)

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """hidden (N, T, d) for the N windows of the batch -> (records, most windows, T, 2)."""
        mask = record_rows_mask(batch, hidden.shape[0], "span_qa", "context windows", "the records' WindowRows")
        logits = self.qa_outputs(self.dropout(hidden))
        out = logits.new_full((*mask.shape, *logits.shape[1:]), float("-inf"))
        out[mask.to(logits.device)] = logits  # row-major: record by record, window by window
        return out

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean of the start and end cross-entropies over each window's candidate positions."""
        flat = logits[logits[:, :, NULL, 0] != float("-inf")].float()  # (windows, T, 2)
        flat = flat.masked_fill((labels == -100).unsqueeze(-1), -1e9)
        starts = (labels > 0) & (labels & START > 0)
        ends = (labels > 0) & (labels & END > 0)
        return (F.cross_entropy(flat[..., 0], starts.float().argmax(1))
                + F.cross_entropy(flat[..., 1], ends.float().argmax(1))) / 2


class SpanQAHead(HeadBase):
    name = "span_qa"
    label_form = "span"
    multi_row = True  # one row per window of a long context: WindowRows
    label_set = False
    one_label = False
    metrics = (MetricSpec("f1"), MetricSpec("exact_match", aliases=("em", "exact")))

    def check_config(self, config: HeadConfig) -> None:
        if config.num_labels not in (0, 2):
            raise ConfigError(f"a span_qa head has two outputs per position (start, end); got num_labels="
                              f"{config.num_labels}")

    def default_template(self) -> str:
        return "{question} [SEP] {context}"

    def task_template(self, task: Any) -> str:
        questions, context = qa_fields(task)
        return task.template or " ".join("{%s}" % f for f in questions) + " [SEP] {%s}" % context

    def resolve(self, config: HeadConfig, template: Any, *, tokenizer: Any, label_words: Sequence[str],
                causal: bool) -> HeadConfig:
        if template.has_mask:
            raise ConfigError(f"a span_qa template has no {{mask}} slot (answers are spans of the context); remove it "
                              f"from {template.source!r}")
        if len(template.fields) < 2:
            raise ConfigError(f"a span_qa template needs the question and the context, e.g. '{{question}} [SEP] "
                              f"{{context}}'; got {template.source!r}")
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"a span_qa head maps answers to characters through a fast tokenizer's offsets; "
                              f"{type(tokenizer).__name__} is not fast (load the model's tokenizer.json)")
        return dataclasses.replace(config, num_labels=2)

    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module:
        return SpanQAModule(config, hidden_size)

    # --------------------------------------------------------------------------------- records

    def validate_record(self, task: Any, rec: dict, source: str, allow_unlabeled: bool) -> None:
        _, context_field = qa_fields(task)
        check_text_fields(task, rec, source)
        raw = rec.get(task.label_field)
        if raw is None:
            if rec.get("is_impossible") is True:
                raw = {"text": [], "answer_start": []}
            elif allow_unlabeled:
                return
            else:
                hint = "; the record has 'answers': give the task label_field: answers" if "answers" in rec else ""
                raise DataError(f"{source}: missing answers field {task.label_field!r} (fields present: "
                                f"{sorted(rec)}){hint}")
        answers = answer_list(raw, source, task.label_field)
        if rec.get("is_impossible") is True and answers:
            raise DataError(f"{source}: is_impossible is true but the record lists answers {answers!r:.80}")
        if not answers and not task.allow_no_answer:
            raise DataError(f"{source}: no answer given; for unanswerable questions (SQuAD 2.0 style) set "
                            f"allow_no_answer: true in task {task.name}")
        context = rec[context_field]
        for text, start in answers:
            if locate(context, text, start) is None:
                raise DataError(f"{source}: answer {text!r:.60} is not in the context at answer_start {start!r} (the "
                                f"context there reads {_around(context, start, len(str(text)))!r}); answer_start is "
                                "the answer's first character offset in the context")
        rec[task.label_field] = {"text": [t for t, _ in answers], "answer_start": [s for _, s in answers]}

    def record_from_text(self, task: Any, text: str) -> dict:
        questions, context = qa_fields(task)
        raise DataError(f"a span_qa run needs records with {questions[0]!r} and {context!r}, not plain text; pass "
                        "dicts (Python) or a JSONL file (CLI)")

    def encode(self, task: Any, encoder: Any, rec: dict, labelled: bool) -> Example:
        _, context_field = qa_fields(task)
        if context_field not in encoder.template.fields:
            raise ConfigError(f"template {encoder.template.source!r} has no {{{context_field}}} field, where the "
                              "context (the task's last text field) goes")
        context = rec[context_field]
        ids, offsets = tokenize_context(encoder, context_field, context)
        span = None  # the first answer's first and last context tokens
        if labelled:
            answers = answer_list(rec.get(task.label_field) or {"text": [], "answer_start": []}, "record",
                                  task.label_field)
            if answers:
                span = answer_tokens(context, offsets, *answers[0])
        windows = []
        for s, e in window_bounds(len(ids), window_size(encoder, rec, context_field), task.doc_stride):
            enc = encoder.encode(rec, token_fields={context_field: ids[s:e]})
            where = [offsets[s + k] if k >= 0 else None for k in enc.word_ids]
            if where[NULL] is not None:
                raise ConfigError(f"template {encoder.template.source!r} starts with the context and the tokenizer adds "
                                  "no leading token, but position 0 scores 'no answer': put the question first")
            labels = [0 if off is not None else -100 for off in where]
            labels[NULL] = 0
            if labelled:
                if span is not None and s <= span[0] and span[1] < e:
                    labels[enc.word_ids.index(span[0] - s)] |= START
                    labels[enc.word_ids.index(span[1] - s)] |= END
                else:
                    labels[NULL] = START | END
            common = {f.name: getattr(enc, f.name) for f in dataclasses.fields(Encoded)}
            windows.append(Window(**{**common, "labels": labels}, offsets=where))
        longest = max(windows, key=lambda w: len(w.input_ids))
        return Example(WindowRows(longest.input_ids, longest.virtual_index, choices=windows), None, rec)

    # --------------------------------------------------------------------------------- scoring

    def rows(self, logits: torch.Tensor, labels: torch.Tensor | None, lengths: Sequence[int]) -> list[Any]:
        """Per record its windows' (W, T, 2) fp32 scores."""
        out = []
        for row in logits.float().cpu():
            out.append(row[row[:, NULL, 0] != float("-inf")])
        return out

    def decode(self, task: Any, example: Example, row: torch.Tensor) -> dict[str, Any]:
        _, context_field = qa_fields(task)
        context = example.record[context_field]
        best: tuple[float, int, tuple[int, int], tuple[int, int]] | None = None
        null, null_window = float("inf"), 0
        for w, win in enumerate(example.encoded.choices):
            n = len(win.input_ids)
            start, end = row[w, :n, 0], row[w, :n, 1]
            if float(start[NULL] + end[NULL]) < null:
                null, null_window = float(start[NULL] + end[NULL]), w
            cand = [p for p, off in enumerate(win.offsets) if off is not None]
            if not cand:
                continue
            pos = torch.tensor(cand)
            scores = start[pos][:, None] + end[pos][None, :]
            gap = pos[None, :] - pos[:, None]
            scores = scores.masked_fill((gap < 0) | (gap >= task.max_answer_length), float("-inf"))
            k = int(scores.argmax())
            i, j = divmod(k, len(cand))
            value = float(scores.view(-1)[k])
            if value > float("-inf") and (best is None or value > best[0]):
                best = (value, w, (cand[i], cand[j]), (win.offsets[cand[i]][0], win.offsets[cand[j]][1]))
        if best is None or (task.allow_no_answer and null > best[0]):
            return {"answer": "", "start": None, "end": None,
                    "score": _probability(row[null_window], example.encoded.choices[null_window], NULL, NULL)}
        _, w, (ps, pe), (cs, ce) = best
        return {"answer": context[cs:ce], "start": cs, "end": ce,
                "score": _probability(row[w], example.encoded.choices[w], ps, pe)}

    def compute_metrics(self, task: Any, examples: Sequence[Example], rows: Sequence[Any]) -> dict[str, float]:
        preds = [self.decode(task, ex, row)["answer"] for ex, row in zip(examples, rows)]
        golds = [answer_texts(ex.record.get(task.label_field)) for ex in examples]
        out = squad_scores(preds, golds)
        has = [i for i, g in enumerate(golds) if any(t.strip() for t in g)]
        if task.allow_no_answer and has and len(has) < len(golds):  # the v2.0 script's HasAns / NoAns split
            out["has_answer_f1"] = squad_scores([preds[i] for i in has], [golds[i] for i in has])["f1"]
            none = [i for i in range(len(golds)) if i not in set(has)]
            out["no_answer_exact"] = squad_scores([preds[i] for i in none], [golds[i] for i in none])["exact_match"]
        return out

    def result(self, task: Any, rec: dict, prediction: Any, row: Any) -> dict[str, Any]:
        return {"answer": prediction["answer"], "start": prediction["start"], "end": prediction["end"],
                "score": prediction["score"]}


# ------------------------------------------------------------------------------------- helpers


def qa_fields(task: Any) -> tuple[tuple[str, ...], str]:
    """(question fields, context field): the context is the task's last text field."""
    if len(task.text_fields) < 2:
        raise ConfigError(f"task {task.name}: a span_qa task names its question and context fields, the context "
                          f"last: text_fields: [question, context] (got {list(task.text_fields)})")
    return tuple(task.text_fields[:-1]), task.text_fields[-1]


def answer_list(raw: Any, source: str, name: str) -> list[tuple[str, int]]:
    """(text, answer_start) pairs from HF's ``{"text": [...], "answer_start": [...]}`` or a list of such dicts."""
    if isinstance(raw, dict) and "text" in raw and "answer_start" in raw:
        texts, starts = raw["text"], raw["answer_start"]
        if not isinstance(texts, list):
            texts, starts = [texts], [starts]
        if not isinstance(starts, list) or len(starts) != len(texts):
            raise DataError(f"{source}: {name} must hold as many answer_start offsets as texts (got {raw!r:.80})")
        pairs = list(zip(texts, starts))
    elif isinstance(raw, list) and all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in raw):
        pairs = [(a["text"], a["answer_start"]) for a in raw]
    else:
        raise DataError(f"{source}: {name} must be {{\"text\": [...], \"answer_start\": [...]}} or a list of "
                        f"{{\"text\", \"answer_start\"}} (got {raw!r:.80})")
    for text, start in pairs:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}: an answer text must be non-empty text (got {text!r:.60})")
        if not isinstance(start, int) or isinstance(start, bool):
            raise DataError(f"{source}: answer_start must be an integer character offset (got {start!r:.30})")
    return pairs


def answer_texts(raw: Any) -> list[str]:
    if raw is None:
        return []
    return [t for t, _ in answer_list(raw, "record", "answers")]


def locate(context: str, text: str, start: int) -> tuple[int, int] | None:
    """The answer's character span in ``context`` at ``start``: exact, or with whitespace differing (leading /
    trailing spaces of the answer, a newline in the context where the answer has a space); else None."""
    if not 0 <= start <= len(context):
        return None
    words = text.split()
    if not words:
        return None
    i = start
    while i < len(context) and context[i].isspace():
        i += 1
    m = re.compile(r"\s+".join(re.escape(w) for w in words)).match(context, i)
    return (m.start(), m.end()) if m else None


def answer_tokens(context: str, offsets: list[tuple[int, int] | None], text: str, start: int) -> tuple[int, int]:
    """The first and last context tokens that overlap the answer's characters."""
    span = locate(context, text, start)
    if span is None:
        raise DataError(f"answer {text!r:.60} is not in the context at answer_start {start}")
    hit = [i for i, off in enumerate(offsets) if off is not None and off[0] < span[1] and off[1] > span[0]]
    if not hit:
        raise DataError(f"answer {text!r:.60} covers no token of the context (the tokenizer drops its characters)")
    return hit[0], hit[-1]


def _lead(template: Any, name: str) -> str:
    """The whitespace the template encoder puts before field ``name`` (it tokenizes ' ' + value after 'of ')."""
    pending = ""
    for seg in template.segments:
        if seg.kind == "text":
            if seg.value.strip() == "":
                pending += seg.value
                continue
            body = seg.value.rstrip()
            pending = seg.value[len(body):]
        elif seg.kind == "field":
            if seg.value == name:
                return pending
            pending = ""
    return pending


def tokenize_context(encoder: Any, name: str, context: str) -> tuple[list[int], list[tuple[int, int] | None]]:
    """The context's token ids as the template encoder would make them, and each token's character span in
    ``context`` (None for a token that covers no character of it)."""
    lead = _lead(encoder.template, name)
    got = encoder.tokenizer(lead + context, add_special_tokens=False, return_offsets_mapping=True)
    offsets = []
    for a, b in got["offset_mapping"]:
        a, b = max(a - len(lead), 0), max(b - len(lead), 0)
        offsets.append((a, b) if b > a else None)
    return list(got["input_ids"]), offsets


def window_size(encoder: Any, rec: dict, context_field: str) -> int:
    """Context tokens per window: what fits beside the question, at least half the room the template leaves."""
    fixed = len(encoder.encode(rec, token_fields={f: [] for f in encoder.template.fields}).input_ids)
    room = encoder.max_length - fixed
    if room < 2:
        raise ConfigError(f"max_length={encoder.max_length} leaves no room for a question and a context: the template's "
                          f"virtual tokens, anchors and special tokens take {fixed}; raise max_length")
    question = len(encoder.encode(rec, token_fields={context_field: []}).input_ids) - fixed
    return max(room - question, (room + 1) // 2)


def window_bounds(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) of each window over ``n`` context tokens; windows start ``stride`` tokens apart (0: half a
    window; at most a window, so every token is in some window) and the last one ends at the context's end."""
    step = min(stride or max(1, size // 2), size)
    out, s = [], 0
    while True:
        e = min(s + size, n)
        out.append((s, e))
        if e >= n:
            return out
        s += step


def _probability(row: torch.Tensor, window: Window, ps: int, pe: int) -> float:
    """P(start = ps) * P(end = pe), each a softmax over the window's candidate positions (its context and NULL)."""
    cand = torch.tensor(sorted({NULL, *(p for p, off in enumerate(window.offsets) if off is not None)}))
    start, end = row[cand, 0], row[cand, 1]
    return float(torch.exp(row[ps, 0] - start.logsumexp(0) + row[pe, 1] - end.logsumexp(0)))


def _around(context: str, start: Any, n: int) -> str:
    if not isinstance(start, int) or not 0 <= start <= len(context):
        return f"<offset outside the {len(context)}-character context>"
    return context[start:start + max(n, 1) + 10]
