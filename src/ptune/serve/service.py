"""What runs behind the endpoints: :class:`Service` over the server's :class:`~.adapters.Adapters` and
:class:`~.metrics.Metrics`: the asyncio queue and batching task that gathers requests of any adapters into one ``predict_batch``
call (``batching="mixed"``; ``"per-adapter"``: only requests of one adapter per call), and the generation
requests decoded together (:class:`~.streams.DecodeLoop`), with every model call on one worker thread:
one decoding step, then whatever labelling batch or admin call is waiting, then the next step.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import re
import time
from typing import Any

from ..decoding import Sampling
from ..errors import ConfigError, PtuneError
from .adapters import Adapters
from .metrics import Metrics
from .schemas import ApiError, Limits
from .streams import DecodeLoop, Stream


@dataclasses.dataclass
class _Job:
    adapter: str
    rows: list[dict]
    future: asyncio.Future
    enqueued: float


_STOP = object()
BATCHING = ("mixed", "per-adapter")
_SCORING_FAILED = re.compile(r"^row \d+ \(adapter '.*?'\): ([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): ")


class Service:
    """The queue, the batching task and the one worker thread every model call runs on.

    ``batching``: ``"mixed"`` gathers requests of any adapters into one forward pass; ``"per-adapter"``
    gathers only requests of the adapter of the oldest waiting one (one adapter per forward pass, as a
    server of one adapter at a time does), setting the others aside, in arrival order, for the next
    batches; it does not wait out ``max_wait_ms`` while requests of other adapters are set aside."""

    def __init__(self, adapters: Adapters, limits: Limits, allow_admin: bool, batching: str = "mixed") -> None:
        if batching not in BATCHING:
            raise ConfigError(f"--batching={batching!r} must be one of {', '.join(BATCHING)}")
        self.adapters = adapters
        self.limits = limits
        self.allow_admin = allow_admin
        self.batching = batching
        self.held: collections.deque[_Job] = collections.deque()  # taken off the queue, not yet in a batch
        self.queue: asyncio.Queue | None = None
        self.queued_rows = 0
        self.closing = False
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.batcher: asyncio.Task | None = None
        self.batches = 0
        self.decode: DecodeLoop | None = None
        self.metrics = Metrics(self)

    # -- lifespan

    async def start(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptune-model")
        self.decode = DecodeLoop(self.adapters, self.executor.submit, self.limits.max_decode_rows, self.metrics)
        self.queue = asyncio.Queue()
        self.held.clear()
        self.queued_rows, self.closing = 0, False
        self.batcher = asyncio.get_running_loop().create_task(self._batch_loop(), name="ptune-batcher")

    async def stop(self, timeout: float = 60.0) -> None:
        """Refuse new requests, score every queued one, let the generations running finish (at most
        ``timeout`` seconds, then they end with an error), then stop the worker."""
        self.closing = True
        if self.queue is not None and self.batcher is not None:
            self.queue.put_nowait(_STOP)
            try:
                await self.batcher
            except Exception:  # noqa: BLE001 - it answered what it could; shutting down regardless
                pass
        if self.executor is not None and self.decode is not None:
            deadline = time.perf_counter() + timeout
            while self.decode.ticking and time.perf_counter() < deadline:
                await asyncio.sleep(0.02)
            if self.decode.ticking:
                self.executor.submit(self.decode.cancel_all, "the server stopped before this request finished")
                while self.decode.ticking:
                    await asyncio.sleep(0.02)
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.queue = self.batcher = self.executor = None

    # -- generate

    async def generate(self, adapter: str | None, prompt: str, sampling: Sampling) -> Stream:
        """A generation request for ``adapter`` (None: the bare base) queued to join the running batch at the
        next step; read its text from the returned :class:`Stream`. A prompt that does not fit: 400."""
        if self.executor is None or self.decode is None:
            raise ApiError(503, "the model worker is not running (start the app through its lifespan: uvicorn, "
                                "or `with TestClient(app)`)")
        if self.closing:
            raise ApiError(503, "the server is shutting down; retry on another instance")
        if self.decode.active >= self.limits.max_queue_rows:
            raise ApiError(503, f"the server is busy: {self.decode.active} generation requests are running or "
                                f"waiting (--max-queue-rows {self.limits.max_queue_rows}); retry later")
        stream = Stream(adapter, prompt, sampling, asyncio.get_running_loop())
        await self.call(self.decode.enqueue, stream)
        return stream

    def cancel(self, stream: Stream) -> None:
        """The client of ``stream`` left: free its row at the next step (safe from the event loop)."""
        if stream.done or self.executor is None or self.decode is None:
            return
        try:
            self.executor.submit(self.decode.cancel, stream)
        except RuntimeError:  # the worker has stopped
            pass

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the model's worker thread; a PtuneError becomes a 400, anything else a 500."""
        if self.executor is None:
            raise ApiError(503, "the model worker is not running (start the app through its lifespan: uvicorn, "
                                "or `with TestClient(app)`)")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))
        except PtuneError as e:
            raise ApiError(400, str(e)) from None
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - one request fails, never the server
            raise ApiError(500, f"{type(e).__name__}: {e}") from None

    # -- predict

    async def predict(self, adapter: str, rows: list[dict]) -> list[dict]:
        if self.queue is None or self.batcher is None or self.batcher.done():
            raise ApiError(503, "the batching worker is not running (start the app through its lifespan: uvicorn, "
                                "or `with TestClient(app)`)")
        if self.closing:
            raise ApiError(503, "the server is shutting down; retry on another instance")
        if self.queued_rows + len(rows) > self.limits.max_queue_rows:
            raise ApiError(503, f"the server is busy: {self.queued_rows} rows are queued (--max-queue-rows "
                                f"{self.limits.max_queue_rows}); retry later")
        future = asyncio.get_running_loop().create_future()
        self.queued_rows += len(rows)
        self.queue.put_nowait(_Job(adapter, rows, future, time.perf_counter()))
        return await future

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.limits.max_wait_ms / 1000
        most = self.limits.max_batch_size
        per_adapter = self.batching == "per-adapter"
        held = self.held  # jobs taken off the queue that did not join the last batch, in arrival order
        stopping = False
        while True:
            if held:
                job = held.popleft()
            elif stopping:
                break
            else:
                job = await self.queue.get()
                if job is _STOP:
                    break
            jobs, rows = [job], len(job.rows)
            for other in list(held):  # held jobs first: they came before anything still queued
                if per_adapter and other.adapter != job.adapter:
                    continue
                if rows + len(other.rows) > most:
                    break
                held.remove(other)
                jobs.append(other)
                rows += len(other.rows)
            deadline = loop.time() + wait
            while rows < most and not stopping:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0 or held:  # per-adapter: other adapters' requests wait; do not make them wait more
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if nxt is _STOP:
                    stopping = True  # score what was gathered and held (everything queued before the stop), then end
                    break
                if per_adapter and nxt.adapter != job.adapter:
                    held.append(nxt)  # waits for a batch of its own adapter
                    continue
                if rows + len(nxt.rows) > most:
                    held.append(nxt)  # opens the next batch
                    break
                jobs.append(nxt)
                rows += len(nxt.rows)
            try:
                await self._run_batch(jobs)
            except Exception as e:  # noqa: BLE001 - never let the batcher die
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(ApiError(500, f"{type(e).__name__}: {e}"))

    async def _run_batch(self, jobs: list[_Job]) -> None:
        now = time.perf_counter()
        rows = [r for j in jobs for r in j.rows]
        self.queued_rows -= len(rows)
        for j in jobs:
            self.metrics.queue_wait.observe(now - j.enqueued)
        size = self.limits.max_batch_size
        for start in range(0, len(rows), size):  # one forward pass per max_batch_size rows
            part = rows[start:start + size]
            self.metrics.batch_rows.observe(len(part))
            self.metrics.batch_adapters.observe(len({r["adapter"] for r in part}))
        self.metrics.batch_requests.observe(len(jobs))
        self.batches += 1
        try:
            results = await self.call(self._score, rows)
        except ApiError:
            self.metrics.batch_failures.inc()
            for j in jobs:  # the batch failed as a whole: each request alone, so one cannot fail the others
                try:
                    self._answer(j, await self.call(self._score, j.rows))
                except ApiError as e:
                    if not j.future.done():
                        j.future.set_exception(e)
            return
        start = 0
        for j in jobs:
            self._answer(j, results[start:start + len(j.rows)])
            start += len(j.rows)

    def _score(self, rows: list[dict]) -> list[dict]:
        t = time.perf_counter()
        try:
            return self.adapters.set.predict_batch(rows, batch_size=self.limits.max_batch_size)
        finally:
            self.metrics.batch_seconds.observe(time.perf_counter() - t)

    def _answer(self, job: _Job, results: list[dict]) -> None:
        if job.future.done():  # the client went away
            return
        errors = [(k, r["error"]) for k, r in enumerate(results) if "error" in r]
        if not errors:
            self.metrics.rows.labels(job.adapter).inc(len(results))
            job.future.set_result(results)
            return
        k, message = errors[0]
        status = 500 if _SCORING_FAILED.match(message) else 404 if "unknown adapter" in message else 400
        message = re.sub(r"^row \d+( \(adapter '.*?'\))?", f"inputs[{k}]", message)
        more = f" ({len(errors) - 1} more bad inputs)" if len(errors) > 1 else ""
        job.future.set_exception(ApiError(status, f"{message}{more}"))
