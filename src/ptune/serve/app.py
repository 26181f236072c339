"""The FastAPI app: :func:`create_app` wires a :class:`~ptune.serve.service.Service` to the endpoints, the
JSON error handlers and the :class:`_BodyCheck` middleware (body size, UTF-8, request metrics);
:func:`serve` binds the port and runs the app under uvicorn until SIGTERM / Ctrl-C.
"""

import importlib.util
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..adapter_set import AdapterSet
from ..decoding import Sampling
from ..errors import ConfigError
from .page import PLAYGROUND
from .schemas import (ERRORS, NAME_RE, AddAdapterRequest, ApiError, GenerateRequest, GenerateResponse, Limits,
                      PredictRequest, PredictResponse, _check_rows, _check_text, _record, _validation_message,
                      error_body, openai_path)
from .adapters import Adapters
from .openai_api import add_openai_routes
from .service import BATCHING, Service

# ---------------------------------------------------------------------------------------------- the app


class _BodyCheck:
    """ASGI middleware: a POST body must be valid UTF-8 (400 naming the byte) and at most ``max_bytes`` (413,
    known from Content-Length before reading, or counted while reading); it also times every request for
    the metrics. An oversized body is read to its end (and dropped) before the 413 is sent, up to
    ``DRAIN_BYTES``: a server that answers and closes while the client still sends resets the connection,
    and the client never sees the answer."""

    KNOWN = {"/", "/health", "/metrics", "/docs", "/openapi.json", "/v1/predict", "/v1/generate", "/v1/adapters",
             "/v1/completions", "/v1/chat/completions", "/v1/models"}
    DRAIN_BYTES = 1 << 30

    def __init__(self, app: Any, service: Service, max_bytes: int) -> None:
        self.app, self.service, self.max_bytes = app, service, max_bytes

    def _endpoint(self, path: str) -> str:
        if path in self.KNOWN:
            return path
        if path.startswith("/docs-assets/"):
            return "/docs-assets"
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return "/v1/adapters/{name}" if path.startswith("/v1/adapters/") else "other"

    def _too_large(self, path: str) -> JSONResponse:
        return _error(413, f"the request body is over {self.max_bytes} bytes (--max-body-bytes); send fewer or "
                           "shorter inputs (--max-rows-per-request, --max-input-chars)", path, code="request_too_large")

    async def _drain(self, receive: Any, read: int) -> None:
        while read <= self.DRAIN_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        path = scope.get("path", "")

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                declared = dict(scope.get("headers") or []).get(b"content-length", b"")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    await self._drain(receive, 0)
                    await self._too_large(path)(scope, receive, send_status)
                    return
                chunks, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        status[0] = 499  # the client closed the request
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    more = message.get("more_body", False)
                    if size > self.max_bytes:
                        if more:
                            await self._drain(receive, size)
                        await self._too_large(path)(scope, receive, send_status)
                        return
                    chunks.append(chunk)
                body = b"".join(chunks)
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as e:
                    await _error(400, f"the request body is not valid UTF-8: byte 0x{body[e.start]:02x} at offset "
                                      f"{e.start} ({e.reason}); send JSON encoded as UTF-8", path)(scope, receive,
                                                                                                  send_status)
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
            endpoint = self._endpoint(path)
            seconds = time.perf_counter() - start
            m = self.service.metrics
            m.requests.labels(endpoint, str(status[0])).inc()
            m.latency.labels(endpoint).observe(seconds)
            m.recent.observe(endpoint, seconds)


def _error(status: int, message: str, path: str = "", param: str | None = None, code: str | None = None,
           headers: Any = None) -> JSONResponse:
    """An error answer in the shape of the endpoint at ``path`` (OpenAI's on the OpenAI-compatible ones)."""
    return JSONResponse(error_body(path, status, message, param, code), status_code=status, headers=headers)


