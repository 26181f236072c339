"""``ptune serve``: the HTTP API over an AdapterSet, in-process (TestClient) and as a real process.

Tiny random models, adapters saved the quick way of ``test_adapter_set`` (perturbed, never trained):
only the mechanics are checked. Every endpoint, every class of bad request, answers equal to
``Run.predict`` / ``Run.generate``, requests of two adapters scored in ONE forward pass, admin
load/unload, Prometheus metrics, the playground page, and ``python -m ptune.cli serve`` started,
called and stopped with SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="ptune serve needs the serve extra (./install.sh serve, or test)")
pytest.importorskip("prometheus_client", reason="ptune serve needs the serve extra (./install.sh serve, or test)")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_adapter_set import NER, TEXTS, TOPIC, TOPIC3, WORDS, make_adapter  # noqa: E402

import ptune  # noqa: E402
from ptune.adapter_set import AdapterSet  # noqa: E402
from ptune.data import Task  # noqa: E402
from ptune.engine import Run  # noqa: E402
from ptune.serve import create_app  # noqa: E402

LIMITS = dict(max_input_chars=200, max_rows_per_request=8, max_new_tokens=16, max_body_bytes=100_000)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tokenizer, tiny_model_dir):
    """Three adapters of three methods and two head kinds on one saved tiny BERT (Run can reload them)."""
    root = tmp_path_factory.mktemp("serve")
    base = lambda: ptune.load_base(tiny_model_dir)  # noqa: E731
    plan = {"topic": (ptune.PTuningConfig(num_virtual_tokens=3, encoder="mlp"), TOPIC),
            "ner": (ptune.PTuningV2Config(num_virtual_tokens=4), NER),
            "news": (ptune.LoraConfig(r=2), TOPIC3)}
    return {n: make_adapter(root / n, tokenizer, base(), cfg, task, seed=i) for i, (n, (cfg, task)) in enumerate(plan.items())}


@pytest.fixture(scope="module")
def aset(paths):
    return AdapterSet.load(paths)


@pytest.fixture(scope="module")
def client(aset):
    with TestClient(create_app(aset, max_wait_ms=2, **LIMITS)) as c:
        yield c


def metric_samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_predict_equals_run_predict(client, paths):
    texts = {"topic": TEXTS[:4], "ner": [" ".join(w) for w in WORDS], "news": TEXTS[2:]}
    for name, path in paths.items():
        r = client.post("/v1/predict", json={"adapter": name, "inputs": texts[name]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == name and len(body["results"]) == len(texts[name])
        for got, want in zip(body["results"], Run(path).predict(texts[name])):
            if "tags" in want:
                assert got == want
            else:
                assert got["label"] == want["label"]
                assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    # records naming the task's fields (pre-split words for the tagger)
    r = client.post("/v1/predict", json={"adapter": "ner", "inputs": [{"tokens": WORDS[2]}, "Kuala Lumpur"]})
    assert r.status_code == 200 and r.json()["results"][0] == r.json()["results"][1]
    assert r.json()["results"][0]["tokens"] == WORDS[2]


def test_adapters_health_metrics_docs_page(client, paths):
    body = client.get("/v1/adapters").json()
    infos = {a["name"]: a for a in body["adapters"]}
    assert list(infos) == list(paths)
    assert infos["ner"]["method"] == "p_tuning_v2" and infos["ner"]["task"] == "ner" and infos["ner"]["head"] == "tagging"
    assert infos["news"]["labels"] == list(TOPIC3.labels) and infos["news"]["method"] == "lora"
    assert all(a["trainable_params"] > 0 and a["endpoint"] == "predict" for a in infos.values())
    assert body["base"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["adapters"] == 3 and health["queued_rows"] == 0
    client.post("/v1/predict", json={"adapter": "topic", "inputs": ["the match"]})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)
    ok = [s for s in samples["ptune_requests_total"] if s.labels == {"endpoint": "/v1/predict", "status": "200"}]
    assert ok and ok[0].value >= 1
    assert samples["ptune_batch_rows_count"][0].value >= 1 and "ptune_queue_rows" in samples
    quantiles = {s.labels["quantile"] for s in samples["ptune_request_latency_recent_seconds"]
                 if s.labels["endpoint"] == "/v1/predict"}
    assert quantiles == {"0.5", "0.9", "0.99"}
    assert "ptune_request_latency_seconds_bucket" in samples and "ptune_batch_adapters_bucket" in samples
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "ptune playground" in page.text and "/v1/adapters" in page.text and "/v1/predict" in page.text
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/generate", "/v1/adapters", "/v1/adapters/{name}", "/health", "/metrics"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


BAD = [  # (name, endpoint, body: dict -> JSON, bytes -> raw, status, words the error must hold)
    ("unknown adapter", "/v1/predict", {"adapter": "nope", "inputs": ["x"]}, 404, "unknown adapter 'nope'"),
    ("no inputs", "/v1/predict", {"adapter": "topic", "inputs": []}, 400, "inputs is empty"),
    ("blank input", "/v1/predict", {"adapter": "topic", "inputs": ["fine", "   "]}, 400, "inputs[1] is empty"),
    ("input too long", "/v1/predict", {"adapter": "topic", "inputs": ["a" * 201]}, 400, "at most 200 per input"),
    ("too many rows", "/v1/predict", {"adapter": "topic", "inputs": ["a"] * 9}, 400, "at most 8 per request"),
    ("number as input", "/v1/predict", {"adapter": "topic", "inputs": ["ok", 5]}, 422, "inputs[1]: Input should be"),
    ("number as adapter", "/v1/predict", {"adapter": 3, "inputs": ["x"]}, 422, "adapter: Input should be a valid string"),
    ("missing inputs", "/v1/predict", {"adapter": "topic"}, 422, "inputs: is required"),
    ("misspelt field", "/v1/predict", {"adapter": "topic", "input": ["x"], "inputs": ["x"]}, 422,
     "input: is not a field"),
    ("not an object", "/v1/predict", ["topic", "x"], 422, "expected a JSON object"),
    ("bad word type", "/v1/predict", {"adapter": "ner", "inputs": [{"tokens": ["a", 1]}]}, 422,
     "inputs[0].tokens must be a string or a list of strings"),
    ("empty record", "/v1/predict", {"adapter": "ner", "inputs": [{}]}, 400, "inputs[0] is an empty object"),
    ("invalid JSON", "/v1/predict", b'{"adapter": "topic", "inputs": [', 400, "not valid JSON"),
    ("invalid UTF-8", "/v1/predict", b'{"adapter": "topic", "inputs": ["caf\xe9"]}', 400,
     "not valid UTF-8: byte 0xe9 at offset"),
    ("lone surrogate", "/v1/predict", b'{"adapter": "topic", "inputs": ["a \\ud800 b"]}', 400,
     "not valid Unicode text (a lone surrogate '\\ud800'"),
    ("body too large", "/v1/predict", {"adapter": "topic", "inputs": ["a" * 300_000]}, 413, "request body is over"),
    ("generate, classifier", "/v1/generate", {"adapter": "topic", "inputs": ["x"]}, 400,
     "has a classification head: it labels its inputs"),
    ("admin off: load", "/v1/adapters", {"name": "x", "path": "y"}, 403, "--allow-admin"),
    ("no such endpoint", "/v1/nothing", {"a": 1}, 404, "no endpoint POST /v1/nothing"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests(client, case):
    _, endpoint, body, status, words = case
    if isinstance(body, bytes):
        r = client.post(endpoint, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(endpoint, json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()
    assert "\n" not in r.json()["error"]


def test_bad_requests_leave_the_server_serving(client):
    assert client.delete("/v1/adapters/topic").status_code == 403
    assert client.get("/v1/predict").status_code == 405 and "not allowed" in client.get("/v1/predict").json()["error"]
    r = client.post("/v1/predict", json={"adapter": "ner", "inputs": [{"tokens": []}]})  # refused by the set's checks
    assert r.status_code == 400 and r.json()["error"].startswith("inputs[0]"), r.text
    r = client.post("/v1/predict", json={"adapter": "topic", "inputs": ["the match ended"]})
    assert r.status_code == 200 and r.json()["results"][0]["label"] in TOPIC.labels
    assert client.get("/health").json()["status"] == "ok"


def test_concurrent_requests_of_two_adapters_share_one_forward_pass(aset, monkeypatch):
    """Requests sent at once from threads, for a classifier and a tagger, are gathered into one batch and
    scored in one forward pass of the body (max_wait_ms is long: the batch closes when it is full). The
    padding bound is lifted here: by default rows this different in length go in two passes (see
    test_length_chunks_keep_short_rows_apart_from_long_ones)."""
    monkeypatch.setattr("ptune.adapter_set.PADDING_WASTE", 100.0)
    calls = []
    forward = aset.model.forward  # one call per forward pass of the body; its rows' adapters recorded
    monkeypatch.setattr(aset.model, "forward", lambda *a, task_index, **kw: calls.append(
        sorted({aset.names[t] for t in task_index.tolist()})) or forward(*a, task_index=task_index, **kw))
    requests = [{"adapter": "topic", "inputs": TEXTS[:2]}, {"adapter": "ner", "inputs": ["John lives in Paris"] * 3}]
    alone = [aset.predict([{"adapter": r["adapter"], "text": t} for t in r["inputs"]]) for r in requests]
    calls.clear()
    with TestClient(create_app(aset, max_wait_ms=30_000, max_batch_size=5)) as c:
        gate = threading.Barrier(len(requests))

        def send(body):
            gate.wait()
            return c.post("/v1/predict", json=body)

        started = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(send, requests))
        assert time.perf_counter() - started < 20  # closed by size, not by the 30 s wait
        samples = metric_samples(c.get("/metrics").text)
    assert calls == [["ner", "topic"]]  # ONE forward pass, holding rows of both adapters
    for r, want in zip(answers, alone):
        assert r.status_code == 200, r.text
        for got, ref in zip(r.json()["results"], want):
            assert got.keys() == ref.keys()
            if "tags" in ref:
                assert got == ref
            else:
                assert got["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-5)
    by_le = {s.labels["le"]: s.value for s in samples["ptune_batch_adapters_bucket"]}
    assert by_le["1.0"] == 0 and by_le["2.0"] == 1  # one batch, of two adapters
    assert samples["ptune_batch_rows_sum"][0].value == 5 and samples["ptune_batch_requests_sum"][0].value == 2


def test_a_failing_batch_fails_only_its_own_requests(aset, monkeypatch):
    """A batch that raises as a whole is retried request by request: only the culprit fails (500), and a
    bad row fails only its request (400), while the requests batched with them are answered."""
    real = aset.predict_batch

    def flaky(rows, **kw):
        if any(r.get("text") == "BOOM" for r in rows):
            raise RuntimeError("the model fell over")
        return real(rows, **kw)

    monkeypatch.setattr(aset, "predict_batch", flaky)
    requests = [{"adapter": "topic", "inputs": ["the match"]}, {"adapter": "news", "inputs": ["BOOM"]},
                {"adapter": "ner", "inputs": [{"tokens": []}]}, {"adapter": "ner", "inputs": ["Kuala Lumpur"]}]
    with TestClient(create_app(aset, max_wait_ms=30_000, max_batch_size=4)) as c:
        gate = threading.Barrier(len(requests))

        def send(body):
            gate.wait()
            return c.post("/v1/predict", json=body)

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(send, requests))
        samples = metric_samples(c.get("/metrics").text)
        assert c.get("/health").json()["status"] == "ok"
    assert [a.status_code for a in answers] == [200, 500, 400, 200], [a.text for a in answers]
    assert "RuntimeError: the model fell over" in answers[1].json()["error"]
    assert samples["ptune_batch_failures_total"][0].value == 1


def test_admin_load_and_unload(paths, tokenizer, tmp_path):
    from conftest import liven, tiny_base

    other = make_adapter(tmp_path / "other", tokenizer, liven(tiny_base("bert", seed=1)), ptune.LoraConfig(r=2),
                         TOPIC, seed=0)
    with TestClient(create_app({"topic": paths["topic"]}, allow_admin=True, max_wait_ms=1)) as c:
        r = c.post("/v1/adapters", json={"name": "news", "path": str(paths["news"])})
        assert r.status_code == 201, r.text
        assert r.json()["method"] == "lora" and r.json()["labels"] == list(TOPIC3.labels)
        assert [a["name"] for a in c.get("/v1/adapters").json()["adapters"]] == ["topic", "news"]
        got = c.post("/v1/predict", json={"adapter": "news", "inputs": TEXTS[:2]}).json()["results"]
        for g, want in zip(got, Run(paths["news"]).predict(TEXTS[:2])):
            assert g["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        assert c.post("/v1/adapters", json={"name": "news", "path": str(paths["ner"])}).status_code == 409
        r = c.post("/v1/adapters", json={"name": "gone", "path": str(tmp_path / "missing")})
        assert r.status_code == 400 and "not a finished ptune run" in r.json()["error"]
        r = c.post("/v1/adapters", json={"name": "other", "path": str(other)})  # another base: refused
        assert r.status_code == 400 and "one server serves one base" in r.json()["error"], r.text
        assert c.post("/v1/adapters", json={"name": "a/b", "path": str(paths["ner"])}).status_code == 400
        r = c.delete("/v1/adapters/news")
        assert r.status_code == 200 and r.json()["adapters"] == ["topic"]
        assert c.post("/v1/predict", json={"adapter": "news", "inputs": ["x"]}).status_code == 404
        assert c.delete("/v1/adapters/news").status_code == 404
        assert c.post("/v1/predict", json={"adapter": "topic", "inputs": ["x y"]}).status_code == 200


@pytest.fixture(scope="module")
def gpt2_paths(tmp_path_factory, tokenizer, tiny_gpt2_dir):
    root = tmp_path_factory.mktemp("serve-gpt2")
    gen = make_adapter(root / "gen", tokenizer, ptune.load_base(tiny_gpt2_dir, "causal_lm"),
                       ptune.PTuningV2Config(num_virtual_tokens=2), Task("gen", head="causal_lm"), seed=5)
    # the classifier on the causal-LM form of the base too: one copy of the base serves both (a LoRA trained on the
    # bare body names its tensors after the body's modules, which the LM form nests one level deeper)
    cls = make_adapter(root / "cls", tokenizer, ptune.load_base(tiny_gpt2_dir, "causal_lm"), ptune.LoraConfig(r=2),
                       TOPIC, seed=6)
    return {"gen": gen, "cls": cls}


def test_generate(gpt2_paths):
    prompts = ["the team", "bake the bread"]
    with TestClient(create_app([f"gen={gpt2_paths['gen']}", f"cls={gpt2_paths['cls']}"], **LIMITS)) as c:
        infos = {a["name"]: a for a in c.get("/v1/adapters").json()["adapters"]}
        assert infos["gen"]["endpoint"] == "generate" and infos["gen"]["head"] == "causal_lm"
        assert infos["cls"]["endpoint"] == "predict" and infos["gen"]["trainable_params"] > 0
        r = c.post("/v1/generate", json={"adapter": "gen", "inputs": prompts, "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        want = Run(gpt2_paths["gen"]).generate(prompts, max_new_tokens=4, do_sample=False)
        assert [x["text"] for x in r.json()["results"]] == want
        r = c.post("/v1/generate", json={"adapter": "gen", "inputs": ["the"], "max_new_tokens": 3, "temperature": 0.8,
                                         "top_p": 0.9})
        assert r.status_code == 200 and isinstance(r.json()["results"][0]["text"], str)
        assert c.post("/v1/predict", json={"adapter": "cls", "inputs": ["the match"]}).status_code == 200
        for body, words in [({"max_new_tokens": 17}, "1 to 16 tokens"), ({"max_new_tokens": 0}, "1 to 16 tokens"),
                            ({"temperature": -1}, "temperature=-1.0"), ({"top_p": 0}, "top_p=0.0"),
                            ({"inputs": [""]}, "inputs[0] is empty"), ({"inputs": ["x"] * 9}, "at most 8"),
                            ({"inputs": [{"text": "x"}]}, "inputs[0]: Input should be a valid string"),
                            ({"adapter": "cls"}, "has a classification head")]:
            r = c.post("/v1/generate", json={"adapter": "gen", "inputs": ["x"], **body})
            assert r.status_code in (400, 422) and words in r.json()["error"], (body, r.text)
        r = c.post("/v1/predict", json={"adapter": "gen", "inputs": ["x"]})
        assert r.status_code == 400 and "use POST /v1/generate" in r.json()["error"]


def test_startup_errors(paths, gpt2_paths, tmp_path, capsys):
    from ptune.cli import main

    with pytest.raises(ptune.PtuneError, match=r"adapter 'missing': .*not a finished ptune run"):
        create_app([str(tmp_path / "missing")])
    with pytest.raises(ptune.PtuneError, match=r"adapter 'gen' needs the base .* one server serves one base"):
        create_app({"topic": paths["topic"], "gen": gpt2_paths["gen"]})
    with pytest.raises(ptune.PtuneError, match=r"adapter 'cls' needs the base .* one server serves one base"):
        create_app({"topic": paths["topic"], "cls": gpt2_paths["cls"]})  # refused before any is loaded
    with pytest.raises(ptune.ConfigError, match="--max-batch-size=0"):
        create_app({"topic": paths["topic"]}, max_batch_size=0)
    capsys.readouterr()
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptune: error: adapter 'missing'")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def test_cli_serve_process_and_sigterm(paths):
    """`python -m ptune.cli serve` as a real process on a free loopback port: /health, /v1/predict, and a
    SIGTERM that arrives while a request waits in the queue: the request is answered, the exit is clean."""
    import httpx

    cmd = [sys.executable, "-m", "ptune.cli", "serve", f"topic={paths['topic']}", f"ner={paths['ner']}",
           "--port", "0", "--max-wait-ms", "2500", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = _read_line(proc, 120)
        assert line.startswith("ptune: serving 2 adapters"), (line, proc.poll())
        url = line.split(" on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(100):  # the socket is bound before uvicorn's loop starts: connections queue meanwhile
                try:
                    health = http.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            assert health.json()["status"] == "ok"
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(http.post, "/v1/predict", json={"adapter": "topic", "inputs": TEXTS[:3]})
                for _ in range(200):  # until the request waits out --max-wait-ms in the queue
                    if httpx.get(f"{url}/health", timeout=30).json()["queued_rows"]:
                        break
                    time.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                r = pending.result(timeout=60)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "ptune: stopped on SIGTERM" in out, (out, proc.stderr.read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome-headless-shell")
                 if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (apt-get install chromium) for the "
                    "headless-browser check of the playground")
def test_playground_in_headless_chromium(aset, tmp_path):
    """The page lists the adapters from /v1/adapters, and ?adapter=&text= runs a prediction drawn as bars."""
    import uvicorn

    app = create_app(aset, max_wait_ms=1)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
                              f"http://127.0.0.1:{port}/?adapter=news&text=the+striker+scored"],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    for name in ("topic", "ner", "news"):
        assert f'<option value="{name}">' in dom, dom[-3000:]
    assert 'data-done="1"' in dom, dom[-3000:]
    bars = [label for label in TOPIC3.labels if f'data-label="{label}"' in dom]
    assert bars == list(TOPIC3.labels) and dom.count('class="bar"') == 3
    assert 'class="row top"' in dom


def test_per_adapter_batching_gives_one_forward_pass_per_adapter(aset, monkeypatch):
    """--batching per-adapter: the same concurrent requests of two adapters as in the mixed test above are
    scored in TWO forward passes, one adapter each (mixed: one), with the same answers."""
    with pytest.raises(ptune.ConfigError, match="--batching='both' must be one of mixed, per-adapter"):
        create_app(aset, batching="both")
    calls = []
    forward = aset.model.forward  # one call per forward pass of the body; its rows' adapters recorded
    monkeypatch.setattr(aset.model, "forward", lambda *a, task_index, **kw: calls.append(
        sorted({aset.names[t] for t in task_index.tolist()})) or forward(*a, task_index=task_index, **kw))
    requests = [{"adapter": "topic", "inputs": TEXTS[:2]}, {"adapter": "ner", "inputs": ["John lives in Paris"] * 3}]
    alone = [aset.predict([{"adapter": r["adapter"], "text": t} for t in r["inputs"]]) for r in requests]
    calls.clear()
    # the first batch closes as soon as the other adapter's request is set aside; the second waits out 2 s
    with TestClient(create_app(aset, max_wait_ms=2_000, max_batch_size=5, batching="per-adapter")) as c:
        assert c.get("/health").json()["batching"] == "per-adapter"
        gate = threading.Barrier(len(requests))

        def send(body):
            gate.wait()
            return c.post("/v1/predict", json=body)

        started = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(send, requests))
        assert time.perf_counter() - started < 20
        samples = metric_samples(c.get("/metrics").text)
    assert sorted(calls) == [["ner"], ["topic"]]  # TWO forward passes, one adapter each
    for r, want in zip(answers, alone):
        assert r.status_code == 200, r.text
        for got, ref in zip(r.json()["results"], want):
            assert got.keys() == ref.keys()
            if "tags" in ref:
                assert got == ref
            else:
                assert got["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-5)
    by_le = {s.labels["le"]: s.value for s in samples["ptune_batch_adapters_bucket"]}
    assert by_le["1.0"] == 2  # two batches, of one adapter each
    assert samples["ptune_batch_rows_sum"][0].value == 5 and samples["ptune_batch_requests_sum"][0].value == 2


def test_dtype_of_the_served_base(gpt2_paths):
    """--dtype: auto loads a generating set's base in float32 on a CPU (greedy answers then do not depend on which
    requests share a decoding step), float32 as asked; bfloat16 of a base saved in float32 changes its weights, so the
    adapters' fingerprint check refuses it; anything else is refused."""
    import torch

    from ptune.serve.adapters import Adapters

    paths = [f"gen={gpt2_paths['gen']}", f"cls={gpt2_paths['cls']}"]
    for dtype in ("auto", "float32", "saved"):
        a = Adapters.load(paths, dtype=dtype)
        assert next(a.set.base.parameters()).dtype == torch.float32 and a.names == ["gen", "cls"]
    with pytest.raises(ptune.AdapterMismatchError, match="differs in weights_sha256"):
        Adapters.load(paths, dtype="bfloat16")
    with pytest.raises(ptune.ConfigError, match="--dtype='float64' must be one of auto, float32, bfloat16, saved"):
        create_app(paths, dtype="float64")
