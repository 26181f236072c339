"""Attention kernels for a frozen-base training step on this CPU: forward and backward time, and error.

Times one attention call (forward, then backward from a fixed output gradient) at the shapes of the
speed benchmarks, for: SDPA in fp32, SDPA in bf16 (what HF models and PEFT run under bf16 autocast),
eager attention in bf16 (matmul, fp32 softmax, matmul: transformers' ``attn_implementation="eager"``
under autocast) and ptune's matmul kernel (``ptune.attention.MatmulAttention``, what ptune trains with
in bf16 on a CPU). Error: the largest absolute difference of the output and of dQ / dK / dV from a
float64 computation on the same (bf16-representable) inputs. Median of ``--repeats`` calls after one
warm-up, the kernels taken round-robin so a change in machine load hits all of them alike.

    python bench/attention.py                       # bench/results/attention.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
# (name, batch, query heads, queries, keys, head dim): MiniLM 32 x 128 with 20 prefix keys (P-Tuning v2),
# MiniLM without prefixes (LoRA), Gemma 3 270M 8 x 128 (4 query heads over 1 key/value head: repeated)
SHAPES = [("MiniLM + 20 prefixes", 32, 12, 128, 148, 32), ("MiniLM", 32, 12, 128, 128, 32),
          ("Gemma 3 270M", 8, 4, 128, 128, 256)]


def kernels():
    from ptune.attention import MatmulAttention, additive_bias

    def sdpa(q, k, v, keep, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)

    def eager(q, k, v, keep, scale):  # transformers' eager_attention_forward under bf16 autocast
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = s + torch.zeros(keep.shape, dtype=s.dtype).masked_fill(~keep, torch.finfo(s.dtype).min)
        return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def ours(q, k, v, keep, scale):
        bias = additive_bias(keep, False, q.shape[2], k.shape[2], q.device, q.dtype)
        return MatmulAttention.apply(q, k, v, bias, scale)

    return [("SDPA", torch.float32, sdpa), ("SDPA", torch.bfloat16, sdpa), ("eager", torch.bfloat16, eager),
            ("ptune kernel", torch.bfloat16, ours)]


def measure(shape, repeats: int) -> list[dict]:
    _, B, H, Tq, Tk, D = shape
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(B, H, t, D, generator=g).bfloat16().double() for t in (Tq, Tk, Tk)]
    grad = torch.randn(B, H, Tq, D, generator=g).bfloat16().double()
    keep = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    keep[: B // 2, ..., Tk - Tk // 8:] = False  # half the rows padded by an eighth
    scale = D ** -0.5
    ref = [x.clone().requires_grad_() for x in base]
    s = (ref[0] @ ref[1].transpose(-1, -2)) * scale
    out = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ ref[2]
    out.backward(grad)
    want = [out.detach()] + [x.grad for x in ref]
    rows = []
    for name, dtype, fn in kernels():
        rows.append({"kernel": name, "dtype": str(dtype).replace("torch.", ""), "fwd": [], "bwd": [], "fn": fn,
                     "torch_dtype": dtype})
    for i in range(repeats + 1):
        for r in rows:
            q, k, v = (x.to(r["torch_dtype"]).requires_grad_() for x in base)
            t0 = time.perf_counter()
            o = r["fn"](q, k, v, keep, scale)
            t1 = time.perf_counter()
            o.backward(grad.to(o.dtype))
            t2 = time.perf_counter()
            if i:
                r["fwd"].append(t1 - t0)
                r["bwd"].append(t2 - t1)
            else:
                got = [o.detach(), q.grad, k.grad, v.grad]
                r["max_error"] = {n: float((a.double() - b).abs().max()) for n, a, b in
                                  zip(("out", "dq", "dk", "dv"), got, want)}
    for r in rows:
        r.pop("fn"), r.pop("torch_dtype")
        r["fwd_ms"], r["bwd_ms"] = 1000 * statistics.median(r.pop("fwd")), 1000 * statistics.median(r.pop("bwd"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=str(RESULTS / "attention.md"))
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import describe, host_facts, load

    facts, results = host_facts(), []
    for shape in SHAPES:
        before = load()
        results.append({"shape": dict(zip(("name", "batch", "heads", "queries", "keys", "head_dim"), shape)),
                        "load_before": before, "rows": measure(shape, args.repeats), "load_after": load()})
    lines = [describe(facts), "", "| shape (batch x heads x queries x keys x head dim) | kernel | dtype | forward ms | "
             "backward ms | fwd+bwd vs bf16 SDPA | max error out / dQ / dK / dV (vs float64) |", "|---|---|---|---|---|---|---|"]
    for res in results:
        s = res["shape"]
        label = f"{s['name']} ({s['batch']} x {s['heads']} x {s['queries']} x {s['keys']} x {s['head_dim']})"
        sdpa16 = next(r for r in res["rows"] if r["kernel"] == "SDPA" and r["dtype"] == "bfloat16")
        ref = sdpa16["fwd_ms"] + sdpa16["bwd_ms"]
        for r in res["rows"]:
            e = r["max_error"]
            lines.append(f"| {label} | {r['kernel']} | {r['dtype']} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | "
                         f"{ref / (r['fwd_ms'] + r['bwd_ms']):.2f}x | "
                         f"{e['out']:.4f} / {e['dq']:.4f} / {e['dk']:.4f} / {e['dv']:.4f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": "python bench/attention.py " + " ".join(sys.argv[1:]),
                                                    "host": facts, "repeats": args.repeats, "results": results},
                                                   indent=2))
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
