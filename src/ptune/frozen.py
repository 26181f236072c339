"""Work a frozen base does not need to redo: cached lower layers, and a last layer computed only where the head reads.

Two levers, both exact (same logits and gradients, up to float rounding), both switched by
:class:`ptune.engine.TrainConfig` options and held by ``PtuneModel.frozen``:

**Cached frozen layers** (``cache_frozen_layers``). A method confined to the upper layers (``layers``
option of P-Tuning v2 / prefix tuning / LoRA) leaves layers ``0 .. first_layer-1`` as the frozen base
has them, and nothing below ``first_layer`` needs a gradient (autograd already stops there: no tensor
below requires one). Their output for a row depends only on the row's tokens, so it is computed once
(first epoch, first evaluation) and reused: a batch whose rows are all cached skips those layers. The
key is the row's real token ids (after the template, truncation and max length), so anything that
changes the lower layers' input gives a different key; the cache belongs to one in-memory model, so the
base and the layer range cannot change under it. Used only where it is exact: right-padded rows, no
explicit position ids, and the lower layers without dropout (a method that keeps the base's dropout on
while training, like LoRA, uses the cache in evaluation only). Kept in memory up to ``cache_limit`` MB
(rows beyond it are computed each time), in float32 or, with ``cache_dtype bfloat16``, half the memory;
with ``cache_dir`` the rows live in a memory-mapped file there instead (bounded by the same limit), for
data sets whose lower-layer outputs outgrow memory. The file belongs to the process (it is unlinked
as soon as it is created), so no run ever reads another's rows.

**Pruned last layer** (``prune_last_layer``). A CLS-pooled classifier, a multiple-choice scorer or a
verbalizer reads one position per row. In the last layer only those positions' queries, attention
output and feed-forward are computed (keys and values still for every token, prefixes included). The
returned hidden states hold the exact values at the read positions and zeros elsewhere. BERT-family
layers (BERT, RoBERTa, ELECTRA, MiniLM...) only; other architectures run the full layer. The same
option makes a causal-LM head project only the positions whose next token is scored (the response of a
prompt/response pair) onto the vocabulary: on Gemma 3 (262k words) that projection costs about as
much as the whole body per token, and the prompt's positions never needed it.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .methods.layers import layer_list


def prunable(layer: nn.Module) -> bool:
    """A BERT-family encoder layer (self-attention query/key/value, output, intermediate, output), no cross-attention."""
    attn = getattr(getattr(layer, "attention", None), "self", None)
    return (attn is not None and all(isinstance(getattr(attn, n, None), nn.Module) for n in ("query", "key", "value"))
            and hasattr(layer.attention, "output") and hasattr(layer, "intermediate") and hasattr(layer, "output")
            and not getattr(layer, "add_cross_attention", False) and not getattr(layer, "is_decoder", False)
            and getattr(layer, "chunk_size_feed_forward", 0) == 0 and hasattr(attn, "attention_head_size"))


def pruned_bert_layer(layer: nn.Module, positions: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A stand-in for ``layer.forward`` computing only ``positions`` (B,) of each row; zeros elsewhere."""
    attn = layer.attention.self

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *_: Any,
                **kwargs: Any) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items()
                  if k not in ("encoder_hidden_states", "encoder_attention_mask", "past_key_values")}
        B, T, d = hidden_states.shape
        rows = torch.arange(B, device=hidden_states.device)
        pos = positions.to(hidden_states.device)
        hq = hidden_states[rows, pos].unsqueeze(1)  # (B, 1, d)
        q = attn.query(hq).view(B, 1, -1, attn.attention_head_size).transpose(1, 2)
        k = attn.key(hidden_states).view(B, T, -1, attn.attention_head_size).transpose(1, 2)
        v = attn.value(hidden_states).view(B, T, -1, attn.attention_head_size).transpose(1, 2)
        mask = attention_mask
        if mask is not None and mask.shape[-2] != 1:  # (B or 1, heads or 1, T, T): the read rows' lines
            mask = mask.expand(B, *mask.shape[1:])[rows, :, pos].unsqueeze(2)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, None)
        if interface is None:  # eager: what BERT's own eager attention computes
            from transformers.models.bert.modeling_bert import eager_attention_forward as interface
        out, _ = interface(attn, q, k, v, mask, dropout=attn.dropout.p if attn.training else 0.0,
                           scaling=attn.scaling, **kwargs)
        a = layer.attention.output(out.reshape(B, 1, -1), hq)
        y = layer.output(layer.intermediate(a), a)[:, 0]  # (B, d)
        return hidden_states.new_zeros(B, T, d).index_put((rows, pos), y)

    return forward


