"""A memory model of PEFT training: predicted peak resident memory per method from a model config alone.

    python bench/memory_model.py --measure          # MiniLM peaks (fresh processes) -> bench/results/memory_model_minilm.json
    python bench/memory_model.py                    # predictions vs measured (MiniLM + bench/results/gemma_memory.json)
                                                    # -> bench/results/memory_model.json, then a Llama-2-7B-shaped table

predicted peak = process + tokenizer + weights + trainable state + activations + head

- process: a fresh python process after ``import torch, transformers, ptune, bitsandbytes`` (measured here,
  ``PROCESS_MB``); tokenizer: the model's tokenizer loaded in that process (measured: Gemma's 262k-word one
  holds 330 MB; WordPiece / a 32k SentencePiece a few MB).
- weights, counted on the ``meta`` device (``AutoModel*.from_config`` under ``torch.device("meta")``: no
  memory, exact parameter counts): bf16 2 bytes, fp32 4; NF4 linear layers 4.127 bits (block 64, double
  quantization) where their input width is a multiple of 64 (others stay bf16, as ptune.quantize does); a
  decoder's token table (and tied LM head, counted once) 4.5 bits when quantized (ptune.quantized_embedding),
  an encoder's stays bf16.
- trainable state: 16 bytes per trainable parameter (fp32 weight, its gradient, AdamW's two moments).
- activations: what autograd keeps per layer, measured, not guessed: one forward of the same architecture
  (real widths, 1-2 layers, uninitialised weights, batch 1, bf16, eager attention) under
  ``torch.autograd.graph.saved_tensors_hooks``, counting each saved storage once, at two lengths, fitted to
  bytes/token/layer = a + b x length (b: the attention probabilities). Times layers x batch x length (length
  + prefix for the attention part of P-Tuning v2). With gradient checkpointing: each layer's input
  (2 bytes x hidden) plus one layer recomputed. Gradients flow to the bottom layer for every method here.
- head: rows scored x vocabulary x 10 bytes (bf16 logits, the fp32 log-softmax and its gradient); a
  verbalizer scores one row per example, a causal LM every target token.

A GPU run has no python-process / tokenizer term on the device: the Llama-2-7B table gives both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA's storage per weight with double quantization
TABLE_NF4_BITS = 4.5  # ptune.quantized_embedding: NF4 codes + fp32 absmax per 64
ADAMW_BYTES = 16
HEAD_BYTES_PER_LOGIT = 10


@dataclass
class Run:
    method: str            # lora | qlora | p_tuning_v2
    weights: str           # bf16 | fp32 | nf4
    batch: int
    length: int
    checkpointing: bool = False
    r: int = 8
    lora_targets: str = "qv"          # qv (q_proj + v_proj / query + value) or all-linear (QLoRA's default)
    virtual_tokens: int = 16
    head_rows: str = "one"            # one (classifier / verbalizer: one row per example) | targets (causal LM)
    head_vocab: bool = True           # the head projects onto the vocabulary (verbalizer, causal LM)
    target_tokens: int = 0            # causal LM: scored tokens per example


def meta_model(cfg: Any) -> torch.nn.Module:
    import transformers as tf

    with torch.device("meta"):
        if getattr(cfg, "is_decoder", False) or cfg.model_type not in ("bert",):
            return tf.AutoModelForCausalLM.from_config(cfg)
        return tf.AutoModel.from_config(cfg)


def is_decoder(cfg: Any) -> bool:
    return cfg.model_type != "bert"


def count(cfg: Any) -> dict[str, Any]:
    """Parameter counts by role from the meta-device model."""
    from torch import nn

    model = meta_model(cfg)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if is_decoder(cfg) else None
    tied = head is not None and head.weight is emb.weight
    linear_q, linear_plain, other = 0, 0, 0
    lin_shapes = []
    seen = {id(emb.weight)} | ({id(head.weight)} if head is not None else set())
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m is not head:
            seen.add(id(m.weight))
            lin_shapes.append((name, m.in_features, m.out_features))
            if m.in_features % 64 == 0:
                linear_q += m.weight.numel()
            else:
                linear_plain += m.weight.numel()
    for p in model.parameters():
        if id(p) not in seen:
            other += p.numel()
    return {"embedding": emb.weight.numel(), "lm_head": 0 if (head is None or tied) else head.weight.numel(),
            "tied": tied, "linear_quantizable": linear_q, "linear_other": linear_plain, "other": other,
            "total": sum(p.numel() for p in model.parameters()), "linears": lin_shapes}


def weight_bytes(c: dict, weights: str) -> float:
    table = c["embedding"] + c["lm_head"]
    if weights == "fp32":
        return 4 * (c["total"])
    if weights == "bf16":
        return 2 * (c["total"])
    # nf4: the linears and (decoders) the token table / LM head in 4 bits, the rest bf16
    return (c["linear_quantizable"] * NF4_BITS / 8 + 2 * (c["linear_other"] + c["other"])
            + table * (TABLE_NF4_BITS / 8 if c.get("decoder", True) else 2))


def trainable(cfg: Any, c: dict, run: Run) -> int:
    if run.method in ("lora", "qlora"):
        names = ("q_proj", "v_proj", "query", "value") if run.lora_targets == "qv" else None
        return sum(run.r * (i + o) for n, i, o in c["linears"]
                   if names is None or n.rsplit(".", 1)[-1] in names)
    if run.method == "p_tuning_v2":
        heads_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cfg.num_hidden_layers * 2 * run.virtual_tokens * heads_kv * head_dim
    raise ValueError(run.method)


def saved_per_layer(cfg: Any, length: int, qlora: bool = False) -> float:
    """Bytes autograd keeps per layer for one sequence of ``length`` tokens (bf16, eager attention); with
    ``qlora`` the linear layers are bitsandbytes NF4 layers with LoRA (r 8) on each, under bf16 autocast."""
    import transformers as tf

    d = {**cfg.to_dict(), "num_hidden_layers": 2, "vocab_size": 128}
    if "layer_types" in d and d["layer_types"]:
        d["layer_types"] = d["layer_types"][:2]
    small = type(cfg).from_dict(d)
    small._attn_implementation = "eager"
    with torch.device("meta"):
        model = tf.AutoModel.from_config(small, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")  # real storages (so saved tensors can be told apart), values irrelevant
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()  # position ids included: shapes are what counts here
            t.normal_(0, 0.02) if t.is_floating_point() and t.dim() > 1 else None
    if qlora:
        import ptune
        from ptune.methods.lora import apply_lora
        from ptune.quantize import quantize_model

        model = quantize_model(model)
        apply_lora(model, ptune.QLoraConfig(r=8))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != 0:
            storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    x = torch.randn(1, length, small.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs_embeds=x)
    return sum(storages.values()) / 2


def activation_fit(cfg: Any, qlora: bool = False) -> tuple[float, float]:
    """(a, b): bytes per token per layer = a + b x length, from two measured lengths."""
    t1, t2 = 96, 192
    s1, s2 = saved_per_layer(cfg, t1, qlora) / t1, saved_per_layer(cfg, t2, qlora) / t2
    b = (s2 - s1) / (t2 - t1)
    return s1 - b * t1, b


def predict(cfg: Any, run: Run, *, process_mb: float, tokenizer_mb: float, fit: tuple[float, float] | None = None,
            counts: dict | None = None) -> dict[str, float]:
    c = counts or count(cfg)
    c["decoder"] = is_decoder(cfg)
    a, b = fit or activation_fit(cfg, run.method == "qlora")
    L, B, T = cfg.num_hidden_layers, run.batch, run.length
    keys = T + (run.virtual_tokens if run.method == "p_tuning_v2" else 0)
    per_layer = B * T * (a + b * keys)
    if run.checkpointing:
        act = L * B * T * cfg.hidden_size * 2 + per_layer
    else:
        act = L * per_layer
    rows = B if run.head_rows == "one" else B * run.target_tokens
    head = rows * cfg.vocab_size * HEAD_BYTES_PER_LOGIT if run.head_vocab else 0
    n_train = trainable(cfg, c, run)
    mb = 2 ** 20
    parts = {"process_mb": process_mb, "tokenizer_mb": tokenizer_mb, "weights_mb": weight_bytes(c, run.weights) / mb,
             "trainable_state_mb": n_train * ADAMW_BYTES / mb, "activations_mb": act / mb, "head_mb": head / mb}
    parts = {k: round(v, 1) for k, v in parts.items()}
    parts["trainable"] = n_train
    parts["total_mb"] = round(sum(v for k, v in parts.items() if k.endswith("_mb")), 1)
    parts["device_mb"] = round(parts["total_mb"] - process_mb - tokenizer_mb, 1)  # what a GPU would hold
    return parts


# ---------------------------------------------------------------- measurements (fresh processes)

MINILM_RUNS = {
    "lora-bf16": dict(method="lora", quantize=None, checkpointing=False),
    "qlora-nf4": dict(method="qlora", quantize="nf4", checkpointing=False),
    "p_tuning_v2-bf16": dict(method="p_tuning_v2", quantize=None, checkpointing=False),
}


def measure_baseline() -> dict:
    import psutil

    rss = lambda: round(psutil.Process().memory_info().rss / 2**20, 1)  # noqa: E731
    import transformers  # noqa: F401

    import ptune

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    out = {"process_mb": rss()}
    ptune.load_tokenizer("minilm")
    out["minilm_tokenizer_mb"] = round(rss() - out["process_mb"], 1)
    base = rss()
    ptune.load_tokenizer("gemma")
    out["gemma_tokenizer_mb"] = round(rss() - base, 1)
    return out


def measure_minilm(name: str, batch: int, length: int, steps: int) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import resource

    from gemma_memory import RssSampler

    import ptune
    from ptune.batching import collate
    from ptune.data import load_builtin

    c = MINILM_RUNS[name]
    torch.manual_seed(0)
    tok = ptune.load_tokenizer("minilm")
    base = ptune.load_base("minilm", "backbone", dtype=torch.bfloat16, quantize=c["quantize"])
    task, splits = load_builtin("bbc")
    opts = {"r": 8} if "lora" in c["method"] else {"num_virtual_tokens": 16}
    if c["method"] == "p_tuning_v2":
        opts["layers"] = "all"  # every layer, as the memory model counts them
    model = ptune.apply(base, ptune.make_config(c["method"], **opts), head=ptune.HeadConfig("classification", num_labels=len(task.labels)),
                        tokenizer=tok, labels=task.labels)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    enc = ptune.TemplateEncoder(model.template, tok, max_length=length)
    rows = splits["train"][:batch]
    b = collate([enc.encode(r) for r in rows], pad_id=tok.pad_token_id, targets=[task.label_to_id[r["label"]] for r in rows])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sampler = RssSampler()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(float(loss.detach()), 4))
    return {"train_peak_rss_mb": sampler.stop(), "rss_before_training_mb": sampler.start_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses,
            "trainable": model.trainable_parameters()[0], "tokens": int(b["attention_mask"].sum()),
            "batch_size": batch, "max_length": length, "config": c}


def child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"{args} failed: {proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


# ---------------------------------------------------------------- comparison and the 7B table

def gemma_config() -> Any:
    from transformers import AutoConfig

    from ptune.gemma import gemma_path

    return AutoConfig.from_pretrained(gemma_path())


def minilm_config() -> Any:
    from transformers import AutoConfig

    from ptune.models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path("minilm"))


def llama7b_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)


def chatglm6b_shaped_config() -> Any:
    """ChatGLM-6B's shape (28 layers, hidden 4096, FFN 16384, 32 heads, vocab 130,528, untied), as a Llama-class
    config: same parameter count (6.2B; a GLU of 3 x 4096 x 10944 for its GeLU MLP of 2 x 4096 x 16384) and
    per-layer activations up to that difference."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=10944, vocab_size=130528, tie_word_embeddings=False)


