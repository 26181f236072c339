"""OpenAI-compatible endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``.

Clients written for OpenAI's API (the official ``openai`` package, LangChain, ...) talk to ``ptune serve``
as to vLLM or LoRAX: ``model`` names the adapter (or the base, by its name, for the bare base). Every
request is a :class:`~.streams.Stream` in the server's one running batch, so requests of different
adapters decode together. ``stream: true`` answers server-sent events in OpenAI's chunk shape, ending
with ``data: [DONE]``; a client that disconnects mid-stream has its row cancelled. Supported:
``max_tokens`` (``max_completion_tokens``), ``temperature`` (0: greedy), ``top_p``, ``stop`` (a string
or up to 4), ``seed``, ``stream``, ``stream_options.include_usage``, ``n`` = 1 only. Chat messages are
rendered with the base tokenizer's chat template (``apply_chat_template(..., add_generation_prompt=True)``)
and the result fills the adapter's template like any prompt. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``. Not supported (refused, naming the field):
``n`` > 1, ``best_of``, ``logprobs``, ``echo``, ``suffix``, ``logit_bias``, penalties, tools.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
import time
import uuid
from typing import Any, AsyncIterator, Union

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..decoding import Sampling
from .adapters import Adapters
from .schemas import ApiError, Limits, _check_text, error_body
from .service import Service
from .streams import Stream, context_length

MAX_STOPS = 4  # as OpenAI's API

# ---------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(description="an adapter's name, or the base's name for the bare base (GET /v1/models)")
    max_tokens: StrictInt | None = Field(None, description="new tokens at most (default: 16 for completions, the "
                                                           "server's --max-new-tokens for chat)")
    temperature: float | None = Field(None, description="0: greedy; up to 2 (default 1)")
    top_p: float | None = Field(None, description="nucleus sampling mass in (0, 1] (default 1)")
    stop: Union[StrictStr, list[StrictStr], None] = Field(None, description="a stop string or up to 4: the text "
                                                                            "ends before the first one met")
    seed: StrictInt | None = Field(None, description="a sampled request with a seed repeats exactly")
    stream: StrictBool = Field(False, description="server-sent events, one chunk per piece of text, then [DONE]")
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true}: a last chunk with '
                                                                   "the token counts")
    n: StrictInt | None = Field(None, description="choices per prompt: 1 only")
    user: StrictStr | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class CompletionRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "story", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}]})
    prompt: Union[StrictStr, list[StrictStr]] = Field(description="a prompt, or several (one choice each)")
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class ChatRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "chat", "messages": [{"role": "user", "content": "Where does water boil?"}], "max_tokens": 32}]})
    messages: list[dict[str, Any]] = Field(description='[{"role": "system" | "user" | "assistant", "content": text}]')
    max_completion_tokens: StrictInt | None = Field(None, description="the same as max_tokens")
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


# ---------------------------------------------------------------------------------------------- checks


def _refuse_unsupported(req: _Request) -> None:
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n}: this server returns one choice per prompt (n=1); send the request {req.n} "
                            "times (with different seeds to sample different answers)", param="n")
    unsupported = {"presence_penalty": req.presence_penalty not in (None, 0), "logit_bias": bool(req.logit_bias),
                   "frequency_penalty": req.frequency_penalty not in (None, 0), "logprobs": bool(req.logprobs),
                   "echo": bool(getattr(req, "echo", None)), "suffix": getattr(req, "suffix", None) is not None,
                   "best_of": getattr(req, "best_of", None) not in (None, 1),
                   "top_logprobs": bool(getattr(req, "top_logprobs", None))}
    for name, used in unsupported.items():
        if used:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", param=name)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if req.stream_options is not None and set(req.stream_options) - {"include_usage"}:
        raise ApiError(400, f"stream_options: unknown keys {sorted(set(req.stream_options) - {'include_usage'})}; "
                            "this server knows include_usage", param="stream_options")


def _sampling(req: _Request, max_tokens: int | None, default: int, limits: Limits) -> Sampling:
    new = default if max_tokens is None else max_tokens
    if not 1 <= new <= limits.max_new_tokens:
        raise ApiError(400, f"max_tokens={new}: this server generates 1 to {limits.max_new_tokens} tokens per request "
                            "(--max-new-tokens)", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"temperature={temperature} must be in [0, 2] (0: greedy)", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p={top_p} must be in (0, 1]", param="top_p")
    stop = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise ApiError(400, f"stop: give at most {MAX_STOPS} non-empty strings (got {list(stop)})", param="stop")
    return Sampling(max_new_tokens=new, temperature=temperature, top_p=top_p, seed=req.seed, stop=stop)


def _usage(streams: list[Stream]) -> dict[str, int]:
    prompt = sum(s.prompt_tokens for s in streams)
    completion = sum(s.completion_tokens for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _merged(streams: list[Stream]) -> AsyncIterator[tuple[int, str | None]]:
    """(index, text piece) of several streams as they come; (index, None) once a stream has finished."""
    if len(streams) == 1:
        async for piece in streams[0].pieces():
            yield 0, piece
        yield 0, None
        return
    out: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: Stream) -> None:
        try:
            async for piece in s.pieces():
                out.put_nowait((i, piece, None))
            out.put_nowait((i, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            out.put_nowait((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                i, piece, error = await out.get()
                if error is not None:
                    raise error
                yield i, piece
                if piece is None:
                    break
    finally:
        for t in tasks:
            t.cancel()


# ---------------------------------------------------------------------------------------------- the routes


def add_openai_routes(app: FastAPI, service: Service, adapters: Adapters, limits: Limits) -> None:
    """``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` on ``app``."""
    started = int(time.time())

    def base_id() -> str | None:
        return adapters.base_name if adapters.base_generates else None

    def model_ids() -> list[str]:
        ids = [n for n in adapters.set.names if adapters.decodes(n)]
        return ids + ([base_id()] if base_id() and base_id() not in ids else [])

    def resolve(model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the bare base)."""
        if model in adapters:
            if adapters.decodes(model):
                return model
            if model in adapters.runs:
                raise ApiError(400, f"model {model!r} is an encoder-decoder (seq2seq) adapter, which generates one "
                                    "request at a time: use POST /v1/generate", param="model", code="model_not_supported")
            head = adapters.info(model)["head"]
            raise ApiError(400, f"model {model!r} is a labelling adapter (a {head} head): it labels inputs at POST "
                                f"/v1/predict; the models that generate are {model_ids()} (GET /v1/models)",
                           param="model", code="model_not_supported")
        if model == base_id():
            return None
        raise ApiError(404, f"The model {model!r} does not exist on this server; it serves {model_ids()} "
                            "(GET /v1/models)", param="model", code="model_not_found")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started,
                "owned_by": "ptune" if name in adapters else "base"}

    @app.get("/v1/models", summary="The models that generate: the causal-LM adapters and the bare base (OpenAI)")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in model_ids()]}

    @app.get("/v1/models/{model:path}", summary="One model (OpenAI)")
    async def get_model(model: str) -> dict[str, Any]:
        resolve(model)
        return model_card(model)

    async def start(req: _Request, adapter: str | None, prompts: list[str], sampling: Sampling) -> list[Stream]:
        streams: list[Stream] = []
        try:
            for p in prompts:
                streams.append(await service.generate(adapter, p, sampling))
        except BaseException:
            for s in streams:
                service.cancel(s)
            raise
        return streams

    async def answer(req: _Request, streams: list[Stream], chunk: Any, whole: Any) -> Any:
        """The response: one JSON (``whole(texts)``) or server-sent events (``chunk(index, piece, finish)``)."""
        if not req.stream:
            try:
                texts = [await s.text() for s in streams]
            finally:
                for s in streams:
                    service.cancel(s)  # a no-op for a finished one
            return JSONResponse(whole(texts))
        usage = bool((req.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            try:
                for i in range(len(streams)):
                    first = chunk(i, None, None)
                    if first is not None:
                        yield _sse(first)
                async for i, piece in _merged(streams):
                    if piece is None:
                        yield _sse(chunk(i, "", streams[i].finish_reason))
                    elif piece:
                        yield _sse(chunk(i, piece, None))
                if usage:
                    last = chunk(0, "", None)
                    yield _sse({**last, "choices": [], "usage": _usage(streams)})
            except ApiError as e:
                yield _sse(error_body("/v1/completions", e.status_code, e.detail, e.param, e.code))
            finally:
                for s in streams:
                    service.cancel(s)  # the client left before the end: free its row at the next step
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", summary="Continue prompts with an adapter or the base (OpenAI completions)")
    async def completions(req: CompletionRequest) -> Any:
        _refuse_unsupported(req)
        adapter = resolve(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise ApiError(400, "prompt is an empty list: send a prompt", param="prompt")
        if len(prompts) > limits.max_rows_per_request:
            raise ApiError(400, f"{len(prompts)} prompts; this server takes at most {limits.max_rows_per_request} per "
                                "request (--max-rows-per-request): split the request", param="prompt")
        for i, p in enumerate(prompts):
            _with_param(_check_text, p, "prompt" if len(prompts) == 1 else f"prompt[{i}]", limits, param="prompt")
        sampling = _sampling(req, req.max_tokens, min(16, limits.max_new_tokens), limits)
        streams = await start(req, adapter, prompts, sampling)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": None}

        def chunk(i: int, piece: str | None, finish: str | None) -> dict | None:
            if piece is None:
                return None  # completions have no opening chunk
            return {**head, "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": finish}]}

        def whole(texts: list[str]) -> dict:
            return {**head, "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": s.finish_reason}
                                        for i, (t, s) in enumerate(zip(texts, streams))], "usage": _usage(streams)}

        return await answer(req, streams, chunk, whole)

    @app.post("/v1/chat/completions", summary="Answer a conversation with an adapter or the base (OpenAI chat)")
    async def chat_completions(req: ChatRequest) -> Any:
        _refuse_unsupported(req)
        adapter = resolve(req.model)
        prompt = _render_chat(adapters.set.tokenizer, req.messages, adapters.base_name)
        _with_param(_check_text, prompt, "the rendered conversation", limits, param="messages")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ: give one", param="max_tokens")
        new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sampling = _sampling(req, new, limits.max_new_tokens, limits)
        if new is None:  # the default: as many as the context leaves, up to the server's limit
            sampling = await service.call(_fit_default, service, adapter, prompt, sampling)
        streams = await start(req, adapter, [prompt], sampling)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": None}

        def chunk(i: int, piece: str | None, finish: str | None) -> dict:
            delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece} if piece else {}
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def whole(texts: list[str]) -> dict:
            return {**head, "object": "chat.completion", "usage": _usage(streams),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                                 "finish_reason": streams[0].finish_reason}]}

        return await answer(req, streams, chunk, whole)


def _with_param(check: Any, *args: Any, param: str) -> Any:
    try:
        return check(*args)
    except ApiError as e:
        raise ApiError(e.status_code, e.detail, param=param) from None


def _fit_default(service: Service, adapter: str | None, prompt: str, sampling: Sampling) -> Sampling:
    """The default max_tokens of a chat request: the server's limit, or what the context leaves after the prompt."""
    aset = service.adapters.set
    context = context_length(aset.base.config)
    if context is None:
        return sampling
    ids, _, _ = aset.generation.encode(adapter, prompt)
    room = context - len(ids)
    return replace(sampling, max_new_tokens=max(1, min(sampling.max_new_tokens, room)))


def _render_chat(tokenizer: Any, messages: list[dict[str, Any]], base: str | None) -> str:
    """The conversation as one prompt, through the tokenizer's chat template (a turn for the assistant opened)."""
    if not messages:
        raise ApiError(400, "messages is empty: send at least one message", param="messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role={m.get('role')!r}: use system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                    "supported", param="messages")
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"messages[{i}]: {sorted(extra)} not supported (text messages only)", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"the base {base!r} has no chat template (its tokenizer carries none), so a conversation "
                            "cannot be rendered: use POST /v1/completions with a prompt in your own format",
                       param="messages", code="no_chat_template")
    plain = [{**m, "role": "system" if m["role"] == "developer" else m["role"],
              "content": m["content"] if isinstance(m["content"], str)
              else "".join(p["text"] for p in m["content"])} for m in messages]
    try:
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - the template refused the conversation (roles out of order, ...)
        raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]  # the prompt's encoding adds it again
    return text


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
