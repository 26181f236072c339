"""torch.compile (inductor, CPU) on ptune's training step: does it pay here? (issue #15, lever 4)

Two identical MiniLM models (same method, same bbc batch of 32 x 128) in one process: one plain, one
whose transformer body's forward is ``torch.compile``d (default mode, inductor). Steps alternate
between them after warm-up, so load changes hit both alike; the median step time of each, the first
(compiling) step's time, and the ratio are written to bench/results/compile.{md,json}.

    python bench/compile.py                                   # p_tuning_v2 and lora, ~8 min on 2 cores
    python bench/compile.py --methods p_tuning_v2 --steps 4   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from speed import host_facts  # noqa: E402


def build(method: str, batch_size: int, max_length: int):
    import ptune
    from ptune.batching import collate
    from ptune.engine import TrainConfig
    from ptune.engine.build import build_model, encode_records, load_task, make_encoder

    torch.manual_seed(0)
    cfg = TrainConfig(model="minilm", task="bbc", method=method, max_length=max_length, progress=False,
                      method_options={"layers": "all"} if method == "p_tuning_v2" else {})  # full depth
    tok = ptune.load_tokenizer("minilm")
    task, splits = load_task(cfg, tok)
    model = build_model(cfg, task, tok)
    enc = make_encoder(model, tok)
    ex = encode_records(task, enc, splits["train"][:batch_size])
    batch = collate([e.encoded for e in ex], pad_id=enc.placeholder_id, targets=[e.target for e in ex])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    return model, batch, opt


def step(model, batch, opt) -> float:
    t = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="p_tuning_v2,lora")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="bench/results/compile.md")
    args = p.parse_args()
    rows = []
    for method in args.methods.split(","):
        plain, batch, opt_plain = build(method, args.batch_size, args.max_length)
        compiled, _, opt_comp = build(method, args.batch_size, args.max_length)
        compiled.backbone.forward = torch.compile(compiled.backbone.forward)
        first_compiled = step(compiled, batch, opt_comp)  # compiles forward and backward
        first_plain = step(plain, batch, opt_plain)
        for _ in range(2):
            step(plain, batch, opt_plain), step(compiled, batch, opt_comp)
        times: dict[str, list[float]] = {"plain": [], "compiled": []}
        for _ in range(args.steps):
            times["plain"].append(step(plain, batch, opt_plain))
            times["compiled"].append(step(compiled, batch, opt_comp))
        row = {"method": method, "first_step_plain_s": first_plain, "first_step_compiled_s": first_compiled,
               "median_plain_s": statistics.median(times["plain"]),
               "median_compiled_s": statistics.median(times["compiled"]), "steps": times}
        row["speedup"] = row["median_plain_s"] / row["median_compiled_s"]
        print(json.dumps({k: v for k, v in row.items() if k != "steps"}), flush=True)
        rows.append(row)
        del plain, compiled
    host = host_facts()
    lines = [f"MiniLM + bbc, batch {args.batch_size} x {args.max_length}, one training step (forward, backward, "
             f"AdamW), median of {args.steps} alternating steps after 2 warm-up; {host.get('cpu', '?')}.", "",
             "| method | plain s/step | compiled s/step | speed-up | first compiled step s (compile) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['median_plain_s']:.3f} | {r['median_compiled_s']:.3f} | {r['speedup']:.2f}x | "
              f"{r['first_step_compiled_s']:.0f} |" for r in rows]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out[:-3] + ".json", "w") as f:
        json.dump({"host": host, "rows": rows, "args": vars(args)}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
