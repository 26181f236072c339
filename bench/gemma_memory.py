"""Peak memory of training steps on the packaged Gemma 3 270M: QLoRA vs LoRA, and P-Tuning v2 on a
4-bit base with gradient checkpointing vs the unquantized base.

Each configuration runs in a fresh subprocess (so its peak RSS is its own): load the base, attach
the method, run a few AdamW steps on a fixed batch of bbc articles (verbalizer head, bf16 autocast),
and report peak RSS, seconds per step and the losses. Writes a Markdown table.

    python bench/gemma_memory.py --out bench/results_gemma_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    "lora-fp32": dict(method="lora", dtype="fp32", quantize=None, checkpointing=False),
    "lora-bf16": dict(method="lora", dtype="bf16", quantize=None, checkpointing=False),
    "qlora-nf4": dict(method="qlora", dtype="bf16", quantize="nf4", checkpointing=False),
    "prompt_tuning-bf16": dict(method="prompt_tuning", dtype="bf16", quantize=None, checkpointing=False),
    "p_tuning-bf16": dict(method="p_tuning", dtype="bf16", quantize=None, checkpointing=False),
    "p_tuning_v2-bf16+ckpt": dict(method="p_tuning_v2", dtype="bf16", quantize=None, checkpointing=True),
    "p_tuning_v2-nf4+ckpt": dict(method="p_tuning_v2", dtype="bf16", quantize="nf4", checkpointing=True),
}


class RssSampler:
    """Samples this process's resident memory every 5 ms: the peak of the training steps alone
    (``ru_maxrss`` would include loading, which for a quantized base passes through full precision)."""

    def __init__(self) -> None:
        import threading

        import psutil

        self._proc = psutil.Process()
        self.start_mb = self._proc.memory_info().rss / 2**20
        self.peak_mb = self.start_mb
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.005):
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak_mb


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch

    import ptune
    from ptune.batching import collate
    from ptune.data import load_builtin

    c = CONFIGS[name]
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[c["dtype"]]
    tok = ptune.load_tokenizer("gemma")
    base = ptune.load_base("gemma", "causal_lm", dtype=dtype, quantize=c["quantize"])
    task, splits = load_builtin("bbc")
    words = [task.label_words[x] for x in task.labels]
    config = ptune.make_config(c["method"], **({"r": 8} if "lora" in c["method"] else {"num_virtual_tokens": 16}))
    model = ptune.apply(base, config, head=ptune.HeadConfig("verbalizer"), template="{text} This article is about {mask}",
                        tokenizer=tok, labels=task.labels, label_words=words)
    for p in model.parameters():  # trainable parameters in fp32, the frozen base as loaded
        if p.requires_grad:
            p.data = p.data.float()
    if c["checkpointing"]:
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    enc = ptune.TemplateEncoder(model.template, tok, max_length=args.max_length, causal=True)
    rows = splits["train"][:args.batch_size]
    batch = collate([enc.encode(r) for r in rows], pad_id=tok.pad_token_id,
                    targets=[task.label_to_id[r["label"]] for r in rows])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses, times = [], []
    sampler = RssSampler()
    for _ in range(args.steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(round(float(loss.detach()), 4))
    train_peak = sampler.stop()
    tokens = int(batch["attention_mask"].sum())
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_training_mb": sampler.start_mb, "train_peak_rss_mb": train_peak,
            "s_per_step": min(times[1:]) if len(times) > 1 else times[0], "tokens_per_s": tokens / min(times),
            "losses": losses, "trainable": model.trainable_parameters()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="bench/results_gemma_memory.md")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--lr", str(args.lr)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(name, "failed:", proc.stderr[-3000:], file=sys.stderr)
            rows.append(f"| {name} | failed | | | | |")
            continue
        r = json.loads(line[0][7:])
        print(name, r, flush=True)
        rows.append(f"| {name} | {r['rss_before_training_mb']:.0f} | {r['train_peak_rss_mb']:.0f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                    f"{r['trainable']:,} | {r['losses'][0]} -> {r['losses'][-1]} |")
    text = (f"Gemma 3 270M (bf16 folder converted from the packaged GGUF), verbalizer head on bbc, batch "
            f"{args.batch_size} x up to {args.max_length} tokens, {args.steps} AdamW steps, bf16 autocast, 2 CPU cores.\n\n"
            "| configuration | RSS after load MB | peak RSS during training MB | process peak RSS MB (incl. loading) | "
            "s/step | train tokens/s | trainable | loss first -> last |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
