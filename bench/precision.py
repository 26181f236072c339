"""fp32 against bf16 autocast for a training step on this CPU (what ``--precision auto`` should pick).

A P-Tuning v2 and a LoRA training step (forward + backward) on the packaged MiniLM, batch 16, at 64 and 128
tokens, the two precisions interleaved in one process (so a change in machine load hits both alike);
the median of ``--reps`` steps each. Writes bench/results/precision.json and .md.

    python bench/precision.py            # about 2 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import ptune
from ptune.engine.precision import bf16_available, cpu_flags

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    tok = ptune.load_tokenizer("minilm")
    rows = []
    for method, config in (("p_tuning_v2", ptune.PTuningV2Config(num_virtual_tokens=10, layers="all")),
                           ("lora", ptune.LoraConfig(r=8))):
        torch.manual_seed(0)
        model = ptune.apply(ptune.load_base("minilm"), config, head=ptune.HeadConfig("classification", num_labels=5),
                            tokenizer=tok).train()
        for length in (64, 128):
            ids = torch.randint(1000, 20000, (16, length))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "virtual_index": torch.full_like(ids, -1), "labels": torch.randint(0, 5, (16,))}

            def step(bf16: bool) -> float:
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**batch).loss
                loss.backward()
                model.zero_grad(set_to_none=True)
                return time.perf_counter() - started

            step(False), step(True)  # warm-up
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.reps):
                for bf16 in (False, True):
                    times[bf16].append(step(bf16))
            fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
            rows.append({"method": method, "batch": 16, "length": length, "fp32_s": fp32, "bf16_s": bf16,
                         "bf16_over_fp32": bf16 / fp32})
            print(f"{method} length {length}: fp32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s ({bf16 / fp32:.2f}x)")
    flags = cpu_flags()
    facts = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
             "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
             "torch": torch.__version__, "precision_auto_picks": "bf16" if bf16_available() else "fp32",
             "reps": args.reps}
    OUT.mkdir(exist_ok=True)
    (OUT / "precision.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    lines = ["# fp32 vs bf16 autocast, one training step (MiniLM, batch 16)", "",
             f"CPU flags: avx512f {facts['avx512f']}, avx512_bf16 {facts['avx512_bf16']}, amx_bf16 "
             f"{facts['amx_bf16']}; {facts['threads']} threads; torch {facts['torch']}; `--precision auto` picks "
             f"{facts['precision_auto_picks']}. Median of {args.reps} interleaved steps.", "",
             "| method | length | fp32 (s) | bf16 autocast (s) | bf16 / fp32 |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['length']} | {r['fp32_s']:.3f} | {r['bf16_s']:.3f} | {r['bf16_over_fp32']:.2f}x |"
              for r in rows]
    (OUT / "precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
