"""PtuneModel: a frozen base, one adapter and one head, joined through a single forward path.

The forward path is the same for every method: embed ``input_ids`` with the base's own table, let
the adapter fill the virtual-token placeholders (``inject``), run the transformer body with any
per-layer arguments the adapter needs (``attention_kwargs``) inside its ``route`` (which rows are
whose, for per-row weight deltas), then let the head pool and score. Methods that change weights
(LoRA, BitFit) do so inside the base and make every hook an identity. Training, evaluation, a prompt
ensemble, several tasks' heads (:mod:`ptune.multitask`), a set of saved adapters (:mod:`ptune.adapter_set`)
and generation all run through ``hidden_states`` / ``head_batch`` here.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .encoder_decoder import decoder_inputs, encoder_decoder_hidden, is_encoder_decoder
from .heads import HeadConfig
from .methods.base import Adapter
from .models import backbone_of
from .spec import RunSpec
from .templates import Template


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    members: torch.Tensor | None = None  # a prompt ensemble's members' logits (B, K, ...); logits is their mean


class PtuneModel(nn.Module):
    """``base`` (frozen), ``adapter`` (the method's trainable part), ``head`` (a head kind's module) and
    ``spec``, the resolved facts it was built from (saved with the adapter, see :mod:`ptune.spec`)."""

    def __init__(self, base: nn.Module, adapter: Adapter, head: nn.Module, spec: RunSpec, *,
                 prompt_index: int = 0) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.head = head
        self.spec = spec
        self.prompt_index = prompt_index  # the prompt table rows use when no task_ids are given (multi-task views)
        self.member: int | None = None  # a prompt ensemble scored through one member only (see forward)
        self.base_dropout = adapter.keeps_base_dropout  # see train(); TrainConfig.base_dropout overrides it
        self.frozen: Any = None  # a ptune.frozen.FrozenWork: skips work the frozen base need not redo (set by the engine)
        self._adapter_enabled = True

    # the spec's facts under the names the rest of the code reads
    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def method_config(self) -> Any:
        return self.spec.method_config

    @property
    def head_config(self) -> HeadConfig:
        return self.spec.head

    @property
    def template(self) -> Template:
        return self.spec.template

    @property
    def fingerprint(self) -> dict:
        return self.spec.base.fingerprint

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def label_words(self) -> tuple[str, ...]:
        return self.spec.label_words

    @property
    def backbone(self) -> nn.Module:
        return backbone_of(self.base)

    @contextmanager
    def disable_adapter(self) -> Iterator["PtuneModel"]:
        """Inside the block the model computes exactly what the frozen base does (the head still
        scores its hidden states): no prompts, no prefixes, no low-rank updates, original biases."""
        self.adapter.set_enabled(False)
        self._adapter_enabled = False
        try:
            yield self
        finally:
            self._adapter_enabled = True
            self.adapter.set_enabled(True)

    def embed(self, input_ids: torch.Tensor, virtual_index: torch.Tensor | None,
              task_ids: torch.Tensor | None) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, d)
        if self._adapter_enabled and virtual_index is not None and bool((virtual_index >= 0).any()):
            embeds = self.adapter.inject(embeds, virtual_index, task_ids)
        return embeds

    def _attention_kwargs(self, batch_size: int, task_ids: torch.Tensor | None) -> dict[str, Any]:
        return self.adapter.attention_kwargs(batch_size, task_ids) if self._adapter_enabled else {}

    def _route(self, task_ids: torch.Tensor | None) -> Any:
        return self.adapter.route(task_ids) if self._adapter_enabled else nullcontext()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      virtual_index: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, reads: torch.Tensor | None = None,
                      decoder_input_ids: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """The transformer body's last hidden states (B, T, d) with the adapter in place.

        ``reads`` (B,): the one position per row the caller will read; with ``self.frozen`` set
        (:class:`ptune.frozen.FrozenWork`) the last layer may then be computed there only (zeros elsewhere).
        ``decoder_input_ids`` (B, Tdec): an encoder-decoder's decoder inputs; its states are the decoder's.
        ``cache``: a transformers ``Cache`` the body reads past keys / values from and appends these
        positions' to (decoding, :mod:`ptune.decoding`); ``attention_mask`` then covers the past positions too.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        task_ids = self.table_ids(input_ids.shape[0], task_ids, input_ids.device)
        embeds = self.embed(input_ids, virtual_index, task_ids)
        extra = self._attention_kwargs(input_ids.shape[0], task_ids)
        with self._route(task_ids):
            if is_encoder_decoder(self.base.config):  # T5: encoder, then decoder (see ptune.encoder_decoder)
                return encoder_decoder_hidden(self.base, embeds, attention_mask, extra, decoder_input_ids)
            skip = self.frozen.around(input_ids, attention_mask, position_ids, reads) if self.frozen else nullcontext()
            past = {"past_key_values": cache} if cache is not None else {}
            with skip:
                out = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=cache is not None, **past, **extra)
        return out.last_hidden_state

    def table_ids(self, batch_size: int, task_ids: torch.Tensor | None, device: Any) -> torch.Tensor | None:
        """The prompt table of each row: given, one ensemble member's, this view's, or None (table 0)."""
        if task_ids is not None:
            return task_ids
        index = self.member if self.member is not None else self.prompt_index
        return torch.full((batch_size,), index, dtype=torch.long, device=device) if index else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                virtual_index: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, label_position: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, choice_mask: torch.Tensor | None = None,
                choice_tokens: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                **_: Any) -> Output:
        """Scores (and the loss when ``labels`` are given).

        ``choice_mask`` (records, choices): a multiple-choice batch, whose rows are the records' choices
        flattened (see :func:`ptune.batching.collate`); its head scores one row per record.
        ``choice_tokens``: the choices' own tokens where an LM scores them (-100 elsewhere).
        An encoder-decoder base (T5) decodes ``decoder_input_ids``, by default ``labels`` shifted right.

        A prompt ensemble of K members (``spec.ensemble``) repeats every row K times in the batch, one
        copy per prompt table (Lester et al.: one forward pass, not K runs); the loss is the members'
        mean, and ``logits`` are the log of the members' mean probabilities (``members`` holds each one's).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        B, K = input_ids.shape[0], self.spec.ensemble
        repeated = K > 1 and task_ids is None and self.member is None and self._adapter_enabled
        if repeated:
            rep = lambda t: t.repeat_interleave(K, dim=0) if t is not None else None  # noqa: E731
            input_ids, attention_mask, virtual_index, label_position, position_ids, labels = map(
                rep, (input_ids, attention_mask, virtual_index, label_position, position_ids, labels))
            task_ids = torch.arange(K, device=input_ids.device).repeat(B)
        task_ids = self.table_ids(input_ids.shape[0], task_ids, input_ids.device)
        head_batch = self.head_batch(attention_mask, label_position, choice_mask, choice_tokens, labels)
        reads = self.head.read_positions(head_batch) if self.frozen and hasattr(self.head, "read_positions") else None
        decoder = decoder_inputs(self.base, labels, decoder_input_ids)  # {} unless an encoder-decoder base
        hidden = self.hidden_states(input_ids, attention_mask, virtual_index, task_ids, position_ids, reads, **decoder)
        logits = self.head(hidden, head_batch)
        loss = self.head.loss(logits, labels) if labels is not None else None
        if not repeated:
            return Output(logits, loss)
        members = logits.float().view(B, K, *logits.shape[1:])
        mean = members.log_softmax(-1).logsumexp(1) - torch.log(torch.tensor(float(K)))
        return Output(mean, loss, members)

    def head_batch(self, attention_mask: torch.Tensor, label_position: torch.Tensor | None,
                   choice_mask: torch.Tensor | None = None, choice_tokens: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What a head module reads beside the hidden states (its ``forward(hidden, batch)``)."""
        batch = {"attention_mask": attention_mask, "label_position": label_position}
        if choice_mask is not None:
            batch["choice_mask"] = choice_mask
        if choice_tokens is not None:
            batch["choice_tokens"] = choice_tokens
        if labels is not None and self.frozen and self.frozen.targets_only:
            batch["labels"] = labels  # the head may score the labelled positions only (ptune.frozen)
        return batch

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 virtual_index: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Generate with the adapter active; returns only the new tokens (B, new).

        Batches must be left-padded. All ``generate()`` options (sampling, beams, KV cache) apply.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        task_ids = self.table_ids(input_ids.shape[0], task_ids, input_ids.device)
        embeds = self.embed(input_ids, virtual_index, task_ids)
        extra = self._attention_kwargs(input_ids.shape[0], task_ids)
        handles = []
        out_embeddings = self.base.get_output_embeddings()
        if out_embeddings is not None:
            handles.append(out_embeddings.register_forward_pre_hook(_dense_input))
        if extra:
            # generate() refuses keyword arguments that the model's forward() does not name, so the
            # deep-prompt arguments reach every forward call through a pre-hook for this call only.
            # Rows are repeated per beam / returned sequence the way generate() expands its inputs.
            def add_extra(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                x = kwargs.get("input_ids")
                if x is None:
                    x = kwargs.get("inputs_embeds")
                if x is None:  # an encoder-decoder's decoding step
                    x = kwargs["decoder_input_ids"]
                rows = x.shape[0]
                return args, {**kwargs, **{k: v.repeat_interleave(rows // v.shape[0], dim=0)
                                           for k, v in extra.items()}}

            handles.append(self.base.register_forward_pre_hook(add_extra, with_kwargs=True))
            if is_encoder_decoder(self.base.config):  # generate() runs the encoder outside forward()
                handles.append(self.base.get_encoder().register_forward_pre_hook(add_extra, with_kwargs=True))
        try:
            with self._route(task_ids):
                out = self.base.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
            # an encoder-decoder returns the decoder's sequences, which open with the decoder start token
            return out[:, 1:] if is_encoder_decoder(self.base.config) else out
        finally:
            for handle in handles:
                handle.remove()

    def train(self, mode: bool = True) -> "PtuneModel":
        """Train mode for the adapter and head; the frozen base keeps dropout off unless ``base_dropout``.

        A frozen base gains nothing from dropout noise that the small adapter must learn around, and
        dropout costs a fifth to two fifths of a CPU training step; methods that train the base's own weights
        (BitFit, full fine-tuning) set ``base_dropout`` so the base trains as usual. LoRA's base stays
        frozen (its low-rank branch has its own dropout), so it trains without the base's dropout too.
        """
        super().train(mode)
        if mode and not self.base_dropout:
            self.base.eval()
            # transformers checkpoints a layer only while that layer is training: keep the modules that
            # carry the checkpointing flag (layers, the model body) training, their dropouts stay off
            for m in self.base.modules():
                if getattr(m, "gradient_checkpointing", False) is True:
                    m.training = True
        return self

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared tensors counted once."""
        seen: dict[int, tuple[int, bool]] = {}
        for p in self.parameters():
            seen[id(p)] = (p.numel(), p.requires_grad)
        total = sum(n for n, _ in seen.values())
        trainable = sum(n for n, g in seen.values() if g)
        return trainable, total

    def describe(self) -> str:
        """Trainable parameters and their share, and how the method chose its layers when it had to
        (``adapter.note``: LoRA's targets on an architecture without a table entry)."""
        t, n = self.trainable_parameters()
        note = getattr(self.adapter, "note", None)
        return (f"{self.method}: {t:,} trainable of {n:,} parameters ({100 * t / max(n, 1):.4f}%)"
                + (f"; {note}" if note else ""))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_parameters() if p.requires_grad}


def _dense_input(module: nn.Module, args: tuple) -> tuple | None:
    """Give the LM head densely strided hidden states.

    generate() slices the last position (``hidden[:, -1:]``); the slice keeps the full sequence's
    strides. With a frozen (``requires_grad=False``) bf16 weight, PyTorch's CPU linear then copies the
    whole transposed weight on every such call: 320 MB and 0.8 s for Gemma's 262k-token head, per
    generate() call and per prompt in the batch. A dense copy of the small input avoids it.
    """
    x = args[0]
    if x.dim() < 3 or x.stride() == torch.empty(x.shape, device="meta").stride():
        return None
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])