GEMMA_RUNS = {  # bench/gemma_memory.py configurations -> the model's view of them
    "lora-bf16": Run("lora", "bf16", 4, 128), "lora-bf16+ckpt": Run("lora", "bf16", 4, 128, checkpointing=True),
    "qlora-nf4": Run("qlora", "nf4", 4, 128, lora_targets="all-linear"),
    "qlora-nf4+ckpt": Run("qlora", "nf4", 4, 128, checkpointing=True, lora_targets="all-linear"),
    "p_tuning_v2-bf16+ckpt": Run("p_tuning_v2", "bf16", 4, 128, checkpointing=True),
    "p_tuning_v2-nf4+ckpt": Run("p_tuning_v2", "nf4", 4, 128, checkpointing=True),
}


def compare(base: dict, minilm: dict, gemma: dict) -> list[dict]:
    rows = []
    cfg = minilm_config()
    fits = {False: activation_fit(cfg), True: activation_fit(cfg, True)}
    for name, m in minilm.items():
        c = m["config"]
        run = Run(c["method"], "nf4" if c["quantize"] else "bf16", m["batch_size"], m["max_length"],
                  head_vocab=False, lora_targets="all-linear" if c["method"] == "qlora" else "qv")
        p = predict(cfg, run, process_mb=base["process_mb"], tokenizer_mb=base["minilm_tokenizer_mb"],
                    fit=fits[run.method == "qlora"])
        rows.append({"model": "MiniLM", "config": name, "measured_mb": round(m["train_peak_rss_mb"], 1),
                     "predicted_mb": p["total_mb"], "error": round(p["total_mb"] / m["train_peak_rss_mb"] - 1, 4),
                     "trainable_measured": m["trainable"], **p})
    cfg = gemma_config()
    fits = {False: activation_fit(cfg), True: activation_fit(cfg, True)}
    for name, run in GEMMA_RUNS.items():
        if name not in gemma:
            continue
        m = gemma[name]
        # the process and tokenizer as that run measured them (bench/gemma_memory.py records both)
        process = m.get("imports_mb", base["process_mb"])
        tokenizer = m["tokenizer_mb"] - m["imports_mb"] if "tokenizer_mb" in m else base["gemma_tokenizer_mb"]
        p = predict(cfg, run, process_mb=process, tokenizer_mb=tokenizer, fit=fits[run.method == "qlora"])
        rows.append({"model": "Gemma 3 270M", "config": name, "measured_mb": round(m["train_peak_rss_mb"], 1),
                     "predicted_mb": p["total_mb"], "error": round(p["total_mb"] / m["train_peak_rss_mb"] - 1, 4),
                     "trainable_measured": m["trainable"], **p})
    return rows


