"""Seq2seq head: text to text on an encoder-decoder base (T5), scored by the base's own LM head.

A record's input fields go through the template into the encoder; its target (the task's
``target_field``, ending in the end-of-sequence token) is what the decoder is trained to write, with
the loss on the target tokens only. The decoder's logits at every target position come from the
base's LM head (T5 scales the decoder output by d_model**-0.5 first, ``scale_decoder_outputs``).
Metrics, all from one teacher-forced pass: the mean target-token loss (the default, as causal_lm),
perplexity, token accuracy and exact match; exact match under teacher forcing is exact match of
greedy decoding (greedy writes the target, end token included, exactly when every teacher-forced
argmax is the target's token). New inputs are answered by ``generate()`` (``Run.predict`` /
``ptune predict`` and ``ptune generate``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..batching import TargetRow
from ..encoder_decoder import SEQ2SEQ_KIND
from ..errors import ConfigError, DataError
from .base import Example, HeadBase, MetricSpec, check_text_fields, cross_entropy

if TYPE_CHECKING:
    from .config import HeadConfig


class Seq2SeqLMModule(nn.Module):
    def __init__(self, config: HeadConfig, base: nn.Module) -> None:
        super().__init__()
        self.config = config
        self._lm_head: list[nn.Module] = [base.get_output_embeddings()]  # a list: the base's module, not this head's
        cfg = base.config
        self.scale = cfg.d_model ** -0.5 if getattr(cfg, "scale_decoder_outputs", False) else 1.0

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._lm_head[0](hidden * self.scale if self.scale != 1.0 else hidden)  # (B, Tdec, V)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels)  # decoder position t predicts target token t (inputs shifted right)


class Seq2SeqHead(HeadBase):
    name = "seq2seq"
    label_form = "text"
    label_set = False
    one_label = False
    base_kinds = (SEQ2SEQ_KIND,)
    new_weights = False
    generates = True  # new inputs are answered by generate(), not by scoring
    metrics = (MetricSpec("loss", higher_is_better=False), MetricSpec("exact_match"), MetricSpec("token_accuracy"),
               MetricSpec("perplexity", higher_is_better=False))

    def check_config(self, config: HeadConfig) -> None:
        pass  # the vocabulary is the label set

    def base_kind(self, is_encoder: bool) -> str:
        return SEQ2SEQ_KIND

    def peft_task_type(self, is_encoder: bool) -> str | None:
        return "SEQ_2_SEQ_LM"

    def build(self, config: HeadConfig, base: nn.Module, hidden_size: int, is_encoder: bool) -> nn.Module:
        return Seq2SeqLMModule(config, base)

    def validate_record(self, task: Any, rec: dict, source: str, allow_unlabeled: bool) -> None:
        check_text_fields(task, rec, source)
        if not task.target_field:
            raise ConfigError(f"task {task.name}: a seq2seq task needs target_field (the text the decoder writes)")
        target = rec.get(task.target_field)
        if not allow_unlabeled and (not isinstance(target, str) or not target.strip()):
            raise DataError(f"{source}: missing or empty target field {task.target_field!r}")

    def encode(self, task: Any, encoder: Any, rec: dict, labelled: bool) -> Example:
        enc = encoder.encode(rec)
        target = None
        if labelled:
            eos = encoder.tokenizer.eos_token_id
            if eos is None:
                raise ConfigError("the tokenizer has no end-of-sequence token, so a target could not end and generation "
                                  "would not stop; give the tokenizer an eos_token (T5's is </s>)")
            ids = encoder.tokenizer(str(rec[task.target_field]), add_special_tokens=False)["input_ids"]
            target = ids[:max(encoder.max_length - 1, 0)] + [eos]  # the task's max_length bounds the target too
        return Example(TargetRow(enc.input_ids, enc.virtual_index, target=target), None, rec)

    def rows(self, logits: torch.Tensor, labels: torch.Tensor | None, lengths: Sequence[int]) -> list[Any]:
        """Per row: (summed target-token loss, target tokens, tokens whose argmax is right); no (T, V) logits kept."""
        out = []
        for j in range(logits.shape[0]):
            loss, count, right = 0.0, 0, 0
            if labels is not None:
                keep = labels[j] != -100
                if keep.any():
                    scores = logits[j][keep].float()
                    target = labels[j][keep]
                    loss = float(-torch.log_softmax(scores, -1).gather(1, target[:, None]).sum())
                    count, right = int(keep.sum()), int((scores.argmax(-1) == target).sum())
            out.append((loss, count, right))
        return out

    def decode(self, task: Any, example: Example, row: Any) -> Any:
        return None  # seq2seq runs answer through generate()

    def compute_metrics(self, task: Any, examples: Sequence[Example], rows: Sequence[Any]) -> dict[str, float]:
        tokens = max(sum(r[1] for r in rows), 1)
        scored = [r for r in rows if r[1]]
        mean = sum(r[0] for r in rows) / tokens
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)),
                "token_accuracy": sum(r[2] for r in rows) / tokens,
                "exact_match": sum(r[1] == r[2] for r in scored) / max(len(scored), 1)}

    def result(self, task: Any, rec: dict, prediction: Any, row: Any) -> dict[str, Any]:
        return {"generated": prediction}
