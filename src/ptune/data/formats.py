"""Data formats of generation records, detected from their fields, normalised to one conversation form.

A causal-LM task reads one of these record shapes (LLaMA-Factory / torchtune / ChatGLM's names):

- ``prompt_response``: the task's own text fields and ``target_field`` (ptune's form, unchanged: the
  template is filled and the target appended; no chat template);
- ``alpaca``: ``instruction``, optional ``input``, ``output`` -> one user turn "instruction\\n\\ninput",
  one assistant turn;
- ``chat``: ``messages: [{role, content}]`` (roles system, user, assistant);
- ``sharegpt``: ``conversations: [{from, value}]`` (from: system, human / user, gpt / assistant);
- ``chatglm``: ``prompt``, ``response`` and optional ``history: [[prompt, response], ...]`` -> the history
  pairs as earlier turns, then the final prompt and response.

Every format but ``prompt_response`` becomes a list of ``{"role", "content"}`` turns (:func:`conversation`),
which the causal-LM head renders with the tokenizer's chat template, the loss on every assistant turn.
``auto`` (a task's default) detects the format per record and refuses a file that mixes formats. Tool
calls, function roles and multimodal content are not read.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import DataError

FORMATS = ("auto", "prompt_response", "alpaca", "chat", "sharegpt", "chatglm")
CHAT_FORMATS = ("alpaca", "chat", "sharegpt", "chatglm")  # rendered with the tokenizer's chat template
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect(rec: dict, own_fields: Sequence[str] = ()) -> str | None:
    """The format of one record from its fields; ``own_fields`` (a task's text fields and target) win when
    the record holds them all (a task's own prompt/response form stays as it is). None: no known format."""
    if own_fields and all(f in rec for f in own_fields):
        return "prompt_response"
    if "messages" in rec:
        return "chat"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "history" in rec and "prompt" in rec:
        return "chatglm"
    if "prompt" in rec and "response" in rec:
        return "prompt_response"
    return None


def file_format(rows: Sequence[tuple[int, dict]], source: str, own_fields: Sequence[str] = ()) -> str | None:
    """The one format of a file's records (``rows``: (line, record)); DataError naming the first record
    that differs. prompt/response records beside ChatGLM ones are ChatGLM records with no history."""
    found: dict[str, int] = {}
    for line, rec in rows:
        fmt = detect(rec, own_fields)
        if fmt is None:
            continue
        found.setdefault(fmt, line)
    if set(found) == {"prompt_response", "chatglm"} and not own_fields:
        return "chatglm"
    if len(found) > 1:
        (first, line1), (second, line2) = sorted(found.items(), key=lambda kv: kv[1])[:2]
        raise DataError(f"{source} line {line2}: a {second} record in a file of {first} records (line {line1}); "
                        "one format per file (or name it: format: in a task YAML)")
    return next(iter(found), None)


def _text(value: Any, what: str, source: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: {what} must be text, got {type(value).__name__}")
    return value


def _turns(fmt: str, rec: dict, source: str) -> list[dict[str, str]]:
    if fmt == "alpaca":
        instruction = _text(rec.get("instruction"), "'instruction'", source)
        extra = rec.get("input") or ""
        user = instruction + ("\n\n" + _text(extra, "'input'", source) if extra else "")
        turns = [{"role": "user", "content": user}]
        if "output" in rec:
            turns.append({"role": "assistant", "content": _text(rec["output"], "'output'", source)})
        return turns
    if fmt == "chatglm":
        history = rec.get("history") or []
        if not isinstance(history, list):
            raise DataError(f"{source}: 'history' must be a list of [prompt, response] pairs")
        turns = []
        for k, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise DataError(f"{source}: history[{k}] must be a [prompt, response] pair")
            turns += [{"role": "user", "content": _text(pair[0], f"history[{k}][0]", source)},
                      {"role": "assistant", "content": _text(pair[1], f"history[{k}][1]", source)}]
        turns.append({"role": "user", "content": _text(rec.get("prompt"), "'prompt'", source)})
        if "response" in rec:
            turns.append({"role": "assistant", "content": _text(rec["response"], "'response'", source)})
        return turns
    key, role_key, content_key = ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
    items = rec.get(key)
    if not isinstance(items, list) or not items:
        raise DataError(f"{source}: {key!r} must be a non-empty list of {{{role_key}, {content_key}}} turns")
    turns = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise DataError(f"{source}: {key}[{k}] must be an object with {role_key!r} and {content_key!r}")
        role = item[role_key]
        known = ROLES if fmt == "chat" else tuple(SHAREGPT_ROLES)
        if role not in known:
            raise DataError(f"{source}: {key}[{k}] has unknown role {role!r}; the roles are {', '.join(known)}")
        role = role if fmt == "chat" else SHAREGPT_ROLES[role]
        turns.append({"role": role, "content": _text(item[content_key], f"{key}[{k}].{content_key}", source)})
    return turns


def conversation(fmt: str, rec: dict, source: str, *, labelled: bool = True,
                 prompt_field: str | None = None) -> list[dict[str, str]]:
    """The record as ``[{"role", "content"}, ...]`` turns, checked: known roles, text content, and (when
    ``labelled``) an assistant turn. Turns after the last assistant turn carry no loss and are dropped.
    Unlabelled (a prompt to answer), a final assistant turn is dropped (it is the answer to write), and a
    chat record given as only ``prompt_field`` (``ptune generate``'s text) is one user turn."""
    if fmt not in CHAT_FORMATS:
        raise DataError(f"{source}: format {fmt!r} is not a conversation format ({', '.join(CHAT_FORMATS)})")
    key = {"chat": "messages", "sharegpt": "conversations"}.get(fmt)
    if not labelled and key and key not in rec and prompt_field and isinstance(rec.get(prompt_field), str):
        return [{"role": "user", "content": rec[prompt_field]}]
    turns = _turns(fmt, rec, source)
    last = max((k for k, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if labelled:
        if last is None:
            raise DataError(f"{source}: the conversation has no assistant turn, so nothing to learn from")
        return turns[:last + 1]
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]  # the answer to write
    if not turns:
        raise DataError(f"{source}: the conversation has no turn before its answer to prompt with")
    return turns
