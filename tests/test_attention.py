"""ptune's attention kernel (ptune.attention): the matmul kernel that replaces SDPA for bf16 training on a CPU.

What a user relies on: the kernel computes the same attention and the same gradients as SDPA (to bf16's
rounding: checked against a float64 reference, with SDPA's own bf16 error as the yardstick), for every
mask form the models hand it (boolean, additive, causal with none, grouped key/value heads, prefixes in
front); it is used only where it was measured to pay (CPU, bf16, gradients needed, no attention dropout),
so fp32 runs and inference are bit for bit what SDPA gives; ``--attention sdpa`` holds a model to SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import liven, tiny_base
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import ptune
import ptune.attention as attention
from ptune.attention import MatmulAttention, additive_bias, attention_forward, use_kernel
from ptune.batching import collate
from ptune.errors import ConfigError

B, H, TQ, TK, D = 3, 4, 7, 9, 8


def qkv(dtype=torch.bfloat16, heads_kv=H, tq=TQ, tk=TK, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, tq, D, generator=g)
    k = torch.randn(B, heads_kv, tk, D, generator=g)
    v = torch.randn(B, heads_kv, tk, D, generator=g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def reference(q, k, v, keep, scale):
    """float64 softmax attention; keep (bool, broadcastable to (B, H, Tq, Tk)) True = attend."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    out = torch.softmax(s, -1) @ v
    return out, (q, k, v)


def grads_of(out, inputs, g):
    out.backward(g.to(out.dtype))
    return [x.grad.double() for x in inputs]


class Attn(torch.nn.Module):
    """The attributes an attention module carries into the interface."""

    def __init__(self, groups=1, causal=False):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


def max_err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


@pytest.mark.parametrize("mask", ["none", "bool", "additive", "causal"])
def test_kernel_matches_float64_reference_as_closely_as_sdpa_does(mask):
    """Outputs and all three gradients of the matmul kernel (bf16) stay within 2x SDPA's own bf16 error of
    a float64 reference, and within bf16 tolerance in absolute terms."""
    keep = None
    if mask in ("bool", "additive"):
        keep = torch.ones(B, 1, 1, TK, dtype=torch.bool)
        keep[1, ..., -3:] = False
        keep[2, ..., :2] = False
    elif mask == "causal":
        keep = torch.ones(TQ, TK, dtype=torch.bool).tril(diagonal=TK - TQ)[None, None]
    given = keep
    if mask == "additive":
        given = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    elif mask == "causal":
        given = None
    g = torch.randn(B, H, TQ, D, generator=torch.Generator().manual_seed(1))
    scale = D ** -0.5
    ref_out, ref_in = reference(*qkv(), keep, scale)
    ref_grads = grads_of(ref_out, ref_in, g)

    q, k, v = qkv()
    module = Attn(causal=mask == "causal")
    out, _ = attention_forward(module, q, k, v, given, scaling=scale, is_causal=mask == "causal")
    assert out.shape == (B, TQ, H, D) and out.dtype == torch.bfloat16
    ours = [out.transpose(1, 2)] + grads_of(out.transpose(1, 2), (q, k, v), g)

    q2, k2, v2 = qkv()
    sdpa_mask = keep if mask in ("bool", "additive") else None
    o2 = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=sdpa_mask, is_causal=False, scale=scale) \
        if mask != "causal" else F.scaled_dot_product_attention(q2, k2, v2, attn_mask=keep, scale=scale)
    theirs = [o2] + grads_of(o2, (q2, k2, v2), g)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, [ref_out] + ref_grads):
        ea, eb = max_err(a, r), max_err(b, r)
        assert ea <= max(2 * eb, 2e-2), f"{name}: kernel error {ea:.4f} vs SDPA bf16 error {eb:.4f}"


