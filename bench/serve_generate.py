"""`ptune serve` generation under load: batched decoding (one running batch across requests and adapters)
vs one request at a time (``--max-decode-rows 1``), through the OpenAI-compatible ``/v1/completions``.

Three causal-LM adapters of three methods on Gemma 3 270M (``ptune.load_base("gemma", "causal_lm")``, the
packaged model, converted once and cached) plus the bare base: prompt tuning (20 virtual tokens), P-Tuning
v2 (10 per layer) and LoRA (r 8). Nothing is trained: each adapter's trainable weights are its
initialisation plus Gaussian noise (std ``--noise``, seeded), so each answers differently from the base
while staying a language model; decoding speed does not depend on training. They are saved under a
temporary folder and served by a fresh ``python -m ptune.cli serve ... --port 0`` per mode.

Load: ``--requests`` requests (default 64), request i to model i mod 4 with prompt i mod 16 (short English
prompts), ``--new-tokens`` new tokens each (greedy, ``temperature: 0``), from ``--clients`` concurrent
clients (closed loop: each sends its next request when the last one is answered), streamed (server-sent
events, ``stream_options.include_usage``). Both modes get the very same requests. Measured client-side:
new tokens per second over the timed phase (the sum of ``usage.completion_tokens`` / wall time), time to
first token (request sent -> first text chunk) p50 / p99, non-200 answers; server-side: peak RSS (VmHWM
at the end), CPU seconds of the server and of this client process (one asyncio process, httpx streaming:
it shares the cores), the load average before and after. Every batched answer is compared with the same request's answer from the one-at-a-time
server, where it was decoded alone.

    python bench/serve_generate.py            # ~5-8 minutes on 2 CPU cores (serve --dtype auto: float32 on a CPU)
    python bench/serve_generate.py --dtype bfloat16 --out bench/results/serve_generate_bf16.json
    python bench/serve_generate.py --base /path/to/tiny-model --requests 8 --new-tokens 4 --out /tmp/x.json

Writes raw numbers to bench/results/serve_generate.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

import ptune  # noqa: E402
from ptune.data import Task  # noqa: E402
from ptune.models import load_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = {
    "prompt": lambda: ptune.PromptTuningConfig(num_virtual_tokens=20),
    "v2": lambda: ptune.PTuningV2Config(num_virtual_tokens=10, layers="all"),
    "lora": lambda: ptune.LoraConfig(r=8),
}
PROMPTS = ["Water boils at", "The capital of France is", "Once upon a time, a small dog", "The best way to learn a "
           "language is", "In 1969, astronauts", "My favourite recipe for bread", "The stock market today",
           "Football fans cheered as", "A good night's sleep", "The new phone has", "Scientists have discovered",
           "The recipe calls for", "On a rainy afternoon", "The election results show", "Here is a short poem about "
           "the sea:", "The history of the Roman Empire"]


def make_adapters(base_name: str, root: Path, noise: float) -> dict[str, Path]:
    tokenizer = load_tokenizer(base_name)
    task = Task("lm", head="causal_lm", max_length=128)
    out = {}
    for k, (name, make) in enumerate(METHODS.items()):
        torch.manual_seed(k)
        model = ptune.apply(ptune.load_base(base_name, "causal_lm"), make(), head=ptune.HeadConfig("causal_lm"),
                            tokenizer=tokenizer, task=task, max_length=task.max_length)
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * noise)
        out[name] = ptune.save_adapter(model, root / name)
        del model
    return out


def start_server(paths: dict[str, Path], flags: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ptune.cli", "serve", *[f"{n}={p}" for n, p in paths.items()], "--port", "0",
           "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(600)
    line = box[0] if box else ""
    if not line.startswith("ptune: serving"):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    url = line.split(" on ", 1)[1].split()[0]
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok":
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(http: httpx.AsyncClient, model: str, prompt: str, new: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, text, tokens = None, [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode()[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "error": chunk["error"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c["text"] and first is None:
                    first = time.perf_counter()
                text.append(c["text"])
    return {"status": 200, "text": "".join(text), "tokens": tokens, "ttft": (first or time.perf_counter()) - sent}


async def load(url: str, jobs: list[tuple[str, str]], clients: int, new: int) -> tuple[list[dict], float]:
    results: list[dict | None] = [None] * len(jobs)
    todo = list(range(len(jobs)))
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def client() -> None:
            while todo:
                i = todo.pop(0)
                try:
                    results[i] = await one(http, *jobs[i], new)
                except httpx.HTTPError as e:
                    results[i] = {"status": -1, "error": f"{type(e).__name__}: {e}"}

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return results, time.perf_counter() - start  # type: ignore[return-value]


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_mode(paths: dict[str, Path], flags: list[str], jobs: list[tuple[str, str]], clients: int,
             new: int) -> tuple[dict[str, Any], list[dict]]:
    proc, url = start_server(paths, flags)
    try:
        asyncio.run(load(url, jobs[:2], 2, 2))  # warm-up: the first forward passes
        server_cpu, client_cpu, loadavg = cpu_seconds(proc.pid), resource.getrusage(resource.RUSAGE_SELF), os.getloadavg()
        results, wall = asyncio.run(load(url, jobs, clients, new))
        server_cpu = cpu_seconds(proc.pid) - server_cpu
        end = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = end.ru_utime + end.ru_stime - client_cpu.ru_utime - client_cpu.ru_stime
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    rows = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith(("ptune_decode_rows_sum", "ptune_decode_rows_count"))}
    summary = {"flags": flags, "requests": len(jobs), "non_200": len(results) - len(ok), "wall_s": round(wall, 2),
               "new_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
               "ttft_p50_s": round(quantile(ttft, 0.5), 3) if ttft else None,
               "ttft_p99_s": round(quantile(ttft, 0.99), 3) if ttft else None,
               "peak_rss_mib": round(rss, 1), "exit_code": code, "server_cpu_s": round(server_cpu, 1),
               "client_cpu_s": round(client_cpu, 1), "loadavg_1m_before_after": [round(loadavg[0], 2),
                                                                               round(os.getloadavg()[0], 2)],
               "mean_rows_per_step": round(rows["ptune_decode_rows_sum"] / rows["ptune_decode_rows_count"], 2)
               if rows.get("ptune_decode_rows_count") else None,
               "errors": [r.get("error") for r in results if r["status"] != 200][:5]}
    return summary, results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="gemma", help="the base (default gemma: Gemma 3 270M, packaged)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--noise", type=float, default=0.02, help="std of the noise added to the adapters' weights")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "saved"), default="auto",
                    help="ptune serve --dtype (auto: float32 on a CPU; saved: as the base's folder holds it, the "
                    "packaged Gemma in bf16)")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_generate.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve-generate-") as tmp:
        base = args.base
        paths = make_adapters(base, Path(tmp), args.noise)
        base_id = ptune.adapter_io.read_spec(paths["prompt"]).base.name
        saved = str(next(ptune.load_base(base, "causal_lm").parameters()).dtype)
        served_dtype = {"auto": "float32" if not torch.cuda.is_available() else saved, "saved": saved}.get(
            args.dtype, args.dtype)
        models = list(paths) + [base_id]
        jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
        common = ["--max-new-tokens", str(max(args.new_tokens, 1)), "--dtype", args.dtype]
        batched, got = run_mode(paths, common, jobs, args.clients, args.new_tokens)
        alone, want = run_mode(paths, common + ["--max-decode-rows", "1"], jobs, args.clients, args.new_tokens)
    same = [g.get("text") == w.get("text") and g["status"] == 200 for g, w in zip(got, want)]
    result = {
        "what": "ptune serve /v1/completions, streamed, greedy: batched decoding vs one request at a time",
        "command": "python bench/serve_generate.py" + (" " + " ".join(argv) if argv else ""),
        "base": args.base, "dtype": args.dtype, "served_dtype": served_dtype, "adapters": {n: METHODS[n]().method for n in METHODS}, "models": models,
        "adapter_weights": f"initialisation + N(0, {args.noise}) noise, untrained",
        "requests": args.requests, "clients": args.clients, "new_tokens": args.new_tokens,
        "batched": batched, "one_at_a_time": alone,
        "speedup_tokens_per_s": round(batched["tokens_per_s"] / alone["tokens_per_s"], 2)
        if alone["tokens_per_s"] else None,
        "outputs_equal_alone": sum(same), "outputs_compared": len(same),
        "mismatches": [{"model": j[0], "prompt": j[1], "batched": g.get("text"), "alone": w.get("text")}
                       for j, g, w, s in zip(jobs, got, want, same) if not s][:5],
        "samples": [{"model": j[0], "prompt": j[1], "text": g.get("text")} for j, g in zip(jobs[:4], got[:4])],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_tokens_per_s", "outputs_equal_alone", "outputs_compared")}
                     | {"batched": batched, "one_at_a_time": alone}, indent=2))
    return result


if __name__ == "__main__":
    main()
