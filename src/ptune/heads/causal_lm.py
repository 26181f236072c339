"""Causal-LM head: next-token logits over the vocabulary at every position, from the base's LM head.

Training records are prompt/response pairs with the loss on the response only (the task's
``target_field``), plain text with the loss on every real token (``target_field: ''``), or
conversations (alpaca, chat, sharegpt, ChatGLM records: the task's ``format``, see
:mod:`ptune.data.formats`) rendered with the tokenizer's chat template, the loss on every assistant
turn (:mod:`ptune.heads.chat`). The
metrics are the mean token loss and its perplexity over the scored tokens, and, from generated text,
ROUGE-1/2/L and BLEU-4 against the target (evaluation by generation: ``ptune.engine.generation``);
generation goes through ``PtuneModel.generate`` / ``ptune.decoding.Decoder``.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..errors import DataError
from .base import Example, HeadBase, LMScores, MetricSpec, check_text_fields, cross_entropy
from .chat import check_chat_template, encode_conversation

if TYPE_CHECKING:
    from .config import HeadConfig


class CausalLMModule(nn.Module):
    packs_targets = True  # see forward: ptune.frozen's "LM head at the scored tokens only"

    def __init__(self, config: HeadConfig, base: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.scores = LMScores(base)

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, V) logits; or, when the batch carries ``labels`` (the engine's training and scoring
        passes, see :mod:`ptune.frozen`), (N, V) logits of only the N positions whose next token is
        scored, row by row: the vocabulary projection (Gemma: 262k words) skips prompt and padding."""
        labels = batch.get("labels")
        if labels is None:
            return self.scores(hidden)
        return self.scores(hidden[:, :-1][labels[:, 1:] != -100])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels[:, 1:]  # predict token t+1 from position t
        if logits.dim() == 2:  # packed: the scored positions only
            return cross_entropy(logits, target[target != -100])
        return cross_entropy(logits[:, :-1], target)


def _within_lengths(task: Any, encoder: Any, target: str | None) -> Any:
    """The encoder for one prompt/response record under the task's ``max_target_length`` (a longer response is
    refused) and ``max_source_length`` (the prompt's fields are cut, as for ``max_length``, to fit it)."""
    if task.max_target_length is None and task.max_source_length is None:
        return encoder  # as ever: max_length alone
    tok = encoder.tokenizer
    n_target = 0 if target is None else len(tok(target, add_special_tokens=False)["input_ids"]) + (
        tok.eos_token_id is not None)
    if task.max_target_length is not None and n_target > task.max_target_length:
        raise DataError(f"the response is {n_target} tokens, longer than max_target_length={task.max_target_length} "
                        "(--max-target-length); raise it or shorten the response")
    if task.max_source_length is None or task.max_source_length + n_target >= encoder.max_length:
        return encoder
    shorter = copy.copy(encoder)
    shorter.max_length = task.max_source_length + n_target
    return shorter


class CausalLMHead(HeadBase):
    name = "causal_lm"
    label_form = "text"
    generates = True  # a causal-LM run answers by continuing its prompt
    label_set = False
    one_label = False
    base_kinds = ("causal_lm",)
    data_formats = True  # prompt/response, alpaca, chat, sharegpt, ChatGLM records (ptune.data.formats)
    new_weights = False
    # loss and perplexity from the teacher-forced scoring pass; the others score generated text against the
    # target (ptune.metrics.generation_scores), reported by `ptune eval --generate` and `--eval-generate N`
    metrics = (MetricSpec("loss", higher_is_better=False), MetricSpec("perplexity", higher_is_better=False),
               MetricSpec("rouge1"), MetricSpec("rouge2"), MetricSpec("rougeL", aliases=("rouge_l", "rougel")),
               MetricSpec("bleu4", aliases=("bleu", "bleu-4")))

    def check_config(self, config: HeadConfig) -> None:
        pass  # the vocabulary is the label set

    def base_kind(self, is_encoder: bool) -> str:
        return "causal_lm"

    def peft_task_type(self, is_encoder: bool) -> str | None:
        return "CAUSAL_LM"

    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module:
        return CausalLMModule(config, base)

    def validate_record(self, task: Any, rec: dict, source: str, allow_unlabeled: bool) -> None:
        if task.conversation(rec, source, labelled=not allow_unlabeled) is not None:
            return  # a conversation, checked as it was read
        check_text_fields(task, rec, source)
        if task.target_field and not allow_unlabeled and not isinstance(rec.get(task.target_field), str):
            raise DataError(f"{source}: missing target field {task.target_field!r}")

    def resolve_labels(self, task: Any, splits: dict[str, list[dict]], tokenizer: Any, *, causal: bool,
                       log: Any = None) -> tuple[Any, dict[str, list[dict]]]:
        """Conversations need a chat template: refused here, before the model loads, when the tokenizer has none."""
        for split, records in splits.items():
            fmt = next((task.record_format(r) for r in records[:1]), None)
            if fmt is not None and fmt != "prompt_response":
                check_chat_template(tokenizer, f"the {split} data's {fmt} records (format {fmt})")
        return task, splits

    def encode(self, task: Any, encoder: Any, rec: dict, labelled: bool) -> Example:
        if task.record_format(rec) != "prompt_response":  # a conversation: the loss on its assistant turns
            return Example(encode_conversation(encoder, task, rec, labelled), None, rec)
        if task.target_field:  # prompt -> response: the loss falls on the response only
            target = rec.get(task.target_field) if labelled else None
            enc = _within_lengths(task, encoder, target).encode(rec, target=target)
        else:  # plain text: every real token after the first is a target
            enc = encoder.encode(rec)
            enc.labels = [t if v < 0 else -100 for t, v in zip(enc.input_ids, enc.virtual_index)]
        return Example(enc, None, rec)

    def rows(self, logits: torch.Tensor, labels: torch.Tensor | None, lengths: Sequence[int]) -> list[Any]:
        """Per row: (summed target-token loss, target-token count); the (T, V) logits are not kept."""
        out = []
        packed = logits.dim() == 2  # (N, V): the scored positions of every row, row by row (see forward)
        start = 0
        for j in range(labels.shape[0] if packed else logits.shape[0]):
            loss, count = 0.0, 0
            if labels is not None:
                lab = labels[j, 1:]
                keep = lab != -100
                if keep.any():
                    count = int(keep.sum())
                    rows = logits[start:start + count] if packed else logits[j, :-1][keep]
                    start += count
                    lp = torch.log_softmax(rows.float(), -1)
                    loss = float(-lp.gather(1, lab[keep][:, None]).sum())
            out.append((loss, count))
        return out

    def decode(self, task: Any, example: Example, row: Any) -> Any:
        return None  # causal-LM runs answer through generate()

    def compute_metrics(self, task: Any, examples: Sequence[Example], rows: Sequence[Any]) -> dict[str, float]:
        mean = sum(r[0] for r in rows) / max(sum(r[1] for r in rows), 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}

    def result(self, task: Any, rec: dict, prediction: Any, row: Any) -> dict[str, Any]:
        if row is None:  # Run.predict: the prompt's continuation, written by generate()
            return {"generated": prediction}
        loss, count = row
        return {"loss": loss / count if count else None, "tokens_scored": count}