def test_chunks_give_exactly_the_unchunked_result(monkeypatch):
    """The batch is cut into chunks (to keep the scores in cache); a chunk boundary changes nothing."""
    g = torch.randn(B, H, TQ, D)
    bias = additive_bias(torch.rand(B, 1, TQ, TK) > 0.3, False, TQ, TK, torch.device("cpu"), torch.bfloat16)
    results = []
    for chunk_bytes in (1 << 30, 1):  # one chunk; one row per chunk
        monkeypatch.setattr(attention, "CHUNK_BYTES", chunk_bytes)
        q, k, v = qkv()
        out = MatmulAttention.apply(q, k, v, bias, 0.3)
        out.backward(g.bfloat16())
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_grouped_key_value_heads_get_summed_gradients():
    """Llama/Gemma: 2 key/value heads serve 4 query heads; their gradients are the sum over the group."""
    q, k, v = qkv(heads_kv=2)
    out, _ = attention_forward(Attn(groups=2), q, k, v, None, is_causal=False)
    g = torch.randn_like(out)
    out.backward(g)
    q2, k2, v2 = qkv(heads_kv=2)
    o2, _ = sdpa_attention_forward(Attn(groups=2), q2, k2, v2, None, is_causal=False)
    o2.backward(g)
    for a, b in ((out, o2), (q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert a.shape == b.shape
        assert max_err(a, b) < 5e-2


def test_only_needed_gradients_and_no_nan_for_fully_masked_rows():
    q, k, v = qkv()
    k.requires_grad_(False)
    keep = torch.ones(B, 1, TQ, TK, dtype=torch.bool)
    keep[0, :, 2] = False  # a query row that sees nothing (left padding of a causal model)
    out, _ = attention_forward(Attn(), q, k, v, keep, is_causal=False)
    out.sum().backward()
    assert k.grad is None and q.grad is not None and v.grad is not None
    assert all(torch.isfinite(t).all() for t in (out, q.grad, v.grad))


def test_kernel_only_where_it_pays(monkeypatch):
    """fp32, no-grad inference, attention dropout and --attention sdpa all go to SDPA untouched."""
    calls = []
    real = MatmulAttention.apply
    monkeypatch.setattr(MatmulAttention, "apply", lambda *a: calls.append(1) or real(*a))

    def run(dtype=torch.bfloat16, grad=True, dropout=0.0, module=None):
        calls.clear()
        q, k, v = qkv(dtype)
        with torch.set_grad_enabled(grad):
            out, _ = attention_forward(module or Attn(), q, k, v, None, dropout=dropout, is_causal=False)
        return bool(calls), out

    assert run()[0]
    used, out = run(torch.float32)
    q, k, v = qkv(torch.float32)
    assert not used and torch.equal(out, sdpa_attention_forward(Attn(), q, k, v, None, is_causal=False)[0])
    assert not run(grad=False)[0]
    assert not run(dropout=0.1)[0]
    held = Attn()
    held.ptune_attention = "sdpa"
    assert not run(module=held)[0]


def bert_batch(tokenizer, config):
    base = liven(tiny_base("bert"))
    model = ptune.apply(base, config, head=ptune.HeadConfig("classification", num_labels=3, dropout=0.0),
                        tokenizer=tokenizer)
    enc = ptune.TemplateEncoder(model.template, tokenizer)
    texts = ["the match ended in a draw", "stir the sauce", "a late goal won the cup after extra time"]
    batch = collate([enc.encode({"text": t}) for t in texts], pad_id=tokenizer.pad_token_id, targets=[0, 1, 2])
    return model, batch


def loss_and_grads(model, batch):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return float(loss), {n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", [ptune.PTuningV2Config(num_virtual_tokens=4), ptune.LoraConfig(r=4),
                                    ptune.PromptTuningConfig(num_virtual_tokens=4)],
                         ids=["p_tuning_v2", "lora", "prompt_tuning"])
def test_bf16_training_step_matches_sdpa(tokenizer, config):
    """A bf16-autocast training step on a tiny BERT: the same loss and trainable gradients with the kernel as
    with SDPA, to bf16 tolerance; the model routes attention through ptune whatever the method."""
    model, batch = bert_batch(tokenizer, config)
    model.train()
    assert model.base.config._attn_implementation == "ptune_sdpa"
    loss_k, grads_k = loss_and_grads(model, batch)
    use_kernel(model.base, "sdpa")
    loss_s, grads_s = loss_and_grads(model, batch)
    assert abs(loss_k - loss_s) < 2e-2 * max(1.0, abs(loss_s))
    for name, g in grads_s.items():
        scale = float(g.abs().max()) or 1.0
        assert max_err(grads_k[name], g) / scale < 6e-2, name


def test_fp32_forward_is_exactly_sdpa(tokenizer):
    """Routing a base through ptune's attention changes nothing in fp32 (every parity test relies on it)."""
    model, batch = bert_batch(tokenizer, ptune.LoraConfig(r=4))
    with torch.no_grad():
        routed = model(**batch).logits
    model.base.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(**batch).logits
    assert torch.equal(routed, plain)


def test_attention_option_is_checked():
    with pytest.raises(ConfigError, match="attention='flash'.*auto or sdpa"):
        ptune.engine.TrainConfig(attention="flash")
    with pytest.raises(ConfigError, match="auto, sdpa"):
        use_kernel(torch.nn.Linear(1, 1), "flash")


def test_training_keeps_freed_memory_on_glibc():
    """The Trainer's malloc settings take effect on glibc Linux (elsewhere they are skipped, not an error)."""
    import platform

    from ptune.engine.memory import keep_freed_memory

    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_training_log_names_the_kernel_only_where_it_trains(tokenizer):
    from ptune.attention import training_note

    model, _ = bert_batch(tokenizer, ptune.LoraConfig(r=4))
    assert "matmul kernel" in training_note(model.base, "bf16", "cpu")
    assert training_note(model.base, "no", "cpu") == "" and training_note(model.base, "bf16", "cuda") == ""
    use_kernel(model.base, "sdpa")
    assert training_note(model.base, "bf16", "cpu") == ""
