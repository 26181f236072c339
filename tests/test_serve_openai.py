"""The OpenAI-compatible endpoints of ``ptune serve``, called with the official ``openai`` package against a
real server process (``python -m ptune.cli serve`` on a free port).

Tiny random GPT-2 base (its tokenizer given a chat template), three causal-LM adapters of three methods
(perturbed, never trained) and a classifier. Greedy answers equal ``AdapterSet.generation.generate`` and
the adapter's own ``Run.generate`` for the same prompt, streamed or not, alone or decoded together;
every class of bad request answers in OpenAI's error shape with the right status.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="ptune serve needs the serve extra")
openai = pytest.importorskip("openai", reason="the OpenAI-compatibility tests need the openai package (test extra)")

import httpx  # noqa: E402
from test_adapter_set import TOPIC, make_adapter, perturb  # noqa: E402

import ptune  # noqa: E402
from ptune.adapter_set import AdapterSet  # noqa: E402
from ptune.data import Task  # noqa: E402
from ptune.engine import Run  # noqa: E402

LM = Task("lm", head="causal_lm", max_length=48)
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
PROMPTS = ["the team won", "bake the bread until", "a long walk in the hills"]
MAX_NEW = 40


def causal_adapters(root, base_dir, tokenizer) -> dict:
    """Prompt tuning, P-Tuning v2 and LoRA causal-LM adapters plus a LoRA classifier, on one saved base."""
    plan = {"pt": ptune.PromptTuningConfig(num_virtual_tokens=3), "v2": ptune.PTuningV2Config(num_virtual_tokens=3),
            "lora": ptune.LoraConfig(r=2)}
    out = {}
    for k, (name, cfg) in enumerate(plan.items()):
        torch.manual_seed(k)
        model = ptune.apply(ptune.load_base(base_dir, "causal_lm"), cfg, head=ptune.HeadConfig("causal_lm"),
                            tokenizer=tokenizer, task=LM, max_length=LM.max_length)
        out[name] = ptune.save_adapter(perturb(model, 10 + k), root / name)
    out["cls"] = make_adapter(root / "cls", tokenizer, ptune.load_base(base_dir, "causal_lm"), ptune.LoraConfig(r=2),
                              TOPIC, seed=3)
    return out


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, tiny_gpt2_dir):
    """The tiny GPT-2 saved again with a tokenizer that carries a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-gpt2-chat")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).save_pretrained(path)
    return str(path), tok


@pytest.fixture(scope="module")
def paths(tmp_path_factory, chat_base):
    return causal_adapters(tmp_path_factory.mktemp("openai"), chat_base[0], chat_base[1])


@pytest.fixture(scope="module")
def aset(paths):
    return AdapterSet.load(paths)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def start_server(paths, *flags: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ptune.cli", "serve", *[f"{n}={p}" for n, p in paths.items()], "--port", "0",
           "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    line = box[0] if box else ""
    assert line.startswith("ptune: serving"), (line, proc.poll(), proc.poll() is not None and proc.stderr.read())
    url = line.split(" on ", 1)[1].split()[0]
    for _ in range(200):  # the socket is bound before uvicorn's loop runs: connections queue meanwhile
        try:
            if httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok":
                break
        except httpx.TransportError:
            time.sleep(0.05)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(paths):
    proc, url = start_server(paths, "--max-new-tokens", str(MAX_NEW), "--max-body-bytes", "1000000")
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)


def reference(aset, adapter, prompt, new):
    return aset.generation.generate([{"adapter": adapter, "prompt": prompt, "max_new_tokens": new}])[0]


def test_models_lists_the_adapters_that_generate_and_the_base(client, paths, chat_base):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["pt", "v2", "lora", chat_base[0]]  # not the classifier: it labels (GET /v1/adapters)
    assert all(m.object == "model" and m.owned_by and isinstance(m.created, int) for m in models.data)
    assert client.models.retrieve("v2").id == "v2"
    raw = httpx.get(f"{client.base_url}models").json()
    assert raw["object"] == "list" and set(raw["data"][0]) == {"id", "object", "created", "owned_by"}


def test_completions_greedy_equal_the_adapter_alone(client, aset, paths, chat_base):
    for model in ["pt", "v2", "lora", chat_base[0]]:
        adapter = None if model == chat_base[0] else model
        for prompt in PROMPTS[:2]:
            r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            want = reference(aset, adapter, prompt, 8)
            assert r.choices[0].text == want, (model, prompt)
            assert r.choices[0].finish_reason == "length" and r.object == "text_completion" and r.model == model
            assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 2
            assert r.usage.total_tokens == r.usage.prompt_tokens + 8
            if adapter is not None:
                assert want == Run(paths[model]).generate([prompt], max_new_tokens=8, do_sample=False)[0]


def test_streaming_completion_adds_up_to_the_whole_answer(client, aset):
    pieces, finishes, usage = [], [], None
    stream = client.completions.create(model="v2", prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finishes.append(c.finish_reason)
    assert "".join(pieces) == reference(aset, "v2", PROMPTS[2], 12)
    assert len([p for p in pieces if p]) > 1  # it came in pieces
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert usage is not None and usage.completion_tokens == 12


def test_chat_rendered_with_the_chat_template(client, aset, chat_base):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where does water boil"}]
    prompt = chat_base[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = reference(aset, "lora", prompt, 10)
    r = client.chat.completions.create(model="lora", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="lora", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_of_different_adapters_decode_together(client, aset, server, chat_base):
    jobs = [(m, p) for m in ["pt", "v2", "lora", chat_base[0]] for p in PROMPTS]
    gate = threading.Barrier(len(jobs))

    def ask(job):
        gate.wait()
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0)

    before = _histogram(server, "ptune_decode_rows")
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, prompt), r in zip(jobs, answers):
        adapter = None if model == chat_base[0] else model
        assert r.choices[0].text == reference(aset, adapter, prompt, MAX_NEW), (model, prompt)
    after = _histogram(server, "ptune_decode_rows")
    # some steps gave tokens to more than 4 rows at once: the requests of different adapters shared steps
    assert after["+Inf"] - after["4.0"] > before["+Inf"] - before["4.0"]


def _histogram(url: str, name: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)}


