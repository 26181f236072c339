"""Encoder-decoder bases (the T5 family): the body's forward pass and which heads fit them.

An encoder-decoder body reads the (prompted) input in its encoder and the target, shifted right
behind the decoder start token, in its decoder (teacher forcing); the hidden states a head scores
are the decoder's. ``PtuneModel`` takes this path when its base says ``is_encoder_decoder``; the
adapter's hooks act as everywhere else: ``inject`` on the encoder's input embeddings (prompt tuning,
P-Tuning), ``attention_kwargs`` in every attention module of both stacks (each module picks its own
prefix, see :mod:`ptune.methods.prefix_seq2seq`). Such a base answers text with text only: the
``seq2seq`` head (``ptune.heads.seq2seq``); heads that score the hidden states of one stack
(classification, tagging, verbalizer, causal LM) are refused. Omitted: other encoder-decoders (BART,
Pegasus: their LM heads add a bias and their attention differs), refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModelError

SEQ2SEQ_KIND = "seq2seq_lm"  # the base kind (which transformers class loads it): AutoModelForSeq2SeqLM
MODEL_TYPES = ("t5", "mt5")  # the encoder-decoders written for (T5's attention, LM head and its output scaling)


def is_encoder_decoder(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def check_base_kind(config: Any, kind: str, name: str, head: str | None = None) -> None:
    """Refuse a head (or a base kind) that does not fit the model, naming what does."""
    model_type = getattr(config, "model_type", "?")
    if is_encoder_decoder(config) and kind != SEQ2SEQ_KIND:
        what = f"a {head} head" if head else f"loading it as a {kind.replace('_', ' ')}"
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model ({model_type}); ptune answers it with the seq2seq head only (text to "
            f"text: give the task a target field, --head seq2seq), so {what} is refused")
    if not is_encoder_decoder(config) and kind == SEQ2SEQ_KIND:
        raise UnsupportedModelError(
            f"the seq2seq head needs an encoder-decoder model (T5 family); {name} is a {model_type} model without a "
            "separate decoder: use the causal_lm head on the same input/target data")
    if is_encoder_decoder(config) and model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{name} is a {model_type} encoder-decoder; ptune supports the T5 family ({', '.join(MODEL_TYPES)}) among "
            "encoder-decoder models: use a T5 / mT5 / Flan-T5 checkpoint")


def shift_right(config: Any, labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for teacher forcing: (B, T) labels -> [start, y_0 .. y_{T-2}], -100 read as padding."""
    start, pad = config.decoder_start_token_id, config.pad_token_id
    if start is None or pad is None:
        raise ConfigError(f"the model's config needs decoder_start_token_id and pad_token_id (got {start!r}, {pad!r}); "
                          "T5 checkpoints set both (to the pad id 0)")
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad)


def decoder_inputs(base: nn.Module, labels: torch.Tensor | None,
                   decoder_input_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What the decoder reads: given ``decoder_input_ids``, or ``labels`` shifted right; {} for other bases."""
    if not is_encoder_decoder(base.config):
        return {}
    if decoder_input_ids is None:
        if labels is None:
            raise ConfigError("an encoder-decoder model scores a target: pass labels (the target ids) or "
                              "decoder_input_ids; to answer new inputs use generate()")
        decoder_input_ids = shift_right(base.config, labels)
    return {"decoder_input_ids": decoder_input_ids}


def encoder_decoder_hidden(base: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor,
                           extra: dict[str, Any], decoder_input_ids: torch.Tensor | None,
                           decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states (B, Tdec, d): the encoder over ``embeds`` (B, T, d), the decoder over
    ``decoder_input_ids`` attending to it. ``extra`` (deep prompts) reaches the attention of both stacks."""
    if decoder_input_ids is None:
        raise ConfigError("an encoder-decoder model (T5) needs the decoder's inputs (labels or decoder_input_ids); "
                          "multi-task runs, prompt ensembles and adapter sets do not support it")
    encoded = base.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask, **extra).last_hidden_state
    out = base.get_decoder()(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                             encoder_hidden_states=encoded, encoder_attention_mask=attention_mask, use_cache=False,
                             **extra)
    return out.last_hidden_state
