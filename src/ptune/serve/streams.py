"""Generation on the model's worker thread, batched across requests and adapters.

Every request for a causal-LM adapter (or the bare base) is a :class:`Stream`. Its row joins the set's
running batch (:class:`ptune.decoding.Decoder`, through ``aset.generation``) at a step boundary, at most
``Limits.max_decode_rows`` rows at a time (the others wait, in arrival order). :class:`DecodeLoop` steps
the decoder while it holds rows, ONE step per task on the worker thread and then submits the next step
behind whatever was queued meanwhile: a labelling batch or an admin call runs between two decoding
steps, never waits for a whole generation. Each step's new text reaches its request through an asyncio
queue (``loop.call_soon_threadsafe``). Text is held back while it may still change (an unfinished UTF-8
character, the start of a stop string), so what is streamed is always a prefix of the final text and
the pieces add up to it exactly. A stream whose client left is cancelled (``Decoder.cancel``): its row
leaves the batch at the next step and the others go on.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from ..decoding import Row, Sampling
from .schemas import ApiError

if TYPE_CHECKING:
    from .adapters import Adapters
    from .metrics import Metrics


@dataclasses.dataclass(eq=False)
class Stream:
    """One generation request: what it asked for, and (filled on the worker thread) how it is going."""

    adapter: str | None  # None: the bare base
    prompt: str
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    input_ids: list[int] = dataclasses.field(default_factory=list)
    virtual_index: list[int] = dataclasses.field(default_factory=list)
    member: int = -1
    prompt_tokens: int = 0  # real tokens of the encoded prompt (template included, virtual tokens not)
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length" (or "cancelled": the client left)
    row: Row | None = None
    sent: str = ""  # the text delivered so far
    cancelled: bool = False
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter when its first token came

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def pieces(self) -> AsyncIterator[str]:
        """The new text, piece by piece as the tokens come; ends when the request finishes (or raises its error)."""
        while True:
            kind, value = await self.queue.get()
            if kind == "text":
                yield value
            elif kind == "end":
                return
            else:
                raise value

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])


def context_length(config: Any) -> int | None:
    """The most positions the model takes (prompt and new tokens together), None if its config does not say."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may still change: an unfinished UTF-8 character (shown as
    U+FFFD by the tokenizer) or the beginning of a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    body = text[:len(text) - hold]
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(body)), longest, -1):
            if body.endswith(s[:k]):
                longest = k
                break
    return hold + longest