def _passthrough(hidden_states: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
    return hidden_states


@contextmanager
def _replaced(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``module.forward`` replaced for one call (hooks and ``__call__`` stay as they are)."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


class FrozenWork:
    """The two levers for one model (see the module docstring). ``stats`` counts what they saved."""

    def __init__(self, model: nn.Module, *, cache: bool = True, cache_limit_mb: float = 2048,
                 cache_dtype: torch.dtype = torch.float32, prune_last: bool = True,
                 cache_dir: str | None = None) -> None:
        try:
            self.layers = layer_list(model.base)
        except Exception:  # noqa: BLE001 - a body whose layers cannot be found: neither lever applies
            self.layers = None
        # layers 0 .. first-1 hold nothing trainable (a method's layer range); full fine-tuning and BitFit say 0
        self.first = getattr(model.adapter, "first_layer", 0) if cache and self.layers is not None else 0
        self.dropouts = [m for layer in (self.layers or [])[:self.first] for m in layer.modules()
                         if isinstance(m, nn.Dropout) and m.p > 0]
        self.prune = bool(prune_last and self.layers is not None and prunable(self.layers[-1]))
        self.targets_only = bool(prune_last and getattr(model.head, "packs_targets", False))
        self.limit = int(cache_limit_mb * 2 ** 20)
        self.dtype = cache_dtype
        self.store: dict[bytes, torch.Tensor] = {}  # key -> the row's (n, d) states (a view of the disk file with cache_dir)
        self.itemsize = torch.finfo(cache_dtype).bits // 8
        self.bytes = 0
        self.disk: torch.Tensor | None = None  # with cache_dir: one memory-mapped file of cache_limit bytes
        self.cache_dir = cache_dir if self.first else None
        self.out_dtype: torch.dtype | None = None
        self.stats = {"cached_batches": 0, "computed_batches": 0, "pruned_passes": 0}

    def describe(self) -> str | None:
        parts = []
        if self.first:
            parts.append(f"outputs of frozen layers 1-{self.first} cached per row (limit {self.limit / 2 ** 20:.0f} MB, "
                         f"{str(self.dtype).removeprefix('torch.')})")
        if self.prune:
            parts.append("last layer computed at the head's read positions only")
        if self.targets_only:
            parts.append("LM head computed at the scored tokens only")
        return "; ".join(parts) or None

    def summary(self) -> dict[str, Any]:
        return {**self.stats, "cached_rows": len(self.store), "cache_mb": round(self.bytes / 2 ** 20, 1)}

    @contextmanager
    def around(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
               positions: torch.Tensor | None) -> Iterator[None]:
        """Run one body forward call inside this block; it skips what it can."""
        with ExitStack() as stack:
            if self.prune and positions is not None:
                stack.enter_context(_replaced(self.layers[-1], pruned_bert_layer(self.layers[-1], positions)))
                self.stats["pruned_passes"] += 1
            keys = self._keys(input_ids, attention_mask, position_ids)
            if keys is None:
                yield
                return
            cached = [self.store.get(k) for k in keys]
            if all(c is not None for c in cached):
                h = self._assemble(cached, attention_mask)
                for layer in self.layers[:self.first - 1]:
                    stack.enter_context(_replaced(layer, _passthrough))
                stack.enter_context(_replaced(self.layers[self.first - 1], lambda *_a, **_k: h))
                self.stats["cached_batches"] += 1
                yield
                return
            handle = self.layers[self.first - 1].register_forward_hook(
                lambda _m, _a, out: self._keep(keys, out, attention_mask))
            stack.callback(handle.remove)
            self.stats["computed_batches"] += 1
            yield

    def _keys(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor | None) -> list[bytes] | None:
        if not self.first or position_ids is not None or any(m.training for m in self.dropouts):
            return None
        lengths = attention_mask.long().sum(1)
        T = attention_mask.shape[1]
        right_padded = attention_mask.bool() == (torch.arange(T, device=lengths.device)[None] < lengths[:, None])
        if not bool(right_padded.all()):
            return None
        ids = input_ids.detach().cpu()
        return [hashlib.blake2b(ids[i, :n].numpy().tobytes(), digest_size=16).digest()
                for i, n in enumerate(lengths.tolist())]

    def _keep(self, keys: list[bytes], out: Any, attention_mask: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor):  # a layer returning a tuple: not cached
            self.first = 0
            return
        self.out_dtype = out.dtype
        h = out.detach()
        for key, row, n in zip(keys, h, attention_mask.long().sum(1).tolist()):
            if key in self.store:
                continue
            size = n * row.shape[-1] * self.itemsize
            if self.bytes + size > self.limit:
                return
            if self.cache_dir is None:
                self.store[key] = row[:n].to(self.dtype).clone()
            else:  # the next free run of the file, viewed as the row's shape
                start = self.bytes // self.itemsize
                self.store[key] = self._disk()[start:start + n * row.shape[-1]].view(n, -1).copy_(row[:n])
            self.bytes += size

    def _disk(self) -> torch.Tensor:
        """The cache file: created (sparse) in ``cache_dir`` on first use, unlinked at once so it goes when
        the process does; the OS pages rows in and out, the process holds none of them."""
        if self.disk is None:
            import os
            import tempfile

            os.makedirs(self.cache_dir, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="ptune-frozen-", suffix=".bin", dir=self.cache_dir)
            os.close(fd)
            count = self.limit // self.itemsize
            self.disk = torch.from_file(path, shared=True, size=count, dtype=self.dtype)
            os.unlink(path)
        return self.disk

    def _assemble(self, cached: list[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = attention_mask.shape
        h = torch.zeros(B, T, cached[0].shape[-1], dtype=self.out_dtype, device=attention_mask.device)
        for i, row in enumerate(cached):
            h[i, :row.shape[0]] = row
        return h
