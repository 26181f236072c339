"""`ptune serve` under load: cross-adapter (mixed) batching vs one adapter per forward pass.

Adapters of different methods on the packaged MiniLM (default 4: prompt tuning, P-Tuning v2 and LoRA on
bbc topic classification, AdaLoRA on wnut tagging; their weights randomly perturbed, nothing trained:
speed does not depend on it) are saved under bench/runs/serve_load/ (gitignored). For each
``--batching`` mode a fresh ``python -m ptune.cli serve ... --port 0`` is started on loopback, warmed
up, then sent ``--requests`` requests from ``--clients`` concurrent clients (httpx.AsyncClient, closed
loop: each client sends its next request when the last one is answered). Request i goes to adapter
i mod N (round-robin) with one real input from the task's test split (a bbc article, a wnut tweet as
its words); both modes get the very same requests. Measured: throughput (answered requests per
second of the timed phase), client-side p50/p99 latency, rows and adapters per forward pass (from
/metrics, warm-up excluded), the server's peak RSS while loaded (polled) and VmHWM, non-200 answers,
and whether both modes answer alike. The server is stopped (SIGTERM, then kill) in a ``finally``.
Before the servers, in-process (no HTTP): the worker's cost per row at batch sizes 1 to 32, and the
first 32 requests as one mixed pass vs one pass per adapter (why the ratio is what it is).

    python bench/serve_load.py                          # ~2-4 minutes on 2 CPU cores
    python bench/serve_load.py --requests 400 --clients 8 --out /tmp/serve_load.json   # a quick look

Writes raw numbers to bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import ptune  # noqa: E402
from ptune.data import load_builtin  # noqa: E402

HERE = Path(__file__).resolve().parent
ADAPTERS = {  # name -> (task, method config); the first --adapters of them are served
    "bbc-prompt": ("bbc", lambda: ptune.PromptTuningConfig(num_virtual_tokens=20)),
    "bbc-v2": ("bbc", lambda: ptune.PTuningV2Config(num_virtual_tokens=20, layers="all")),
    "bbc-lora": ("bbc", lambda: ptune.LoraConfig(r=8)),
    "wnut-adalora": ("wnut", lambda: ptune.AdaLoraConfig(init_r=8, target_r=4, total_step=10)),
    "wnut-v2": ("wnut", lambda: ptune.PTuningV2Config(num_virtual_tokens=8, layers="all")),
    "bbc-ptuning": ("bbc", lambda: ptune.PTuningConfig(num_virtual_tokens=20, encoder="mlp")),
    "bbc-bitfit": ("bbc", lambda: ptune.BitFitConfig()),
    "bbc-prefix": ("bbc", lambda: ptune.PrefixTuningConfig(num_virtual_tokens=10, encoder_hidden_size=384)),
}


def make_adapters(root: Path, names: list[str], tasks: dict) -> dict[str, Path]:
    """Each adapter saved the quick way (as bench/mixed_tasks.py): applied to a fresh base, perturbed."""
    tokenizer = ptune.load_tokenizer("minilm")
    if root.exists():
        shutil.rmtree(root)
    out = {}
    for k, name in enumerate(names):
        task_name, make = ADAPTERS[name]
        task = tasks[task_name]
        head = ptune.HeadConfig(task.head, num_labels=len(task.labels), dropout=0.0)
        model = ptune.apply(ptune.load_base("minilm"), make(), head=head, tokenizer=tokenizer,
                            template="{%s}" % task.text_fields[0], labels=task.labels, task=task,
                            max_length=task.max_length)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        out[name] = ptune.save_adapter(model, root / name)
    return out


def workload(names: list[str], n: int, texts: dict[str, list[Any]]) -> list[dict]:
    """Request i: adapter i mod N, the next input of its task's test split (one input per request)."""
    used = {t: 0 for t in texts}
    out = []
    for i in range(n):
        name = names[i % len(names)]
        task = ADAPTERS[name][0]
        x = texts[task][used[task] % len(texts[task])]
        used[task] += 1
        out.append({"adapter": name, "inputs": [x]})
    return out


def metrics(client: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")) and s.name.startswith(("ptune_batch", "ptune_queue_wait")):
                out[s.name] = s.value
    return out


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))]


