"""``ptune serve``: saved adapters on one frozen base behind a small HTTP API (FastAPI + uvicorn).

    ptune serve bbc=runs/bbc wnut=runs/wnut-lora --port 8000
    curl -s localhost:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"adapter": "bbc", "inputs": ["The striker scored twice"]}'

Labelling adapters (classification, tagging, verbalizer heads; every method an
:class:`~ptune.adapter_set.AdapterSet` accepts) share one base in one ``AdapterSet``. **Dynamic
batching across tasks**: requests of any adapters wait in one asyncio queue; a single background task
gathers them for up to ``max_wait_ms`` or ``max_batch_size`` rows and scores them in one
``AdapterSet.predict_batch`` call, i.e. one forward pass of the body for the whole mixed batch. Every
model call (batches, generation, loading and unloading adapters) runs in ONE worker thread, so
requests never race on the model and the event loop stays free to accept more requests.

Causal-LM adapters (``causal_lm`` head) answer ``POST /v1/generate``. An ``AdapterSet`` cannot hold
them, so each is held as a :class:`ptune.engine.Run`, which loads **its own copy** of the base; it must
be the same base as the labelling adapters' (same name, or the same fingerprint), otherwise startup
fails. Generation is not batched across requests: one request's prompts are generated together on
the worker thread, between scoring batches.

Endpoints: ``POST /v1/predict``, ``POST /v1/generate``, ``GET /v1/adapters``, ``POST /v1/adapters``
and ``DELETE /v1/adapters/{name}`` (only with ``allow_admin``), ``GET /health``, ``GET /metrics``
(Prometheus text), ``GET /`` (a playground page) and FastAPI's ``/docs``. Every error is JSON,
``{"error": "<what is wrong and how to fix it>"}``, with a 4xx status for a bad request; a batch that
fails fails only its own requests (each is retried alone), never the server.

``create_app`` builds the app in-process (tests use ``fastapi.testclient.TestClient``); ``serve``
runs it under uvicorn, with a graceful shutdown on SIGTERM / Ctrl-C (uvicorn stops accepting
connections and waits for open requests, then the app's lifespan drains the queue).
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import re
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.exceptions import HTTPException

from .adapter_set import AdapterSet, adapter_names
from .errors import ConfigError, PtuneError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts; each is a ``ptune serve`` flag of the same name."""

    max_batch_size: int = 32
    """most rows in one forward pass (requests are gathered up to this many rows)"""
    max_wait_ms: float = 10.0
    """how long the first request of a batch waits for others to join it"""
    max_input_chars: int = 10_000
    """most characters in one input (a text, or all text fields of a record)"""
    max_rows_per_request: int = 64
    """most inputs (texts or prompts) in one request"""
    max_new_tokens: int = 256
    """the most tokens one /v1/generate request may ask for"""
    max_queue_rows: int = 4096
    """rows waiting to be scored beyond which requests are refused with 503 (back-pressure)"""

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "max_wait_ms" else 1
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= low \
                    or not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')}={value!r} must be a number >= {low}")


# ---------------------------------------------------------------------------------------------- schemas

Input = Union[StrictStr, dict[str, Any]]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"adapter": "bbc", "inputs": ["The striker scored twice in the cup final"]}]})
    adapter: StrictStr = Field(description="an adapter's name (GET /v1/adapters)")
    inputs: list[Input] = Field(description="texts to label (a tagging adapter splits each into words), or "
                                            'records naming the task\'s fields, e.g. {"tokens": ["John", "lives"]}')


class Prediction(BaseModel):
    model_config = ConfigDict(extra="allow")
    label: str | None = Field(None, description="the predicted label (classification, verbalizer)")
    probabilities: dict[str, float] | None = Field(None, description="each label's probability")
    tokens: list[str] | None = Field(None, description="the input's words (tagging)")
    tags: list[str] | None = Field(None, description="one tag per word (tagging)")


class PredictResponse(BaseModel):
    adapter: str
    results: list[Prediction] = Field(description="one result per input, in order")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"adapter": "story", "inputs": ["Once upon a time"], "max_new_tokens": 32, "temperature": 0.8, "top_p": 0.95}]})
    adapter: StrictStr = Field(description="a causal-LM adapter's name (GET /v1/adapters, endpoint generate)")
    inputs: list[StrictStr] = Field(description="prompts; each fills the adapter's template (its first field)")
    max_new_tokens: int | None = Field(None, description="tokens to generate per prompt (default 32, at most the "
                                                         "server's --max-new-tokens)")
    temperature: float = Field(0.0, description="0: greedy; > 0 (at most 10): sampling at this temperature")
    top_p: float = Field(1.0, description="nucleus sampling mass, in (0, 1]; with temperature > 0")


