"""Faults around generation in ``ptune serve``: a client that leaves mid-stream (its row is cancelled and
freed at the next step, the others go on), SIGTERM while streams run (they finish, exit 0), labelling
batches answered between decoding steps, and a base without a chat template.

The in-process servers run uvicorn on a loopback socket in a thread, with the decoder's step slowed down
so that a stream is still running when the test acts; the SIGTERM test runs ``python -m ptune.cli serve``.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="ptune serve needs the serve extra")
pytest.importorskip("openai", reason="shares test_serve_openai's fixtures")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_serve_openai import causal_adapters, reference, start_server  # noqa: E402
from test_serve_openai import chat_base, paths  # noqa: E402,F401  (fixtures)

from ptune.adapter_set import AdapterSet  # noqa: E402
from ptune.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def aset(paths):  # noqa: F811
    return AdapterSet.load(paths)


class Server:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(400):
            if self.server.started:
                break
            time.sleep(0.025)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


@pytest.fixture()
def slow_steps(aset, monkeypatch):
    """Each decoding step takes at least 30 ms; the rows cancelled are recorded."""
    gen = aset.generation
    step, cancel = gen.step, gen.decoder.cancel
    cancelled = []

    def slow():
        time.sleep(0.03)
        return step()

    def record(row):
        cancelled.append(row)
        cancel(row)

    monkeypatch.setattr(gen, "step", slow)
    monkeypatch.setattr(gen.decoder, "cancel", record)
    return cancelled


def sse_texts(lines) -> tuple[str, list[str]]:
    """The text of a completions stream and its raw data lines."""
    data = [line[6:] for line in lines if line.startswith("data: ")]
    text = "".join(c["text"] for d in data if d != "[DONE]" for c in json.loads(d).get("choices", []))
    return text, data


def collect(url, body):
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        return list(r.iter_lines())


def test_a_client_leaving_mid_stream_frees_its_row_and_the_others_go_on(aset, slow_steps):
    body = {"prompt": "the team won", "max_tokens": 40, "temperature": 0, "stream": True}
    want = reference(aset, "v2", "the team won", 40)  # before the server: one thread decodes at a time
    aset.generation.step()  # the reference's finished row dropped
    with Server(create_app(aset, max_new_tokens=40)) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(collect, s.url, {**body, "model": "v2"})
            with httpx.Client(base_url=s.url, timeout=60) as leaving:
                with leaving.stream("POST", "/v1/completions", json={**body, "model": "lora"}) as r:
                    lines = r.iter_lines()
                    got = [next(lines) for _ in range(4)]  # two chunks (each a data line and a blank line)
                    assert got[0].startswith("data: {")
                # the connection is closed here, mid-stream
            text, data = sse_texts(other.result(timeout=60))
        assert data[-1] == "[DONE]" and text == want  # the other went on
        for _ in range(200):  # the finished rows are dropped by one more step, right after the last answer
            if httpx.get(f"{s.url}/health").json()["generating"] == 0 and aset.generation.decoder.active == 0:
                break
            time.sleep(0.05)
        assert httpx.get(f"{s.url}/health").json()["generating"] == 0
        metrics = httpx.get(f"{s.url}/metrics").text
    assert len(slow_steps) == 1 and len(slow_steps[0].tokens) < 40  # cancelled well before its 40 tokens
    assert slow_steps[0].finish_reason == "cancelled"
    assert "ptune_generation_cancelled_total 1.0" in metrics
    d = aset.generation.decoder
    assert d.active == 0 and d.cache is None, ([(r.id, r.finish_reason, len(r.tokens)) for r in d.rows],
                                               [(r.id, r.finish_reason) for r in d.waiting])  # its slot freed


def test_labelling_batches_run_between_decoding_steps(aset, slow_steps):
    body = {"model": "v2", "prompt": "the team won", "max_tokens": 40, "temperature": 0, "stream": True}
    with Server(create_app(aset, max_new_tokens=40, max_wait_ms=1)) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            started = time.perf_counter()
            label = http.post("/v1/predict", json={"adapter": "cls", "inputs": ["the match"]})
            waited = time.perf_counter() - started
            assert label.status_code == 200 and "label" in label.json()["results"][0]
            assert httpx.get(f"{s.url}/health").json()["generating"] == 1  # answered while the stream runs
            rest = list(lines)
        assert waited < 40 * 0.03  # well before the generation's remaining steps
        assert sse_texts(rest)[1][-1] == "[DONE]"


def test_sigterm_while_streams_run_finishes_them_and_exits_0(paths, aset):  # noqa: F811
    proc, url = start_server(paths, "--max-new-tokens", "100")
    prompts = ["the team won", "bake the bread until", "a long walk in the hills", "one two three"]
    first = threading.Barrier(len(prompts) + 1)

    def stream(prompt):
        body = {"model": "pt", "prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": True}
        out = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                out.append(line)
                if len(out) == 1:
                    first.wait(60)
        return out

    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(stream, p) for p in prompts]
            first.wait(60)  # every stream has its first chunk
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        assert proc.wait(timeout=120) == 0
        out = proc.stdout.read()
        assert "ptune: stopped on SIGTERM" in out, (out, proc.stderr.read())
        for prompt, lines in zip(prompts, results):
            text, data = sse_texts(lines)
            assert data[-1] == "[DONE]"
            assert text == reference(aset, "pt", prompt, 100)  # finished, not cut off
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_chat_on_a_base_without_a_chat_template(tmp_path, tokenizer, tiny_gpt2_dir):
    paths = causal_adapters(tmp_path, tiny_gpt2_dir, tokenizer)
    with TestClient(create_app(paths)) as c:
        r = c.post("/v1/chat/completions", json={"model": "v2", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "no_chat_template" and error["param"] == "messages"
        assert "has no chat template" in error["message"] and "/v1/completions" in error["message"]
        r = c.post("/v1/completions", json={"model": "v2", "prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