class Server:
    """``python -m ptune.cli serve`` on a free loopback port; stopped by ``close`` (SIGTERM, then kill)."""

    def __init__(self, paths: dict[str, Path], batching: str, args: argparse.Namespace, log: Path) -> None:
        cmd = [sys.executable, "-m", "ptune.cli", "serve", *[f"{n}={p}" for n, p in paths.items()], "--port", "0",
               "--batching", batching, "--max-batch-size", str(args.max_batch_size), "--max-wait-ms",
               str(args.max_wait_ms), "--max-queue-rows", str(max(4096, 4 * args.clients)), "--log-level", "warning"]
        self.cmd = cmd
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.peak_rss = 0
        self._polling = False

    def url(self, timeout: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = box[0] if box else ""
        if not line.startswith("ptune: serving"):
            raise RuntimeError(f"the server did not start in {timeout:.0f} s: {line!r} (exit {self.proc.poll()}); "
                               f"see {self.log.name}")
        return line.split(" on ", 1)[1].split()[0]

    def status_kb(self, key: str) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def poll_rss(self, every: float = 0.2) -> None:
        self._polling = True

        def loop() -> None:
            while self._polling and self.proc.poll() is None:
                self.peak_rss = max(self.peak_rss, self.status_kb("VmRSS"))
                time.sleep(every)

        threading.Thread(target=loop, daemon=True).start()

    def close(self) -> int | None:
        self._polling = False
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(30)
            return self.proc.returncode
        finally:
            self.log.close()


async def load(url: str, requests: list[dict], clients: int, deadline_s: float) -> dict[str, Any]:
    """Closed loop: ``clients`` tasks each send the next unsent request when their last one is answered."""
    latencies: list[float] = [0.0] * len(requests)
    status: list[int | None] = [None] * len(requests)
    answers: list[Any] = [None] * len(requests)
    errors: list[str] = []
    nxt = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client() -> None:
            nonlocal nxt
            while nxt < len(requests):
                i, nxt = nxt, nxt + 1
                t = time.perf_counter()
                try:
                    r = await http.post("/v1/predict", json=requests[i])
                    status[i] = r.status_code
                    answers[i] = r.json()["results"][0] if r.status_code == 200 else r.json()
                except Exception as e:  # noqa: BLE001 - counted as an error
                    status[i] = -1
                    errors.append(f"{type(e).__name__}: {e}")
                latencies[i] = time.perf_counter() - t

        started = time.perf_counter()
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), deadline_s)
        except asyncio.TimeoutError:
            timed_out = True
        seconds = time.perf_counter() - started
    done = [i for i, s in enumerate(status) if s is not None]
    ok = [i for i in done if status[i] == 200]
    lat = [latencies[i] for i in ok]
    return {"seconds": seconds, "timed_out": timed_out, "sent": len(done), "ok": len(ok),
            "non_200": len(done) - len(ok), "not_sent": len(requests) - len(done),
            "statuses": {str(s): status.count(s) for s in sorted(set(x for x in status if x is not None))},
            "client_errors": errors[:5], "requests_per_s": len(ok) / seconds,
            "latency_ms": {"p50": 1000 * quantile(lat, 0.5), "p90": 1000 * quantile(lat, 0.9),
                           "p99": 1000 * quantile(lat, 0.99), "mean": 1000 * statistics.fmean(lat),
                           "max": 1000 * max(lat)} if lat else None,
            "_answers": answers}