class Generation(BaseModel):
    text: str = Field(description="the continuation (new tokens only)")


class GenerateResponse(BaseModel):
    adapter: str
    results: list[Generation]


class AddAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "bbc2", "path": "runs/bbc2"}]})
    name: StrictStr = Field(description="the new adapter's name: letters, digits, '.', '_', '-'")
    path: StrictStr = Field(description="a run directory or an adapter folder on the server's disk")


class ErrorResponse(BaseModel):
    error: str


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "a bad request (the message names the problem)", 403: "admin endpoints are off (--allow-admin)",
    404: "no such adapter", 409: "an adapter of that name is already loaded",
    422: "a field of the wrong type", 503: "the queue is full, or the server is shutting down"}.items()}


class ApiError(HTTPException):
    """An HTTP error with a one-line JSON message ``{"error": ...}``."""


# ---------------------------------------------------------------------------------------------- adapters


def _generates(spec: Any) -> bool:
    """Whether an adapter answers through generate (a causal_lm head) rather than labelling its inputs."""
    from .heads import head_kind

    head = getattr(spec, "head", None)
    return head is not None and head_kind(head.kind).label_form == "text"


def _read(name: str, path: str | Path) -> tuple[Any, Path]:
    from .api import read_spec
    from .engine.inference import _find_adapter

    try:
        adapter_dir, _ = _find_adapter(Path(path))
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
        from .models import describe

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
        from .engine.inference import Run

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
            lambda: service.queue.qsize() if service.queue is not None else 0)
        Gauge("ptune_adapters", "adapters loaded", registry=r).set_function(lambda: len(service.adapters.names))


# ---------------------------------------------------------------------------------------------- batching


@dataclasses.dataclass
class _Job:
    adapter: str
    rows: list[dict]
    future: asyncio.Future
    enqueued: float


_STOP = object()
_SCORING_FAILED = re.compile(r"^row \d+ \(adapter '.*?'\): ([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): ")


class Service:
    """The queue, the batching task and the one worker thread every model call runs on."""

    def __init__(self, adapters: Adapters, limits: Limits, allow_admin: bool) -> None:
        self.adapters = adapters
        self.limits = limits
        self.allow_admin = allow_admin
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
        pending: Any = None
        stopping = False
        while not stopping:
            job = pending if pending is not None else await self.queue.get()
            pending = None
            if job is _STOP:
                break
            jobs, rows = [job], len(job.rows)
            deadline = loop.time() + wait
            while rows < self.limits.max_batch_size:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if nxt is _STOP:
                    stopping = True  # score what was gathered (everything queued before the stop), then end
                    break
                if rows + len(nxt.rows) > self.limits.max_batch_size:
                    pending = nxt  # opens the next batch
                    break
                jobs.append(nxt)
                rows += len(nxt.rows)
            try:
                await self._run_batch(jobs)
            except Exception as e:  # noqa: BLE001 - never let the batcher die
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(ApiError(500, f"{type(e).__name__}: {e}"))
        if pending is not None and pending is not _STOP:  # (cannot happen: the stop comes last) answer it anyway
            await self._run_batch([pending])

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


# ---------------------------------------------------------------------------------------------- checks


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _check_text(text: str, where: str, limits: Limits) -> int:
    if not text.strip():
        raise ApiError(400, f"{where} is empty: send some text")
    if len(text) > limits.max_input_chars:
        raise ApiError(400, f"{where} has {len(text)} characters; this server takes at most {limits.max_input_chars} "
                            "per input (--max-input-chars): shorten or split it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where} is not valid Unicode text (a lone surrogate {text[e.start]!a} at character "
                            f"{e.start}); send UTF-8 text") from None
    return len(text)


def _check_rows(inputs: list, limits: Limits, what: str = "inputs") -> None:
    if not inputs:
        raise ApiError(400, f"{what} is empty: send at least one")
    if len(inputs) > limits.max_rows_per_request:
        raise ApiError(400, f"{len(inputs)} {what}; this server takes at most {limits.max_rows_per_request} per request "
                            "(--max-rows-per-request): split the request")


