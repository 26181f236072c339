"""Batched decoding: many generation requests, each with its own adapter, decoded together step by step.

Decoding on a CPU is bound by reading the weights, so one step for 8 rows costs about what one step
for one row does. :class:`Decoder` keeps one running batch (continuous batching, as vLLM / TGI do):

- a request joins at a step boundary: its prompt is prefilled (with any other newcomers, left-padded)
  and its key / value cache merged into the running batch's (left-padded to a common length);
- every step feeds each row its last token and picks the next (greedy, or temperature / top-p
  sampling from the row's own seeded generator);
- a row leaves when it meets an end-of-sequence token, its ``max_new_tokens`` or one of its stop
  strings, or is cancelled (a client gone); its cache rows are dropped at the next step.

Every forward call is :meth:`ptune.model.PtuneModel.hidden_states`, the path of training and scoring,
with a transformers ``DynamicCache``: each row's adapter acts through the model's hooks with the row's
``task_ids`` (input prompts at the prefill, deep prompts and per-row low-rank / bias deltas at every
step: :class:`ptune.adapter_set.mixed.SetAdapter`), and the next-token logits come from the base's
own LM head (with Gemma's final soft-capping) at the last position. Positions count real tokens only
(padding is masked and never moves a row's positions), so a row decodes as it would alone, which the
tests check against ``PtuneModel.generate`` for every method. Causal LMs only (an encoder-decoder's
requests are served one at a time by ``Run.generate``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from .errors import ConfigError
from .heads.base import LMScores
from .model import PtuneModel
from .multitask import MultiHeadModel


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling: the row's own generator, so a seeded request repeats exactly
    stop: tuple[str, ...] = ()  # stop strings: the row ends once its text holds one (the text is cut before it)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature!r} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1]")


@dataclass
class Row:
    """One request being decoded: its adapter (``member``: the index of its head in a
    :class:`~ptune.multitask.MultiHeadModel`, -1 for the bare base; ignored on a one-adapter model)."""

    id: int
    member: int
    input_ids: list[int]
    virtual_index: list[int]
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string), "length", "cancelled"
    generator: torch.Generator | None = None
    length: int = 0  # real positions in the cache (prompt + fed tokens)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Decoder:
    """The running batch of one model (a :class:`PtuneModel`, or a set's multi-adapter model).

    ``eos_ids``: the tokens that end a sequence; ``detokenize``: ids -> text (for stop strings).
    Not thread-safe: one thread calls :meth:`add`, :meth:`cancel` and :meth:`step` (a server's model thread).
    """

    def __init__(self, model: PtuneModel, *, eos_ids: Sequence[int], pad_id: int,
                 detokenize: Callable[[list[int]], str] | None = None) -> None:
        if model.base.config.is_encoder_decoder:
            raise ConfigError("batched decoding is for causal LMs; an encoder-decoder generates with Run.generate")
        self.model = model.eval()
        self.lm = LMScores(model.base)
        self.eos = set(int(i) for i in eos_ids)
        self.pad_id = pad_id
        self.detokenize = detokenize
        self.rows: list[Row] = []  # in the running batch, in cache order
        self.waiting: list[Row] = []
        self.cache: DynamicCache | None = None
        self.width = 0  # cache columns (the longest row's positions; shorter rows are left-padded)
        self._ids = itertools.count()

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.waiting)

    def add(self, input_ids: Sequence[int], virtual_index: Sequence[int] | None = None, *, member: int = 0,
            sampling: Sampling = Sampling()) -> Row:
        """Queue a request; it joins the batch at the next :meth:`step`."""
        if not input_ids:
            raise ConfigError("a prompt needs at least one token")
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        row = Row(next(self._ids), member, list(input_ids),
                  list(virtual_index) if virtual_index is not None else [-1] * len(input_ids), sampling,
                  generator=gen)
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """End a request (its client left): its slot is freed at the next step, the others go on."""
        if not row.done:
            row.finish_reason = "cancelled"

    def reset(self) -> None:
        """Drop every row and the cache (after a failed step: the batch's state is unknown)."""
        for r in self.rows + self.waiting:
            if not r.done:
                r.finish_reason = "cancelled"
        self.rows, self.waiting, self.cache, self.width = [], [], None, 0

    @property
    def device(self) -> torch.device:
        return next(self.model.base.parameters()).device

    def _task_ids(self, rows: Sequence[Row]) -> torch.Tensor | None:
        if not isinstance(self.model, MultiHeadModel):
            return None  # one adapter: its own prompt table
        return torch.tensor([r.member for r in rows], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int]]:
        """One decoding step: newcomers prefilled and given their first token, every other row its next.
        Returns (row, token) for each token produced; finished rows leave the batch at the next step."""
        self._drop_finished()
        out: list[tuple[Row, int]] = []
        if self.rows:
            out += self._decode()
        # each adapter's rows side by side (the set's hooks then act on a slice of the batch, a view, not gathered rows)
        newcomers = sorted((r for r in self.waiting if not r.done), key=lambda r: r.member)
        self.waiting = []
        if newcomers:
            out += self._prefill(newcomers)
        return out

    # ------------------------------------------------------------------ the forward calls

    def _logits(self, hidden: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        with self.model._route(task_ids):  # an LM head with a row's low-rank branch or bias delta
            return self.lm.few_rows(hidden.contiguous()).float()  # (B, V)

    def _prefill(self, rows: list[Row]) -> list[tuple[Row, int]]:
        T = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        vindex = torch.full((len(rows), T), -1, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):  # left-padded, as generate() takes a batch
            n = len(r.input_ids)
            ids[i, T - n:] = torch.tensor(r.input_ids)
            vindex[i, T - n:] = torch.tensor(r.virtual_index)
            mask[i, T - n:] = 1
        ids, vindex, mask = ids.to(self.device), vindex.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens 0..n-1, whatever the padding
        cache = DynamicCache()
        task_ids = self._task_ids(rows)
        hidden = self.model.hidden_states(ids, mask, vindex, task_ids, positions, cache=cache)
        for r in rows:
            r.length = len(r.input_ids)
        self._join(rows, cache, T)
        return self._pick(rows, self._logits(hidden[:, -1], task_ids))

    def _decode(self) -> list[tuple[Row, int]]:
        rows = self.rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.zeros((len(rows), self.width + 1), dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            mask[i, self.width - r.length:] = 1
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=self.device)
        task_ids = self._task_ids(rows)
        hidden = self.model.hidden_states(ids, mask, None, task_ids, positions, cache=self.cache)
        self.width += 1
        for r in rows:
            r.length += 1
        return self._pick(rows, self._logits(hidden[:, -1], task_ids))

    # ------------------------------------------------------------------ tokens and stops

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[tuple[Row, int]]:
        out = []
        for r, row_logits in zip(rows, logits):
            token = self._sample(r, row_logits)
            r.tokens.append(token)
            out.append((r, token))
            if token in self.eos:
                r.finish_reason = "stop"
            elif r.sampling.stop and self.detokenize is not None and \
                    any(s in self.detokenize(r.tokens) for s in r.sampling.stop):
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.sampling.max_new_tokens:
                r.finish_reason = "length"
        return out

    @staticmethod
    def _sample(r: Row, logits: torch.Tensor) -> int:
        s = r.sampling
        if s.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, -1)
        if s.top_p < 1:  # nucleus: the smallest set of tokens whose probability reaches top_p
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=r.generator))

    # ------------------------------------------------------------------ the batch's cache

    def _layers(self, cache: DynamicCache) -> list[Any]:
        return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]

    def _join(self, rows: list[Row], cache: DynamicCache, width: int) -> None:
        """Merge a prefilled batch's cache into the running one, both left-padded to the longer width."""
        if self.cache is None or not self.rows:
            self.cache, self.width, self.rows = cache, width, list(rows)
            return
        total = max(self.width, width)
        for old, new in zip(self._layers(self.cache), self._layers(cache)):
            old.keys = torch.cat([_left_pad(old.keys, total), _left_pad(new.keys, total)])
            old.values = torch.cat([_left_pad(old.values, total), _left_pad(new.values, total)])
        self.width = total
        self.rows += rows
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].member)  # stable: arrival order within one
        if order != list(range(len(self.rows))):
            self.rows = [self.rows[i] for i in order]
            index = torch.tensor(order, device=self.device)
            for layer in self._layers(self.cache):
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.width = None, 0
            return
        index = torch.tensor(keep, device=self.device)
        trim = self.width - max(r.length for r in self.rows)  # columns that are padding in every row left
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.width -= trim


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D), zeros on the left (masked positions)."""
    missing = width - t.shape[2]
    return t if missing == 0 else torch.cat([t.new_zeros(*t.shape[:2], missing, t.shape[3]), t], dim=2)


__all__ = ["Decoder", "Row", "Sampling"]