def test_stop_strings_and_seeds(client, aset):
    greedy = reference(aset, "pt", PROMPTS[1], 16)
    words = greedy.split()
    stop = words[len(words) // 2]
    r = client.completions.create(model="pt", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == greedy[:greedy.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16
    parts = [c.choices[0].text for c in client.completions.create(model="pt", prompt=PROMPTS[1], max_tokens=16,
                                                                  temperature=0, stop=stop, stream=True)]
    assert "".join(parts) == r.choices[0].text  # nothing of the stop string leaked into the stream
    a, b = (client.completions.create(model="v2", prompt="the", max_tokens=10, temperature=1.2, seed=s)
            for s in (7, 7))
    assert a.choices[0].text == b.choices[0].text


BAD = [  # (name, endpoint, body, status, code or None, param, words)
    ("unknown model", "completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found", "model", "does not exist"),
    ("max_tokens 0", "completions", {"model": "v2", "prompt": "x", "max_tokens": 0}, 400, None, "max_tokens",
     f"1 to {MAX_NEW} tokens"),
    ("max_tokens over the limit", "chat/completions", {"model": "v2", "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": MAX_NEW + 1}, 400, None, "max_tokens", "--max-new-tokens"),
    ("n > 1", "completions", {"model": "v2", "prompt": "x", "n": 2}, 400, None, "n", "one choice per prompt"),
    ("labelling adapter", "completions", {"model": "cls", "prompt": "x"}, 400, "model_not_supported", "model",
     "labelling adapter"),
    ("prompt over the context", "completions", {"model": "BASE", "prompt": "word " * 200, "max_tokens": 4}, 400,
     "context_length_exceeded", "prompt", "over this model's context of 128 tokens"),
    ("prompt and max_tokens over the context", "completions", {"model": "BASE", "prompt": "word " * 100,
                                                                "max_tokens": 40}, 400, "context_length_exceeded",
     "max_tokens", "lower max_tokens"),
    ("unknown field", "completions", {"model": "v2", "prompt": "x", "tools": []}, 400, None, "tools",
     "Unrecognized request argument supplied: tools"),
    ("wrong type", "completions", {"model": "v2", "prompt": "x", "max_tokens": "many"}, 400, None, "max_tokens", "integer"),
    ("bad role", "chat/completions", {"model": "v2", "messages": [{"role": "robot", "content": "x"}]}, 400, None,
     "messages", "use system, user or assistant"),
    ("temperature", "completions", {"model": "v2", "prompt": "x", "temperature": 3}, 400, None, "temperature", "[0, 2]"),
    ("logprobs", "completions", {"model": "v2", "prompt": "x", "logprobs": 2}, 400, None, "logprobs", "not supported"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_in_openai_shape(server, chat_base, case):
    _, endpoint, body, status, code, param, words = case
    body = {k: (chat_base[0] if v == "BASE" else v) for k, v in body.items()}
    r = httpx.post(f"{server}/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and error["param"] == param and error["code"] == code, error
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="one choice per prompt"):
        client.chat.completions.create(model="v2", messages=[{"role": "user", "content": "x"}], n=3)


def test_body_over_the_limit_is_a_413_not_a_reset(server):
    big = b'{"model": "v2", "prompt": "' + b"a" * 30_000_000 + b'"}'
    r = httpx.post(f"{server}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "over 1000000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b"a" * 50_000

    r = httpx.post(f"{server}/v1/predict", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "over 1000000 bytes" in r.json()["error"]  # the native shape
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_docs_load_offline(server):
    page = httpx.get(f"{server}/docs")
    assert page.status_code == 200
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text), page.text  # nothing from another host
    assets = re.findall(r"(?:src|href)=\"(/[^\"]+)\"", page.text)
    assert {a.rsplit(".", 1)[-1] for a in assets} >= {"js", "css"}
    for a in assets:
        r = httpx.get(f"{server}{a}")
        assert r.status_code == 200 and len(r.content) > 1000, a
    assert json.loads(httpx.get(f"{server}/openapi.json").text)["paths"].keys() >= {
        "/v1/completions", "/v1/chat/completions", "/v1/models"}


def test_readme_openai_block_runs_against_a_server(server, tmp_path):
    """The README's client block, as a user pastes it, against a real `ptune serve` (its address and an
    adapter's name put in for the README's localhost:8000 and "story"): a server answers, so the block
    uses it and neither trains nor starts one."""
    from readme_blocks import block

    code = block("openai-client").text
    assert 'URL = "http://localhost:8000"' in code and 'base_url=URL + "/v1"' in code and 'model="story"' in code
    code = code.replace('URL = "http://localhost:8000"', f'URL = "{server}"').replace('model="story"', 'model="lora"')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env(),
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip(), "the streamed chat answer should be printed"
    assert not (tmp_path / "runs").exists(), "with a server up the block must not train one"