def _record(value: Any, where: str, limits: Limits) -> dict:
    """An input checked: a text, or a record of text fields (a string, or a list of words)."""
    if isinstance(value, str):
        _check_text(value, where, limits)
        return {"text": value}
    if not value:
        raise ApiError(400, f"{where} is an empty object: name the task's fields, e.g. {{\"text\": ...}}")
    total = 0
    for key, field in value.items():
        if key == "adapter":
            raise ApiError(400, f"{where} names an adapter; the request's \"adapter\" applies to all its inputs")
        words = field if isinstance(field, list) else [field]
        for w in words:
            if not isinstance(w, str):
                raise ApiError(422, f"{where}.{key} must be a string or a list of strings, got {_json_type(w)}")
            try:
                w.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"{where}.{key} is not valid Unicode text (a lone surrogate {w[e.start]!a}); "
                                    "send UTF-8 text") from None
            total += len(w)
    if total > limits.max_input_chars:
        raise ApiError(400, f"{where} has {total} characters; this server takes at most {limits.max_input_chars} per "
                            "input (--max-input-chars): shorten or split it")
    return dict(value)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """One line for pydantic's errors: where (``inputs[2]``), what was expected and what came."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        where = e["loc"][-1] if len(e.get("loc", ())) > 1 else "?"
        return 400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])} (at character {where})"
    fields = {"adapter", "inputs", "max_new_tokens", "temperature", "top_p", "name", "path"}
    by_where: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        parts: list[str] = []
        for p in loc:
            if isinstance(p, int):
                parts.append(f"[{p}]")
            elif p in fields or not parts:
                parts.append(("." if parts else "") + str(p))
            else:
                break  # a union member's tag ("str", "dict[str,any]"): the same place
        where = "".join(parts) or "the request body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "model_attributes_type" and not loc:
            msg = "expected a JSON object (send Content-Type: application/json)"
        elif e.get("type") == "missing":
            msg = "is required"
        elif e.get("type") == "extra_forbidden":
            msg = "is not a field of this request (see /docs)"
        by_where.setdefault(where, [])
        if msg not in by_where[where]:
            by_where[where].append(msg)
        got.setdefault(where, e.get("input"))
    lines = []
    for where, msgs in list(by_where.items())[:3]:
        value = got[where]
        shown = "" if "required" in msgs or "not a field" in msgs[0] else f" (got {_json_type(value)})"
        lines.append(f"{where}: {' or '.join(msgs)}{shown}")
    more = f" ({len(by_where) - 3} more)" if len(by_where) > 3 else ""
    return 422, "; ".join(lines) + more



# ---------------------------------------------------------------------------------------------- the app


class _BodyCheck:
    """ASGI middleware: a POST body must be valid UTF-8 (400 naming the byte) and at most ``max_bytes`` (413);
    it also times every request for the metrics."""

    KNOWN = {"/", "/health", "/metrics", "/docs", "/openapi.json", "/v1/predict", "/v1/generate", "/v1/adapters"}

    def __init__(self, app: Any, service: Service, max_bytes: int) -> None:
        self.app, self.service, self.max_bytes = app, service, max_bytes

    def _endpoint(self, path: str) -> str:
        if path in self.KNOWN:
            return path
        return "/v1/adapters/{name}" if path.startswith("/v1/adapters/") else "other"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                chunks, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        status[0] = 499  # the client closed the request
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await _error(413, f"the request body is over {self.max_bytes} bytes; send fewer or shorter "
                                          "inputs (--max-rows-per-request, --max-input-chars)")(scope, receive, send_status)
                        return
                    chunks.append(chunk)
                    more = message.get("more_body", False)
                body = b"".join(chunks)
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as e:
                    await _error(400, f"the request body is not valid UTF-8: byte 0x{body[e.start]:02x} at offset "
                                      f"{e.start} ({e.reason}); send JSON encoded as UTF-8")(scope, receive, send_status)
                    return
                replayed = False

                async def replay() -> dict:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            endpoint = self._endpoint(scope.get("path", ""))
            seconds = time.perf_counter() - start
            m = self.service.metrics
            m.requests.labels(endpoint, str(status[0])).inc()
            m.latency.labels(endpoint).observe(seconds)
            m.recent.observe(endpoint, seconds)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(adapter_set_or_paths: AdapterSet | Adapters | Mapping[str, str | Path] | Sequence[str | Path], *,
               max_batch_size: int = 32, max_wait_ms: float = 10.0, allow_admin: bool = False,
               max_input_chars: int = 10_000, max_rows_per_request: int = 64, max_new_tokens: int = 256,
               max_queue_rows: int = 4096, runs: Mapping[str, Any] | None = None, trust_remote_code: bool = False,
               allow_pickle: bool = False) -> FastAPI:
    """The FastAPI app serving ``adapter_set_or_paths``: an :class:`AdapterSet` (plus ``runs``, ``{name: Run}``
    of causal-LM adapters for /v1/generate), or run directories / adapter folders (``[name=]path`` strings
    or ``{name: path}``), loaded here: a missing run or adapters of different bases raise a
    :class:`~ptune.errors.PtuneError` now, before anything is served. Limits: see :class:`Limits`."""
    limits = Limits(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_input_chars=max_input_chars,
                    max_rows_per_request=max_rows_per_request, max_new_tokens=max_new_tokens,
                    max_queue_rows=max_queue_rows)
    limits.check()
    consent = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    if isinstance(adapter_set_or_paths, Adapters):
        adapters = adapter_set_or_paths
    elif isinstance(adapter_set_or_paths, AdapterSet):
        adapters = Adapters(adapter_set_or_paths, **consent)
    else:
        adapters = Adapters.load(adapter_set_or_paths, **consent)
    for name, run in (runs or {}).items():
        adapters._check_base(name, run.model.spec)
        adapters.runs[name] = run
    if not adapters.names and not allow_admin:
        raise ConfigError("no adapter to serve: give at least one run directory or adapter folder")
    service = Service(adapters, limits, allow_admin)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="ptune serve", version=_version(), lifespan=lifespan,
                  description="Adapters on one frozen base; requests for any adapters are batched together "
                              "(one forward pass per batch). Errors are JSON: {\"error\": \"...\"}. "
                              "Playground: [/](/), metrics: [/metrics](/metrics).")
    app.state.service = service
    per_input = limits.max_input_chars * 4 + 256  # UTF-8 and JSON escapes
    app.add_middleware(_BodyCheck, service=service, max_bytes=limits.max_rows_per_request * per_input + 65_536)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    def known(name: str) -> None:
        if name not in adapters:
            raise ApiError(404, f"unknown adapter {name!r}; this server holds {adapters.names} (GET /v1/adapters)")

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS,
              summary="Label texts with an adapter (classification: label + probabilities; tagging: tags)")
    async def predict(req: PredictRequest) -> Any:
        known(req.adapter)
        if req.adapter in adapters.runs:
            raise ApiError(400, f"adapter {req.adapter!r} generates text (a causal_lm head): use POST /v1/generate")
        _check_rows(req.inputs, limits)
        rows = [{**_record(x, f"inputs[{i}]", limits), "adapter": req.adapter} for i, x in enumerate(req.inputs)]
        return {"adapter": req.adapter, "results": await service.predict(req.adapter, rows)}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS,
              summary="Continue prompts with a causal-LM adapter")
    async def generate(req: GenerateRequest) -> Any:
        known(req.adapter)
        if req.adapter not in adapters.runs:
            head = adapters.info(req.adapter)["head"]
            raise ApiError(400, f"adapter {req.adapter!r} has a {head} head: it labels its inputs (POST /v1/predict); "
                                f"/v1/generate serves causal-LM adapters ({sorted(adapters.runs) or 'none loaded'})")
        _check_rows(req.inputs, limits, "prompts")
        for i, p in enumerate(req.inputs):
            _check_text(p, f"inputs[{i}]", limits)
        new_tokens = min(32, limits.max_new_tokens) if req.max_new_tokens is None else req.max_new_tokens
        if not 1 <= new_tokens <= limits.max_new_tokens:
            raise ApiError(400, f"max_new_tokens={new_tokens}: this server generates 1 to "
                                f"{limits.max_new_tokens} tokens per request (--max-new-tokens)")
        if not 0.0 <= req.temperature <= 10.0:
            raise ApiError(400, f"temperature={req.temperature} must be in [0, 10] (0: greedy)")
        if not 0.0 < req.top_p <= 1.0:
            raise ApiError(400, f"top_p={req.top_p} must be in (0, 1]")
        options: dict[str, Any] = {"do_sample": req.temperature > 0}
        if req.temperature > 0:
            options.update(temperature=req.temperature, top_p=req.top_p)
        if service.closing:
            raise ApiError(503, "the server is shutting down; retry on another instance")
        run = adapters.runs[req.adapter]
        texts = await service.call(run.generate, list(req.inputs), max_new_tokens=new_tokens, **options)
        service.metrics.rows.labels(req.adapter).inc(len(texts))
        return {"adapter": req.adapter, "results": [{"text": t} for t in texts]}

    @app.get("/v1/adapters", summary="The adapters served: name, method, task, head, labels, trainable parameters")
    async def list_adapters() -> dict[str, Any]:
        return {"base": adapters.base_name, "adapters": [adapters.info(n) for n in adapters.names]}

    def admin() -> None:
        if not service.allow_admin:
            raise ApiError(403, "loading and unloading adapters is off; start the server with --allow-admin "
                                "(Python: create_app(..., allow_admin=True))")

    @app.post("/v1/adapters", status_code=201, responses=ERRORS,
              summary="Load an adapter at run time (needs --allow-admin; refused for another base)")
    async def add_adapter(req: AddAdapterRequest) -> dict[str, Any]:
        admin()
        if not NAME_RE.match(req.name):
            raise ApiError(400, f"adapter name {req.name!r}: use letters, digits, '.', '_' and '-' (at most 100, "
                                "starting with a letter or digit)")
        if req.name in adapters:
            raise ApiError(409, f"an adapter named {req.name!r} is already loaded; DELETE /v1/adapters/{req.name} "
                                "first or pick another name")
        return await service.call(adapters.add, req.name, req.path)

    @app.delete("/v1/adapters/{name}", responses=ERRORS, summary="Unload an adapter (needs --allow-admin)")
    async def remove_adapter(name: str) -> dict[str, Any]:
        admin()
        known(name)
        await service.call(adapters.remove, name)
        return {"removed": name, "adapters": adapters.names}

    @app.get("/health", summary="Liveness: the adapters loaded and the queue")
    async def health() -> dict[str, Any]:
        running = service.batcher is not None and not service.batcher.done()
        return {"status": "ok" if running and not service.closing else "stopping" if service.closing else "stopped",
                "adapters": len(adapters.names), "queued_rows": service.queued_rows, "batches": service.batches}

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND)

    return app


def _version() -> str:
    from . import __version__

    return __version__


def serve(adapters: Sequence[str], *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          graceful_timeout: float = 60.0, say: Any = print, **options: Any) -> int:
    """Run the server until SIGTERM / Ctrl-C; 0 after a graceful stop. ``options``: :func:`create_app`'s.

    The port is bound first (``port=0``: any free port; the one bound is printed), then the adapters
    are loaded, so a busy port or a bad adapter fails at once with one :class:`PtuneError` line."""
    import signal
    import socket

    import uvicorn

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        app = create_app(adapters, **options)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        service: Service = app.state.service
        n = len(service.adapters.names)
        say(f"ptune: serving {n} adapter{'' if n == 1 else 's'} ({', '.join(service.adapters.names)}) on "
            f"http://{shown}:{bound[1]} (playground /, API docs /docs, metrics /metrics)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout))
        stops: list[int] = []
        previous = {s: signal.signal(s, lambda sig, frame: stops.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)}
        try:  # uvicorn handles the signals while it serves, then re-raises them: here they end the process cleanly
            server.run(sockets=[sock])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if not server.started:
            raise ConfigError("the server did not start (see the log above)")
        say(f"ptune: stopped{' on ' + signal.Signals(stops[0]).name if stops else ''} after {service.batches} "
            "batches; every queued request was answered", flush=True)
        return 0
    finally:
        sock.close()


PLAYGROUND = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ptune playground</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.4 system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 h1 { font-size: 1.4rem; } select, textarea, input, button { font: inherit; }
 textarea { width: 100%; box-sizing: border-box; }
 #about { color: #666; font-size: .9em; } #status { color: #b00; min-height: 1.4em; }
 .row { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
 .row .name { width: 10rem; text-align: right; overflow: hidden; text-overflow: ellipsis; }
 .track { flex: 1; background: #eee; height: 1.1rem; border-radius: 3px; }
 .bar { background: #3b7dd8; height: 100%; border-radius: 3px; } .top .bar { background: #1c5fb8; }
 .value { width: 4rem; font-variant-numeric: tabular-nums; }
 .tok { display: inline-block; margin: .15rem; padding: .1rem .3rem; border-radius: 3px; background: #f3f3f3; }
 .tok small { display: block; color: #1c5fb8; font-size: .75em; }
 #generated { white-space: pre-wrap; background: #f7f7f7; padding: .6rem; border-radius: 4px; }
</style></head>
<body>
<h1>ptune playground</h1>
<p><label>Adapter <select id="adapter"></select></label> <span id="about"></span></p>
<p><textarea id="text" rows="4" placeholder="Type some text">The striker scored twice in the cup final</textarea></p>
<p id="genopts" hidden>max new tokens <input id="max_new_tokens" type="number" value="32" min="1" style="width:5em">
 temperature <input id="temperature" type="number" value="0" step="0.1" min="0" style="width:5em">
 top p <input id="top_p" type="number" value="1" step="0.05" min="0" max="1" style="width:5em"></p>
<p><button id="go">Run</button> <span id="timing"></span></p>
<div id="status"></div>
<div id="out"></div>
<p style="margin-top:2rem;color:#666;font-size:.9em"><a href="/docs">API docs</a> · <a href="/metrics">metrics</a>
 · <a href="/v1/adapters">adapters</a></p>
<script>
const $ = (id) => document.getElementById(id);
const adapters = {};
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function describe() {
  const a = adapters[$('adapter').value]; if (!a) return;
  $('about').textContent = `${a.method}, ${a.head} head, task ${a.task}, ${a.trainable_params} trainable parameters`;
  $('genopts').hidden = a.endpoint !== 'generate';
}
async function loadAdapters() {
  const r = await fetch('/v1/adapters'); const body = await r.json();
  const sel = $('adapter'); sel.textContent = '';
  for (const a of body.adapters) {
    adapters[a.name] = a; const o = el('option', '', `${a.name} (${a.endpoint})`); o.value = a.name; sel.appendChild(o);
  }
  if (!body.adapters.length) $('status').textContent = 'no adapter is loaded';
  describe();
}
function showBars(result) {
  const out = $('out'); out.textContent = '';
  const probs = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of probs) {
    const row = el('div', 'row' + (label === result.label ? ' top' : ''));
    row.dataset.label = label;
    row.appendChild(el('span', 'name', label));
    const track = el('div', 'track'); const bar = el('div', 'bar'); bar.style.width = (100 * p).toFixed(1) + '%';
    track.appendChild(bar); row.appendChild(track); row.appendChild(el('span', 'value', p.toFixed(3)));
    out.appendChild(row);
  }
}
function showTags(result) {
  const out = $('out'); out.textContent = '';
  result.tokens.forEach((t, i) => { const s = el('span', 'tok', t); s.appendChild(el('small', '', result.tags[i]));
    out.appendChild(s); });
}
async function run() {
  const a = adapters[$('adapter').value]; if (!a) return;
  $('status').textContent = ''; const started = performance.now();
  const gen = a.endpoint === 'generate';
  const body = gen ? {adapter: a.name, inputs: [$('text').value], max_new_tokens: +$('max_new_tokens').value,
                      temperature: +$('temperature').value, top_p: +$('top_p').value}
                   : {adapter: a.name, inputs: [$('text').value]};
  try {
    const r = await fetch(gen ? '/v1/generate' : '/v1/predict', {method: 'POST',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
    const res = await r.json();
    $('timing').textContent = `${Math.round(performance.now() - started)} ms`;
    if (!r.ok) { $('out').textContent = ''; $('status').textContent = `error ${r.status}: ${res.error}`; return; }
    const result = res.results[0];
    if (gen) { $('out').textContent = ''; $('out').appendChild(el('div', '', '')).id = 'generated';
               $('generated').textContent = result.text; }
    else if (result.tags) showTags(result); else showBars(result);
    document.body.dataset.done = '1';
  } catch (e) { $('status').textContent = String(e); }
}
$('adapter').addEventListener('change', describe);
$('go').addEventListener('click', run);
$('text').addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) run(); });
loadAdapters().then(() => {  // ?adapter=NAME&text=... runs at once (links, tests)
  const q = new URLSearchParams(location.search);
  if (q.get('adapter')) $('adapter').value = q.get('adapter');
  if (q.get('text')) { $('text').value = q.get('text'); describe(); run(); }
}).catch((e) => { $('status').textContent = 'could not list the adapters: ' + e; });
</script>
</body></html>
"""

__all__ = ["Adapters", "Limits", "create_app", "serve"]