def run_mode(batching: str, paths: dict[str, Path], requests: list[dict], warmup: list[dict],
             args: argparse.Namespace, root: Path) -> dict[str, Any]:
    server = Server(paths, batching, args, root / f"server-{batching}.log")
    try:
        t0 = time.perf_counter()
        url = server.url(args.start_timeout_s)
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(300):  # the port is bound before uvicorn's loop runs
                try:
                    health = http.get("/health").json()
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            assert health["batching"] == batching, health
            startup_s = time.perf_counter() - t0
            asyncio.run(load(url, warmup, min(args.clients, len(warmup)), args.mode_timeout_s))  # first calls allocate
            before = metrics(http)
            server.poll_rss()
            load_before = os.getloadavg()
            result = asyncio.run(load(url, requests, args.clients, args.mode_timeout_s))
            load_after = os.getloadavg()
            after = metrics(http)
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        passes = d.get("ptune_batch_rows_count", 0.0)
        result.update({
            "batching": batching, "server_startup_s": startup_s,
            "load_average_before_after": [load_before, load_after],
            "forward_passes": passes,
            "mean_rows_per_forward_pass": d["ptune_batch_rows_sum"] / passes if passes else None,
            "mean_adapters_per_forward_pass": d["ptune_batch_adapters_sum"] / passes if passes else None,
            "mean_requests_per_batch": (d["ptune_batch_requests_sum"] / d["ptune_batch_requests_count"]
                                        if d.get("ptune_batch_requests_count") else None),
            "worker_busy_s": d.get("ptune_batch_seconds_sum"),
            "worker_busy_share": d.get("ptune_batch_seconds_sum", 0.0) / result["seconds"],
            "mean_queue_wait_ms": (1000 * d["ptune_queue_wait_seconds_sum"] / d["ptune_queue_wait_seconds_count"]
                                   if d.get("ptune_queue_wait_seconds_count") else None),
            "server_peak_rss_mb_during_load": server.peak_rss / 1024,
            "server_vmhwm_mb": server.status_kb("VmHWM") / 1024,
        })
    finally:
        result_code = server.close()
    result["server_exit_code"] = result_code
    return result


def forward_cost(paths: dict[str, Path], requests: list[dict], max_batch_size: int, repeats: int = 2) -> dict:
    """In-process, no HTTP: the worker's cost per row at several batch sizes (one bbc adapter), and the
    first ``max_batch_size`` requests of the workload as ONE mixed batch vs one batch per adapter."""
    aset = ptune.AdapterSet.load(paths)

    def rows(reqs: list[dict]) -> list[dict]:
        return [{"adapter": r["adapter"], **(x if isinstance(x, dict) else {"text": x})}
                for r in reqs for x in r["inputs"]]

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    bbc = [r for r in requests if ADAPTERS[r["adapter"]][0] == "bbc"]
    one = [r for r in bbc if r["adapter"] == bbc[0]["adapter"]][:max_batch_size]
    aset.predict_batch(rows(one[:4]))  # warm-up
    per_row = {}
    for size in sorted({1, 4, 8, 16, max_batch_size}):
        chunks = [rows(one[i:i + size]) for i in range(0, len(one), size)]
        per_row[size] = 1000 * best(lambda: [aset.predict_batch(c) for c in chunks]) / len(one)
    mixed = rows(requests[:max_batch_size])
    by_adapter: dict[str, list[dict]] = {}
    for r in mixed:
        by_adapter.setdefault(r["adapter"], []).append(r)
    t_mixed = best(lambda: aset.predict_batch(mixed))
    t_split = best(lambda: [aset.predict_batch(v) for v in by_adapter.values()])
    return {"adapter": one[0]["adapter"], "rows": len(one), "ms_per_row_by_batch_size": per_row,
            "first_batch": {"rows": len(mixed), "adapters": len(by_adapter), "one_mixed_pass_s": t_mixed,
                            "one_pass_per_adapter_s": t_split, "ratio": t_split / t_mixed},
            "repeats": repeats, "note": "best of the repeats; tokenization, forward and decoding, on the bench's "
                                        "process (the servers are not running)"}