def big_table(base: dict) -> list[dict]:
    out = []
    cfg = llama7b_config()
    fits = {False: activation_fit(cfg), True: activation_fit(cfg, True)}
    runs = {"LoRA-bf16 (q,v r=8)": Run("lora", "bf16", 4, 512, head_rows="targets", target_tokens=128),
            "QLoRA-nf4 (all-linear r=8)": Run("qlora", "nf4", 4, 512, lora_targets="all-linear", head_rows="targets",
                                             target_tokens=128),
            "QLoRA-nf4 + grad. ckpt": Run("qlora", "nf4", 4, 512, checkpointing=True, lora_targets="all-linear",
                                          head_rows="targets", target_tokens=128),
            "P-Tuning v2 bf16 (128 prefix)": Run("p_tuning_v2", "bf16", 4, 512, virtual_tokens=128, head_rows="targets",
                                                target_tokens=128),
            "P-Tuning v2 nf4 (128 prefix)": Run("p_tuning_v2", "nf4", 4, 512, virtual_tokens=128, head_rows="targets",
                                               target_tokens=128)}
    for name, run in runs.items():
        p = predict(cfg, run, process_mb=base["process_mb"], tokenizer_mb=base["minilm_tokenizer_mb"],
                    fit=fits[run.method == "qlora"])
        out.append({"model": "Llama-2-7B-shaped", "config": name, "batch": run.batch, "length": run.length, **p})
    # the seed's claim: ChatGLM-6B P-Tuning v2 in INT4, batch 1, 64 + 64 tokens, prefix 128 (THUDM's ptuning/ README:
    # "6.7 GB"). INT4 there quantizes the linear layers only: the 130k-word table and LM head stay fp16.
    cfg = chatglm6b_shaped_config()
    fit = activation_fit(cfg)
    c = count(cfg)
    for ckpt in (False, True):
        run = Run("p_tuning_v2", "nf4", 1, 128, checkpointing=ckpt, virtual_tokens=128, head_rows="targets",
                  target_tokens=64)
        c2 = dict(c)
        p = predict(cfg, run, process_mb=0.0, tokenizer_mb=0.0, fit=fit, counts=c2)
        # the table and head in fp16, not 4-bit as ptune would store them
        extra = (c["embedding"] + c["lm_head"]) * (2 - TABLE_NF4_BITS / 8) / 2**20
        p["weights_mb"] = round(p["weights_mb"] + extra, 1)
        p["total_mb"] = p["device_mb"] = round(p["total_mb"] + extra, 1)
        out.append({"model": "ChatGLM-6B-shaped (seed's claim)", "config": "P-Tuning v2, INT4 linears, fp16 table"
                    + (" + grad. ckpt" if ckpt else ""), "batch": 1, "length": 128, **p})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="measure the process baseline and the MiniLM peaks first")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--measured", default="bench/results/memory_model_minilm.json")
    p.add_argument("--gemma", default="bench/results/gemma_memory.json")
    p.add_argument("--out", default="bench/results/memory_model.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline:
        print("RESULT " + json.dumps(measure_baseline()), flush=True)
        return
    if args.one:
        print("RESULT " + json.dumps(measure_minilm(args.one, args.batch_size, args.max_length, args.steps)), flush=True)
        return
    if args.measure:
        measured = {"baseline": child(["--baseline"])}
        measured["minilm"] = {n: child(["--one", n, "--batch-size", str(args.batch_size), "--max-length",
                                         str(args.max_length), "--steps", str(args.steps)]) for n in MINILM_RUNS}
        with open(args.measured, "w") as f:
            json.dump(measured, f, indent=1)
    with open(args.measured) as f:
        measured = json.load(f)
    with open(args.gemma) as f:
        gemma = json.load(f)["results"]
    rows = compare(measured["baseline"], measured["minilm"], gemma)
    big = big_table(measured["baseline"])
    with open(args.out, "w") as f:
        json.dump({"command": "python bench/memory_model.py" + (" --measure" if args.measure else ""),
                   "baseline": measured["baseline"], "comparison": rows, "predictions": big}, f, indent=1)
    print("| model | configuration | measured peak MB | predicted MB | error | process + tokenizer | weights | "
          "trainable state | activations | head |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['measured_mb']:.0f} | {r['predicted_mb']:.0f} | {100 * r['error']:+.1f}% | "
              f"{r['process_mb'] + r['tokenizer_mb']:.0f} | {r['weights_mb']:.0f} | {r['trainable_state_mb']:.1f} | "
              f"{r['activations_mb']:.0f} | {r['head_mb']:.0f} |")
    print()
    print("| model | configuration | batch x length | predicted total GB (CPU process) | on a GPU (no process / "
          "tokenizer) GB | weights GB | trainable | activations GB | head GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in big:
        print(f"| {r['model']} | {r['config']} | {r['batch']} x {r['length']} | {r['total_mb'] / 1024:.2f} | "
              f"{r['device_mb'] / 1024:.2f} | {r['weights_mb'] / 1024:.2f} | {r['trainable']:,} | "
              f"{r['activations_mb'] / 1024:.2f} | {r['head_mb'] / 1024:.2f} |")


if __name__ == "__main__":
    main()