def create_app(adapter_set_or_paths: AdapterSet | Adapters | Mapping[str, str | Path] | Sequence[str | Path], *,
               max_batch_size: int = 32, max_wait_ms: float = 10.0, allow_admin: bool = False,
               max_input_chars: int = 10_000, max_rows_per_request: int = 64, max_new_tokens: int = 256,
               max_queue_rows: int = 4096, max_decode_rows: int = 64, max_body_bytes: int = 4_194_304,
               runs: Mapping[str, Any] | None = None, trust_remote_code: bool = False,
               allow_pickle: bool = False, batching: str = "mixed", dtype: str = "auto") -> FastAPI:
    """The FastAPI app serving ``adapter_set_or_paths``: an :class:`AdapterSet` (its causal-LM adapters and
    its bare base generate, decoded together; plus ``runs``, ``{name: Run}`` of encoder-decoder adapters
    for /v1/generate, one request at a time), or run directories / adapter folders (``[name=]path`` strings
    or ``{name: path}``), loaded here: a missing run or adapters of different bases raise a
    :class:`~ptune.errors.PtuneError` now, before anything is served. Limits: see :class:`Limits`.
    ``batching``: ``"mixed"`` (requests of any adapters share a forward pass) or ``"per-adapter"`` (one
    adapter per forward pass, for comparison); see :class:`~ptune.serve.service.Service`. ``dtype``: the base's
    weights when loaded here from paths (see :meth:`Adapters.load`; default auto: float32 on a CPU where it generates)."""
    limits = Limits(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_input_chars=max_input_chars,
                    max_rows_per_request=max_rows_per_request, max_new_tokens=max_new_tokens,
                    max_queue_rows=max_queue_rows, max_decode_rows=max_decode_rows, max_body_bytes=max_body_bytes)
    limits.check()
    if batching not in BATCHING:
        raise ConfigError(f"--batching={batching!r} must be one of {', '.join(BATCHING)}")
    consent = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    if isinstance(adapter_set_or_paths, Adapters):
        adapters = adapter_set_or_paths
    elif isinstance(adapter_set_or_paths, AdapterSet):
        adapters = Adapters(adapter_set_or_paths, **consent)
    else:
        adapters = Adapters.load(adapter_set_or_paths, dtype=dtype, **consent)
    for name, run in (runs or {}).items():
        adapters._check_base(name, run.model.spec)
        adapters.runs[name] = run
    if not adapters.names and not allow_admin:
        raise ConfigError("no adapter to serve: give at least one run directory or adapter folder")
    service = Service(adapters, limits, allow_admin, batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="ptune serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Adapters on one frozen base; requests for any adapters are batched together "
                              "(one forward pass per batch; generation: one running batch, decoded step by step). "
                              "Errors are JSON: {\"error\": \"...\"} (OpenAI's shape on the OpenAI-compatible "
                              "endpoints). Playground: [/](/), metrics: [/metrics](/metrics).")
    app.state.service = service
    app.add_middleware(_BodyCheck, service=service, max_bytes=limits.max_body_bytes)
    _add_docs(app)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return _error(exc.status_code, detail, request.url.path, getattr(exc, "param", None),
                      getattr(exc, "code", None), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        if not openai_path(path):
            status, message = _validation_message(exc)
            return _error(status, message, path)
        # OpenAI answers a malformed request with 400 naming the field
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = _validation_message(exc)[1]
        return _error(400, message, path, param)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", request.url.path)

    def known(name: str) -> None:
        if name not in adapters:
            raise ApiError(404, f"unknown adapter {name!r}; this server holds {adapters.names} (GET /v1/adapters)")

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS,
              summary="Label texts with an adapter (classification: label + probabilities; tagging: tags)")
    async def predict(req: PredictRequest) -> Any:
        known(req.adapter)
        if adapters.generates(req.adapter):
            head = adapters.info(req.adapter)["head"]
            raise ApiError(400, f"adapter {req.adapter!r} generates text (a {head} head): use POST /v1/generate "
                                "or /v1/completions")
        _check_rows(req.inputs, limits)
        rows = [{**_record(x, f"inputs[{i}]", limits), "adapter": req.adapter} for i, x in enumerate(req.inputs)]
        return {"adapter": req.adapter, "results": await service.predict(req.adapter, rows)}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS,
              summary="Continue prompts with a causal-LM (or seq2seq) adapter")
    async def generate(req: GenerateRequest) -> Any:
        known(req.adapter)
        if not adapters.generates(req.adapter):
            head = adapters.info(req.adapter)["head"]
            makers = [n for n in adapters.names if adapters.generates(n)]
            raise ApiError(400, f"adapter {req.adapter!r} has a {head} head: it labels its inputs (POST /v1/predict); "
                                f"/v1/generate serves the adapters that generate ({makers or 'none loaded'})")
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
        if service.closing:
            raise ApiError(503, "the server is shutting down; retry on another instance")
        if req.adapter in adapters.runs:  # an encoder-decoder: its own Run, one request at a time
            options: dict[str, Any] = {"do_sample": req.temperature > 0}
            if req.temperature > 0:
                options.update(temperature=req.temperature, top_p=req.top_p)
            run = adapters.runs[req.adapter]
            texts = await service.call(run.generate, list(req.inputs), max_new_tokens=new_tokens, **options)
        else:  # every prompt a row of the running batch
            sampling = Sampling(max_new_tokens=new_tokens, temperature=req.temperature, top_p=req.top_p)
            streams = []
            try:
                for p in req.inputs:
                    streams.append(await service.generate(req.adapter, p, sampling))
                texts = [await s.text() for s in streams]
            finally:
                for s in streams:
                    service.cancel(s)  # a no-op for a finished one
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
        decode = service.decode
        return {"status": "ok" if running and not service.closing else "stopping" if service.closing else "stopped",
                "adapters": len(adapters.names), "queued_rows": service.queued_rows, "batches": service.batches,
                "batching": service.batching, "generating": decode.active if decode is not None else 0,
                "decode_steps": decode.steps if decode is not None else 0}

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_openai_routes(app, service, adapters, limits)

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND)

    return app


def _add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from a package's files (``fastapi-offline``'s Swagger UI 5, which reads the
    OpenAPI 3.1 that FastAPI writes), so the page works with no network; without that package, from the CDN."""
    try:
        assets = Path(importlib.util.find_spec("fastapi_offline").origin).parent / "static"
    except (AttributeError, TypeError):
        assets = None
    if assets is not None and (assets / "swagger-ui-bundle.js").is_file():
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")
        urls = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js", "swagger_css_url": "/docs-assets/swagger-ui.css",
                "swagger_favicon_url": "/docs-assets/favicon.png"}
    else:
        urls = {}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API docs", **urls)


def _version() -> str:
    from ..version import __version__

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
