"""Peak memory of training steps on the packaged Gemma 3 270M: QLoRA vs LoRA, and P-Tuning v2 on a
4-bit base with gradient checkpointing vs the unquantized base; and greedy generation from the 4-bit
base against the bf16 one.

Each configuration runs in a fresh subprocess (so its peak RSS is its own): load the base, attach
the method, run a few AdamW steps on a fixed batch of bbc articles (verbalizer head, bf16 autocast),
and report peak RSS, seconds per step, the losses and where the memory stood before training (after
the imports, the tokenizer, the base). Writes a Markdown table and the raw results as JSON.

    python bench/gemma_memory.py --out bench/results_gemma_memory.md --json bench/results/gemma_memory.json
    python bench/gemma_memory.py --generation --json bench/results/gemma_memory_generation.json

``--generation``: three fresh processes. The bf16 base generates greedily from a few prompts and keeps its
logits; the NF4 base (linear layers, token table and tied LM head in 4 bits) then generates from the same
prompts and scores the bf16 base's sequences teacher-forced; so does ``nf4-linear`` (only the linear layers
in 4 bits, the table and head in bf16), which tells the table's share of the difference from the layers'. Reported: greedy tokens equal to bf16's
(per position and whole sequences), teacher-forced top-1 agreement, mean |logit difference| and the mean
KL divergence of the next-token distributions.
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
    "qlora-nf4+ckpt": dict(method="qlora", dtype="bf16", quantize="nf4", checkpointing=True),
    "lora-bf16+ckpt": dict(method="lora", dtype="bf16", quantize=None, checkpointing=True),
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
    marks = {"imports_mb": rss_mb()}
    tok = ptune.load_tokenizer("gemma")
    marks["tokenizer_mb"] = rss_mb()
    base = ptune.load_base("gemma", "causal_lm", dtype=dtype, quantize=c["quantize"])
    marks["base_mb"] = rss_mb()
    marks["base_quantized_tables"] = getattr(base, "_ptune_quantized_embeddings", None)
    task, splits = load_builtin("bbc")
    words = [task.label_words[x] for x in task.labels]
    config = ptune.make_config(c["method"], **({"r": 8} if "lora" in c["method"] else {"num_virtual_tokens": 16, **({"layers": "all"} if c["method"] == "p_tuning_v2" else {})}))
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
            "losses": losses, "trainable": model.trainable_parameters()[0], "config": c,
            "batch_size": args.batch_size, "max_length": args.max_length, "tokens": tokens, **marks}


def rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


PROMPTS = ["Water boils at", "The capital of France is", "The largest planet in the solar system is",
           "Once upon a time, there was a", "The stock market fell sharply on Monday after",
           "To make a cup of tea, first", "The football match ended with", "Scientists have discovered a new"]


def generate_one(which: str, args: argparse.Namespace) -> dict:
    """One side of --generation: greedy continuations of PROMPTS (and, for nf4, bf16's sequences scored)."""
    import torch

    import ptune

    tok = ptune.load_tokenizer("gemma")
    if which == "nf4-linear":  # the linear layers in NF4, the token table and its tied LM head left in bf16
        import ptune.quantize

        ptune.quantize.quantize_base_embeddings = lambda model, kind: {}
    base = ptune.load_base("gemma", "causal_lm", dtype=torch.bfloat16,
                           quantize=None if which == "bf16" else "nf4").eval()
    sequences, logits = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            out = base.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0]
            sequences.append(out.tolist())
            n = ids.shape[1]
            # logits that predict each generated token, teacher-forced on this side's own sequence
            logits.append(base(out[None]).logits[0, n - 1:-1].float())
    r = {"which": which, "prompt_lengths": [len(tok(p)["input_ids"]) for p in PROMPTS], "sequences": sequences,
         "texts": [tok.decode(s_) for s_ in sequences], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if which == "bf16":
        torch.save({"sequences": sequences, "logits": logits}, args.ref)
        return r
    ref = torch.load(args.ref)
    agree, tf_top1, diffs, kls, whole = [], [], [], [], 0
    with torch.no_grad():
        for k, (seq, ref_seq, ref_logits) in enumerate(zip(sequences, ref["sequences"], ref["logits"])):
            n = r["prompt_lengths"][k]
            same = [a == b for a, b in zip(seq[n:], ref_seq[n:])]
            agree += same
            whole += all(same)
            got = base(torch.tensor(ref_seq)[None]).logits[0, n - 1:-1].float()  # bf16's sequence, nf4's logits
            tf_top1 += (got.argmax(-1) == ref_logits.argmax(-1)).tolist()
            diffs.append(float((got - ref_logits).abs().mean()))
            kls.append(float(torch.nn.functional.kl_div(got.log_softmax(-1), ref_logits.log_softmax(-1),
                                                        log_target=True, reduction="batchmean")))
    r.update(reference_texts=[tok.decode(s_) for s_ in ref["sequences"]],
             greedy_token_agreement=sum(agree) / len(agree), greedy_sequences_identical=f"{whole}/{len(PROMPTS)}",
             teacher_forced_top1_agreement=sum(tf_top1) / len(tf_top1), mean_abs_logit_diff=sum(diffs) / len(diffs),
             mean_kl_bf16_to_nf4=sum(kls) / len(kls),
             mean_abs_bf16_logit=float(sum(float(x.abs().mean()) for x in ref["logits"]) / len(ref["logits"])))
    return r


def run_generation(args: argparse.Namespace) -> None:
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("bf16", "nf4", "nf4-linear"):
            cmd = [sys.executable, __file__, "--gen-one", which, "--ref", os.path.join(tmp, "ref.pt"),
                   "--new-tokens", str(args.new_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                sys.exit(f"{which} failed: {proc.stderr[-3000:]}")
            results[which] = json.loads(line[0][7:])
    nf4 = results["nf4"]
    keys = ("greedy_token_agreement", "greedy_sequences_identical", "teacher_forced_top1_agreement",
            "mean_abs_logit_diff", "mean_kl_bf16_to_nf4", "mean_abs_bf16_logit")
    summary = {k: nf4[k] for k in keys}
    summary["nf4_linear_only"] = {k: results["nf4-linear"][k] for k in keys}  # which part moves the outputs
    out = {"command": "python bench/gemma_memory.py --generation", "new_tokens": args.new_tokens, "prompts": PROMPTS,
           "summary": summary, "bf16": results["bf16"], "nf4": nf4, "nf4-linear": results["nf4-linear"]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(summary, indent=1))
    for a, b in zip(nf4["reference_texts"], nf4["texts"]):
        print("bf16:", repr(a), "\nnf4: ", repr(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="bench/results_gemma_memory.md")
    p.add_argument("--json", help="also write the raw results here (JSON)")
    p.add_argument("--generation", action="store_true", help="compare greedy generation of the NF4 base with bf16")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--gen-one", help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gen_one:
        print("RESULT " + json.dumps(generate_one(args.gen_one, args)), flush=True)
        return
    if args.generation:
        run_generation(args)
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    rows, raw = [], {}
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
        raw[name] = r
        print(name, r, flush=True)
        rows.append(f"| {name} | {r['rss_before_training_mb']:.0f} | {r['train_peak_rss_mb']:.0f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                    f"{r['trainable']:,} | {r['losses'][0]} -> {r['losses'][-1]} |")
    text = (f"Gemma 3 270M (bf16 folder converted from the packaged GGUF), verbalizer head on bbc, batch "
            f"{args.batch_size} x up to {args.max_length} tokens, {args.steps} AdamW steps, bf16 autocast, 2 CPU cores.\n\n"
            "| configuration | RSS after load MB | peak RSS during training MB | process peak RSS MB (incl. loading) | "
            "s/step | train tokens/s | trainable | loss first -> last |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    lora, qlora = raw.get("lora-bf16"), raw.get("qlora-nf4")
    if lora and qlora:
        text += "\nQLoRA-nf4 / LoRA-bf16 peak RSS during training: " + ", ".join(
            f"{q}: {raw[q]['train_peak_rss_mb'] / lora['train_peak_rss_mb']:.3f}" for q in raw if q.startswith("qlora")) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python", "bench/gemma_memory.py"] + sys.argv[1:]), "results": raw}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
