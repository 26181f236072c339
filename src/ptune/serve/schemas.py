"""The HTTP API's contract: the server's :class:`Limits`, the pydantic request and response models, the
documented error statuses (``ERRORS``), :class:`ApiError` (an HTTP error answered as ``{"error": ...}``),
and the checks that turn a request's inputs into rows, or pydantic's validation errors into one line.
"""

import dataclasses
import math
import re
from typing import Any, Union

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.exceptions import HTTPException

from ..errors import ConfigError

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
    """the most tokens one generation request may ask for (max_tokens, max_new_tokens)"""
    max_queue_rows: int = 4096
    """rows waiting to be scored beyond which requests are refused with 503 (back-pressure)"""
    max_decode_rows: int = 64
    """most generation requests decoded together in one running batch (others wait their turn); 1: one at a time"""
    max_body_bytes: int = 4_194_304
    """the largest request body accepted (by Content-Length and while reading); larger ones get 413"""

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
    """An HTTP error with a one-line JSON message: ``{"error": ...}`` on the native endpoints, OpenAI's
    ``{"error": {"message", "type", "param", "code"}}`` on the OpenAI-compatible ones (``param``: the
    request field at fault; ``code``: a short machine-readable reason such as ``model_not_found``)."""

    def __init__(self, status_code: int, detail: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status_code, detail)
        self.param, self.code = param, code


OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def openai_path(path: str) -> bool:
    """Whether ``path`` is an OpenAI-compatible endpoint (errors in OpenAI's shape there)."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON of an error: ``{"error": message}``, or OpenAI's shape on its endpoints."""
    if not openai_path(path):
        return {"error": message}
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