def agreement(a: list[Any], b: list[Any]) -> dict[str, Any]:
    same, diff, n = 0, 0.0, 0
    for x, y in zip(a, b):
        if not (isinstance(x, dict) and isinstance(y, dict)) or "error" in x or "error" in y:
            continue
        n += 1
        if "tags" in x:
            same += x["tags"] == y.get("tags")
        else:
            same += x["label"] == y.get("label")
            diff = max(diff, max(abs(x["probabilities"][k] - y["probabilities"][k]) for k in x["probabilities"]))
    return {"compared": n, "same_prediction": same, "max_probability_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4, help=f"how many of {list(ADAPTERS)} (default 4)")
    ap.add_argument("--modes", default="mixed,per-adapter", help="--batching modes, in this order")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1: on a 2-core "
                    "machine the load generator needs the other core; 0: torch's default, all cores)")
    ap.add_argument("--mode-timeout-s", type=float, default=150.0, help="the timed phase of one mode stops here")
    ap.add_argument("--start-timeout-s", type=float, default=120.0)
    ap.add_argument("--no-forward-cost", dest="forward_cost", action="store_false",
                    help="skip the in-process cost per row by batch size (about 20 s)")
    ap.add_argument("--root", default=str(HERE / "runs" / "serve_load"), help="where the adapters are saved")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_load.json"))
    args = ap.parse_args()
    if not 1 <= args.adapters <= len(ADAPTERS):
        ap.error(f"--adapters must be 1 to {len(ADAPTERS)}")
    began, load_start = time.perf_counter(), os.getloadavg()
    root = Path(args.root)
    names = list(ADAPTERS)[:args.adapters]
    tasks, texts = {}, {}
    for task_name in ("bbc", "wnut"):
        tasks[task_name], splits = load_builtin(task_name, seed=0)
        texts[task_name] = ([r["text"] for r in splits["test"]] if task_name == "bbc"
                            else [{"tokens": r["tokens"]} for r in splits["test"]])
    t0 = time.perf_counter()
    paths = make_adapters(root / "adapters", names, tasks)
    make_s = time.perf_counter() - t0
    requests = workload(names, args.requests, texts)
    warmup = workload(names, 4 * len(names), {t: v[::-1] for t, v in texts.items()})
    if args.threads:
        torch.set_num_threads(args.threads)  # the in-process measurement below, as the servers run
    load_cost = os.getloadavg()
    cost = forward_cost(paths, requests, args.max_batch_size) if args.forward_cost else None
    if cost:
        per_row = {k: round(v, 1) for k, v in cost["ms_per_row_by_batch_size"].items()}
        print(f"in-process, ms per row by batch size: {per_row}; first {cost['first_batch']['rows']} "
              f"requests: one mixed pass {cost['first_batch']['one_mixed_pass_s']:.2f} s, one pass per adapter "
              f"{cost['first_batch']['one_pass_per_adapter_s']:.2f} s", flush=True)
        cost["load_average_before_after"] = [load_cost, os.getloadavg()]
    modes = {}
    for mode in args.modes.split(","):
        modes[mode] = run_mode(mode, paths, requests, warmup, args, root)
        r = modes[mode]
        print(f"{mode}: {r['requests_per_s']:.1f} req/s, p50 {r['latency_ms']['p50']:.0f} ms, p99 "
              f"{r['latency_ms']['p99']:.0f} ms, {r['mean_rows_per_forward_pass']:.1f} rows/pass, "
              f"{r['non_200']} non-200, peak RSS {r['server_peak_rss_mb_during_load']:.0f} MB", flush=True)
    answers = {m: r.pop("_answers") for m, r in modes.items()}
    result: dict[str, Any] = {
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]]),
        "device": "cpu", "cpus": os.cpu_count(),
        "server_torch_threads": args.threads or "torch default (all cores)",
        "load_average_start_end": [load_start, os.getloadavg()],
        "python": sys.version.split()[0], "machine": platform.machine(), "platform": platform.platform(),
        "versions": {"ptune": ptune.__version__, "torch": torch.__version__, "httpx": httpx.__version__,
                     **{m: __import__(m).__version__ for m in ("fastapi", "uvicorn", "transformers")}},
        "base": "minilm (all-MiniLM-L6-v2), fp32 (adapter folders: no run config asking for bf16)",
        "adapters": {n: {"task": ADAPTERS[n][0], "method": ADAPTERS[n][1]().method} for n in names},
        "requests": args.requests, "clients": args.clients, "inputs_per_request": 1,
        "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "max_length": 128,
        "workload": "request i -> adapter i mod N; bbc: test-split articles, wnut: test-split tweets as words",
        "seconds_make_adapters": make_s, "forward_cost_in_process": cost, "modes": modes,
    }
    if "mixed" in modes and "per-adapter" in modes:
        m, p = modes["mixed"], modes["per-adapter"]
        result["mixed_vs_per_adapter"] = {
            "throughput_ratio": m["requests_per_s"] / p["requests_per_s"],
            "p50_latency_ratio": p["latency_ms"]["p50"] / m["latency_ms"]["p50"],
            "p99_latency_ratio": p["latency_ms"]["p99"] / m["latency_ms"]["p99"],
            "answers_agree": agreement(answers["mixed"], answers["per-adapter"])}
        print(f"mixed / per-adapter: {result['mixed_vs_per_adapter']['throughput_ratio']:.2f}x throughput, "
              f"answers agree: {result['mixed_vs_per_adapter']['answers_agree']}")
    result["seconds_total"] = time.perf_counter() - began
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out} ({result['seconds_total']:.0f} s in all)")


if __name__ == "__main__":
    main()