class DecodeLoop:
    """The decoding side of the worker thread. Every method but :attr:`active` runs ON the worker thread
    (``submit`` puts a call on it, behind the calls already queued)."""

    def __init__(self, adapters: "Adapters", submit: Callable[..., Any], max_rows: int, metrics: "Metrics") -> None:
        self.adapters = adapters
        self.submit = submit
        self.max_rows = max_rows
        self.metrics = metrics
        self.waiting: collections.deque[Stream] = collections.deque()  # admitted, not yet in the batch
        self.streams: dict[int, Stream] = {}  # row id -> stream, for rows in the decoder
        self.ticking = False  # a step is queued on the worker (read from the event loop for shutdown)
        self.steps = 0

    @property
    def active(self) -> int:
        """Requests being decoded or waiting for a slot."""
        return len(self.streams) + len(self.waiting)

    # ------------------------------------------------------------------ requests in and out

    def enqueue(self, s: Stream) -> None:
        """Encode the prompt (the adapter's template), check it fits the context, queue it for the next step."""
        gen = self.adapters.set.generation
        s.input_ids, s.virtual_index, s.member = gen.encode(s.adapter, s.prompt)
        s.prompt_tokens = sum(1 for v in s.virtual_index if v < 0)
        context = context_length(self.adapters.set.base.config)
        need = len(s.input_ids) + s.sampling.max_new_tokens
        if context is not None and need > context:
            if len(s.input_ids) >= context:
                raw = len(self.adapters.set.tokenizer(s.prompt)["input_ids"])
                raise ApiError(400, f"the prompt is {max(raw, len(s.input_ids))} tokens, over this model's context of "
                                    f"{context} tokens (max_position_embeddings): shorten it", param="prompt",
                               code="context_length_exceeded")
            raise ApiError(400, f"the prompt ({len(s.input_ids)} tokens) and max_tokens ({s.sampling.max_new_tokens}) "
                                f"together are {need} tokens, over this model's context of {context}: lower max_tokens "
                                f"to at most {context - len(s.input_ids)} or shorten the prompt", param="max_tokens",
                           code="context_length_exceeded")
        self.waiting.append(s)
        self._schedule()

    def cancel(self, s: Stream) -> None:
        """The client left: its row leaves the batch at the next step (a waiting request never joins)."""
        if s.done:
            return
        s.cancelled, s.finish_reason = True, "cancelled"
        if s.row is not None:
            self.adapters.set.generation.decoder.cancel(s.row)
            self.streams.pop(s.row.id, None)
            self._schedule()  # its row and cache are dropped at the next step, even if no other row is left
        else:
            try:
                self.waiting.remove(s)
            except ValueError:
                pass
        self.metrics.cancelled.inc()

    def cancel_all(self, why: str) -> None:
        """End every request with an error (the server is stopping and they did not finish in time)."""
        for s in list(self.streams.values()) + list(self.waiting):
            self.cancel(s)
            self._put(s, "error", ApiError(503, why))

    # ------------------------------------------------------------------ the steps

    def _schedule(self) -> None:
        if not self.ticking:
            self.ticking = True
            self.submit(self._tick)

    def _tick(self) -> None:
        gen = self.adapters.set.generation
        decoder = gen.decoder
        try:
            while self.waiting and len(self.streams) < self.max_rows:  # join at this step boundary
                s = self.waiting.popleft()
                s.row = decoder.add(s.input_ids, s.virtual_index, member=s.member, sampling=s.sampling)
                self.streams[s.row.id] = s
            if not self.streams:
                if decoder.active:
                    decoder.step()  # only cancelled rows left: dropped, with their cache
                return
            start = time.perf_counter()
            produced = gen.step()
            self.steps += 1
            self.metrics.decode_steps.inc()
            self.metrics.decode_rows.observe(len(produced))
            self.metrics.decode_step_seconds.observe(time.perf_counter() - start)
            now = time.perf_counter()
            for row, _ in produced:
                s = self.streams.get(row.id)
                if s is None:  # cancelled meanwhile
                    continue
                if s.first_token is None:
                    s.first_token = now
                    self.metrics.first_token.observe(now - s.enqueued)
                self._deliver(s, row, gen)
        except Exception as e:  # noqa: BLE001 - fail the requests in the batch, never the server
            error = ApiError(500, f"decoding failed: {type(e).__name__}: {e}")
            for s in list(self.streams.values()):
                s.finish_reason = "error"
                self._put(s, "error", error)
            self.streams.clear()
            decoder.reset()
        finally:
            if self.streams or self.waiting or decoder.active:  # finished rows too: dropped, and their cache, next step
                self.submit(self._tick)  # behind any labelling batch queued during this step
            else:
                self.ticking = False

    def _deliver(self, s: Stream, row: Row, gen: Any) -> None:
        if row.done:
            text = gen.finished_text(row)
        else:
            text = gen.text([t for t in row.tokens if t not in gen.eos_ids])
            text = text[:len(text) - _held_back(text, row.sampling.stop)]
        if len(text) > len(s.sent) and text.startswith(s.sent):
            self._put(s, "text", text[len(s.sent):])
            s.sent = text
        if row.done:
            s.finish_reason, s.completion_tokens = row.finish_reason, len(row.tokens)
            self.streams.pop(row.id, None)
            self.metrics.tokens.labels(s.adapter or "(base)").inc(len(row.tokens))
            self._put(s, "end", row.finish_reason)

    @staticmethod
    def _put(s: Stream, kind: str, value: Any) -> None:
        try:
            s.loop.call_soon_threadsafe(s.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
            pass
