"""Evaluation by generation: each record's prompt answered by greedy decoding, scored against its target.

ChatGLM's P-Tuning v2 recipe (``--predict_with_generate``) evaluates a generation task this way: the
model writes an answer for every prompt of the split, and ROUGE-1/2/L and BLEU-4 compare the answers
with the references (:func:`ptune.metrics.generation_scores`). Here the prompts are encoded as training
encoded them (the template with the method's virtual tokens; conversations through the chat template
with its generation prompt; the source cut to ``max_source_length``), decoded together by
:class:`ptune.decoding.Decoder` (greedy; rows of different lengths in one running batch, each row as
``generate()`` would write it alone; an encoder-decoder goes through ``generate()`` on left-padded
batches), and each answer ends at an end-of-sequence token, the chat template's end-of-turn token
(:func:`stop_ids`) or the task's ``stop`` strings. ``Run.evaluate_generation`` (``ptune eval
--generate``) and the training loop (``--eval-generate N``) both call :func:`generate_and_score`.
Sampling and beams are not offered for evaluation.
"""

from __future__ import annotations

import copy
from collections import deque
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch

from ..batching import collate
from ..data import Task
from ..decoding import Decoder, Sampling
from ..encoder_decoder import is_encoder_decoder
from ..heads.chat import has_chat_template
from ..metrics import generation_scores
from ..model import PtuneModel
from ..templates import Encoded

DEFAULT_MAX_NEW_TOKENS = 64  # when the task bounds no target (max_target_length)
_PROBE = "ptune end-of-turn probe"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token the tokenizer's chat template closes an assistant turn with (Gemma's ``<end_of_turn>``,
    Llama 3's ``<|eot_id|>``, ChatML's ``<|im_end|>``), found by rendering a turn; [] without a chat template or
    when the text after the turn does not start with a special token."""
    if not has_chat_template(tokenizer):
        return []
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this shape has no turn end to learn from
        return []
    at = text.rfind(_PROBE)
    if at < 0:
        return []
    ids = tokenizer(text[at + len(_PROBE):].lstrip(" "), add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []))
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return [int(ids[0])] if ids and ids[0] in special else []


def stop_ids(model: PtuneModel, tokenizer: Any) -> list[int]:
    """The token ids that end a generated answer: the base's end-of-sequence id(s) (its generation config, its
    config, else the tokenizer's) and the chat template's end-of-turn token. Gemma 3's generation config
    names only ``<eos>``, so without the second a chat answer would run on to ``max_new_tokens``."""
    eos = None
    for source in (getattr(model.base, "generation_config", None), model.base.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            break
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return list(dict.fromkeys([*ids, *end_of_turn_ids(tokenizer)]))


def prompt_encoder(task: Task, encoder: Any) -> Any:
    """The encoder that writes a record's prompt as training saw it: with the task's ``max_source_length``
    the source is cut to it (training cut it so, beside its target), not to the whole row's ``max_length``."""
    limit = task.max_source_length
    if limit is None or limit >= encoder.max_length:
        return encoder
    shorter = copy.copy(encoder)
    shorter.max_length = limit
    return shorter


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` without leading whitespace, cut before the first of ``stops``, stripped."""
    text = text.lstrip()
    ends = [text.find(s) for s in stops if s in text]
    return (text[:min(ends)] if ends else text).strip()


def reference(task: Task, rec: dict) -> str:
    """What a record's answer should be: its last assistant turn (conversations) or its target field."""
    turns = task.conversation(rec)
    if turns is not None:
        return turns[-1]["content"].strip()
    return str(rec.get(task.target_field, "")).strip()


def prompt_text(task: Task, rec: dict) -> str:
    """The record's input as a person reads it: its last user turn (conversations) or its text fields."""
    turns = task.conversation(rec)
    if turns is not None:
        return next(t["content"] for t in reversed(turns) if t["role"] == "user")
    return "\n".join(str(rec.get(f, "")) for f in task.text_fields)


@torch.no_grad()
def generate_tokens(model: PtuneModel, rows: Sequence[Encoded], *, eos_ids: Sequence[int], pad_id: int,
                    max_new_tokens: int, batch_rows: int = 16, autocast: Callable[[], Any] | None = None
                    ) -> list[list[int]]:
    """Greedy continuations of encoded prompts (their new tokens, end-of-sequence tokens dropped), at most
    ``batch_rows`` decoding together; the model's train / eval mode is restored afterwards."""
    was_training = model.training
    context = autocast() if autocast is not None else nullcontext()
    out: list[list[int]] = [[] for _ in rows]
    eos = set(eos_ids)
    try:
        with context:
            if is_encoder_decoder(model.base.config):
                model.eval()
                for start in range(0, len(rows), batch_rows):
                    part = rows[start:start + batch_rows]
                    batch = collate(list(part), pad_id=pad_id, left=True)
                    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos),
                                         pad_token_id=pad_id)
                    for j, seq in enumerate(new.tolist()):
                        out[start + j] = _until_eos(seq, eos)
                return out
            decoder = Decoder(model, eos_ids=list(eos), pad_id=pad_id)
            sampling = Sampling(max_new_tokens=max_new_tokens)
            pending = deque(sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids)))  # similar lengths join together
            live: list[tuple[int, Any]] = []
            while pending or live:
                while pending and len(live) < batch_rows:
                    i = pending.popleft()
                    live.append((i, decoder.add(rows[i].input_ids, rows[i].virtual_index, sampling=sampling)))
                decoder.step()
                for i, row in live:
                    if row.done:
                        out[i] = _until_eos(row.tokens, eos)
                live = [(i, row) for i, row in live if not row.done]
            return out
    finally:
        model.train(was_training)


def _until_eos(tokens: Sequence[int], eos: set[int]) -> list[int]:
    return next((list(tokens[:k]) for k, t in enumerate(tokens) if t in eos), list(tokens))


def generate_and_score(model: PtuneModel, tokenizer: Any, task: Task, encoder: Any, records: Sequence[dict], *,
                       max_new_tokens: int | None = None, batch_rows: int = 16,
                       autocast: Callable[[], Any] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Answer each record's prompt by greedy decoding and score the answers against the references: ROUGE-1/2/L
    and BLEU-4 (``ptune.metrics``), and per record ``{"input", "reference", "prediction"}`` (plus its ``id``
    when it has one). ``max_new_tokens``: default the task's ``max_target_length``, else 64."""
    prompts = prompt_encoder(task, encoder)
    rows = [prompts.encode(rec) for rec in records]
    limit = max_new_tokens or task.max_target_length or DEFAULT_MAX_NEW_TOKENS
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else encoder.placeholder_id
    tokens = generate_tokens(model, rows, eos_ids=stop_ids(model, tokenizer), pad_id=pad_id, max_new_tokens=limit,
                             batch_rows=batch_rows, autocast=autocast)
    preds = [cut_at_stops(tokenizer.decode(t, skip_special_tokens=True), task.stop) for t in tokens]
    refs = [reference(task, rec) for rec in records]
    predictions = []
    for rec, ref, pred in zip(records, refs, preds):
        row = {"id": rec["id"]} if "id" in rec else {}
        predictions.append({**row, "input": prompt_text(task, rec), "reference": ref, "prediction": pred})
    return generation_scores(preds, refs), predictions
