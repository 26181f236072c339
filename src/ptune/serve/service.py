"""What runs behind the endpoints: :class:`Adapters` (the labelling adapters in one ``AdapterSet`` and the
causal-LM ones as ``Run``s, all on one base), the Prometheus :class:`Metrics`, and :class:`Service`,
the asyncio queue and batching task that gathers requests of any adapters into one ``predict_batch``
call (``batching="mixed"``; ``"per-adapter"``: only requests of one adapter per call), with every model
call on one worker thread.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from ..adapter_io import find_adapter, read_spec
from ..adapter_set import AdapterSet, adapter_names
from ..errors import ConfigError, PtuneError
from ..heads import head_kind
from .schemas import ApiError, Limits

# ---------------------------------------------------------------------------------------------- adapters


def _generates(spec: Any) -> bool:
    """Whether an adapter answers through generate (a causal_lm head) rather than labelling its inputs."""
    head = getattr(spec, "head", None)
    return head is not None and head_kind(head.kind).generates


def _read(name: str, path: str | Path) -> tuple[Any, Path]:
    try:
        adapter_dir, _ = find_adapter(path)
        return read_spec(adapter_dir), adapter_dir
    except PtuneError as e:
        raise type(e)(f"adapter {name!r}: {e}") from None


def _same_base(a: Any, b: Any) -> bool:
    if a.name and a.name == b.name:
        return True
    fa = {k: v for k, v in (a.fingerprint or {}).items() if k != "name"}
    fb = {k: v for k, v in (b.fingerprint or {}).items() if k != "name"}
    return bool(fa) and fa == fb


class Adapters:
    """The labelling adapters (one :class:`AdapterSet`) and the generating ones (one ``Run`` each), on one base."""

    def __init__(self, aset: AdapterSet, runs: Mapping[str, Any] | None = None, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> None:
        self.set = aset
        self.runs: dict[str, Any] = dict(runs or {})
        self.consent = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}

    @classmethod
    def load(cls, adapters: Mapping[str, str | Path] | Sequence[str | Path], **consent: Any) -> "Adapters":
        named = adapter_names(adapters)
        specs = {name: _read(name, path) for name, path in named.items()}  # a missing run fails here, first
        labelling = {n: p for n, p in named.items() if not _generates(specs[n][0])}
        out = cls(AdapterSet.load(labelling, **consent), **consent)
        for name, path in named.items():
            if name not in labelling:
                out._check_base(name, specs[name][0])
                out.runs[name] = out._run(name, path)
        return out

    @property
    def names(self) -> list[str]:
        return self.set.names + list(self.runs)

    def __contains__(self, name: object) -> bool:
        return name in self.set or name in self.runs

    def _specs(self) -> list[tuple[str, Any]]:
        return ([(n, self.set._members[n].spec) for n in self.set.names]
                + [(n, r.model.spec) for n, r in self.runs.items()])

    def _check_base(self, name: str, spec: Any) -> None:
        from ..models import describe

        specs = self._specs()
        if not specs:
            return
        other, have = specs[0]  # every adapter held already shares one base
        if not _same_base(spec.base, have.base):
            raise ConfigError(
                f"adapter {name!r} needs the base {describe(spec.base.fingerprint or {'name': spec.base.name})} "
                f"but {other!r} needs {describe(have.base.fingerprint or {'name': have.base.name})}; one server "
                "serves one base: start one server per base")

    def _run(self, name: str, path: str | Path) -> Any:
        from ..engine.inference import Run

        try:
            return Run(path, **self.consent)
        except PtuneError as e:
            raise type(e)(f"adapter {name!r}: {e}") from None

    def add(self, name: str, path: str | Path) -> dict[str, Any]:
        if name in self:
            raise ConfigError(f"an adapter named {name!r} is already loaded; remove it first or pick another name")
        spec, _ = _read(name, path)
        self._check_base(name, spec)
        if _generates(spec):
            self.runs[name] = self._run(name, path)
        else:
            self.set.add(name, path)  # fingerprint-checked against the set's base
        return self.info(name)

    def remove(self, name: str) -> None:
        if name in self.runs:
            del self.runs[name]
        else:
            self.set.remove(name)

    def info(self, name: str) -> dict[str, Any]:
        if name in self.runs:
            run = self.runs[name]
            spec = run.model.spec
            return {"name": name, "path": str(run.path), "method": spec.method, "task": getattr(run.task, "name", None),
                    "head": spec.head.kind, "labels": list(run.task.labels),
                    "trainable_params": sum(t.numel() for t in run.model.trainable_state_dict().values()),
                    "template": spec.template.source, "endpoint": "generate"}
        return {**self.set.info(name), "endpoint": "predict"}

    @property
    def base_name(self) -> str | None:
        specs = self._specs()
        return specs[0][1].base.name if specs else None


# ---------------------------------------------------------------------------------------------- metrics


class _RecentLatency:
    """Latency quantiles over each endpoint's last ``size`` requests, as a Prometheus summary."""

    QUANTILES = (0.5, 0.9, 0.99)

    def __init__(self, size: int = 1024) -> None:
        self.samples: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=size))
        self.totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        self.lock = threading.Lock()
        self.size = size

    def observe(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.samples[endpoint].append(seconds)
            self.totals[endpoint][0] += 1
            self.totals[endpoint][1] += seconds

    def collect(self) -> list[Metric]:
        m = Metric("ptune_request_latency_recent_seconds",
                   f"request latency quantiles over each endpoint's last {self.size} requests", "summary")
        with self.lock:
            for endpoint, window in self.samples.items():
                values = sorted(window)
                for q in self.QUANTILES:
                    k = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
                    m.add_sample(m.name, {"endpoint": endpoint, "quantile": str(q)}, values[k])
                count, total = self.totals[endpoint]
                m.add_sample(m.name + "_count", {"endpoint": endpoint}, count)
                m.add_sample(m.name + "_sum", {"endpoint": endpoint}, total)
        return [m]


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, service: "Service") -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ptune_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("ptune_request_latency_seconds", "HTTP request latency by endpoint", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.recent = _RecentLatency()
        r.register(self.recent)
        self.batch_rows = Histogram("ptune_batch_rows", "rows per forward pass (dynamic batches)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_adapters = Histogram("ptune_batch_adapters", "distinct adapters per forward pass",
                                        buckets=(1, 2, 3, 4, 8, 16, 32), registry=r)
        self.batch_requests = Histogram("ptune_batch_requests", "requests gathered into one batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("ptune_batch_seconds", "time to score one batch on the worker",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.queue_wait = Histogram("ptune_queue_wait_seconds", "time a request waited before its batch ran",
                                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=r)
        self.rows = Counter("ptune_rows", "inputs scored or generated, by adapter", ["adapter"], registry=r)
        self.batch_failures = Counter("ptune_batch_failures", "batches that failed as a whole (their requests were "
                                      "retried one by one)", registry=r)
        Gauge("ptune_queue_rows", "rows waiting to be batched", registry=r).set_function(lambda: service.queued_rows)
        Gauge("ptune_queue_requests", "requests waiting to be batched", registry=r).set_function(
            lambda: (service.queue.qsize() if service.queue is not None else 0) + len(service.held))
        Gauge("ptune_adapters", "adapters loaded", registry=r).set_function(lambda: len(service.adapters.names))


# ---------------------------------------------------------------------------------------------- batching


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
        self.metrics = Metrics(self)

    # -- lifespan

    async def start(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptune-model")
        self.queue = asyncio.Queue()
        self.held.clear()
        self.queued_rows, self.closing = 0, False
        self.batcher = asyncio.get_running_loop().create_task(self._batch_loop(), name="ptune-batcher")

    async def stop(self) -> None:
        """Refuse new requests, score every queued one, then stop the worker."""
        self.closing = True
        if self.queue is not None and self.batcher is not None:
            self.queue.put_nowait(_STOP)
            try:
                await self.batcher
            except Exception:  # noqa: BLE001 - it answered what it could; shutting down regardless
                pass
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.queue = self.batcher = self.executor = None

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
