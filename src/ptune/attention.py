"""The attention kernel of ptune's models: SDPA, except where SDPA's backward is measured slow.

On a CPU, PyTorch's SDPA (its flash kernel for CPU) runs the forward pass of bf16 attention well, but its
backward in bf16 is slow: 70.6-82.0 ms against 10.2-12.2 ms for :class:`MatmulAttention` at MiniLM's shapes
(32 x 12 heads x 128 queries x 128-148 keys x 32) on an AMD EPYC with AVX512-BF16, and 2.3-2.8x SDPA's own
fp32 backward (``python bench/attention.py``). In a frozen-base training step that backward took 40% of the
time while the linear layers ran at the matmul roof. So when a bf16 step on a CPU needs attention
gradients, :func:`attention_forward` runs :class:`MatmulAttention` instead:

- forward: ``S = scale Q K^T + bias`` in one ``baddbmm`` (fp32 accumulation inside, bf16 out), softmax in
  place (fp32 inside, bf16 out), ``O = P V`` with the bf16 ``P`` (what eager attention under autocast
  computes: its error, about 1.5x SDPA's);
- backward, from the saved bf16 ``P``: ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dP * P))``
  by softmax's own fused backward, ``dQ = scale dS K``, ``dK = scale dS^T Q``; no attention dropout (the
  path is not taken with it);
- both in chunks of the batch sized so a chunk's scores stay within about 2 MB (cache-resident), which
  measured faster than one pass over the whole batch.

Everywhere else (fp32, GPUs, inference, attention dropout, soft-capping, sinks, T5's position bias) it is
transformers' own ``sdpa_attention_forward``, so fp32 results (and every parity test) are unchanged.
:func:`route_attention` points a base at ptune's registered attention function (``ATTN_IMPL``, registered by
:mod:`ptune.methods.prefix_tuning`, which adds deep prompts where a method has them); a model can be held
to SDPA with :func:`use_kernel` (``--attention sdpa``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

ATTN_IMPL = "ptune_sdpa"  # the attention-interface name of ptune's attention function
KERNELS = ("auto", "sdpa")
CHUNK_BYTES = 2 << 20  # bf16 scores per chunk of the batch (1-4 MB measured alike, 8 MB slower)


class MatmulAttention(torch.autograd.Function):
    """softmax(scale Q K^T + bias) V for q (B, H, Tq, D), k/v (B, H, Tk, D) in bf16; bias additive in q's
    dtype, broadcastable to (B, H, Tq, Tk), or None. Returns (B, H, Tq, Dv)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        B, H, Tq, _ = q.shape
        Tk = k.shape[-2]
        step = max(1, CHUNK_BYTES // max(1, H * Tq * Tk * q.element_size()))
        out = q.new_empty(B, H, Tq, v.shape[-1])
        probs = q.new_empty(B, H, Tq, Tk)
        for i in range(0, B, step):
            rows = slice(i, i + step)
            qs, ks = q[rows].flatten(0, 1), k[rows].flatten(0, 1).transpose(-1, -2)
            s = probs[rows].view(-1, Tq, Tk)
            if bias is None:
                torch.bmm(qs, ks, out=s).mul_(scale)
            else:  # scale Q K^T + bias in one pass: baddbmm(bias, Q, K^T, alpha=scale)
                b = (bias[rows] if bias.shape[0] > 1 else bias).expand(s.shape[0] // H, H, Tq, Tk)
                torch.baddbmm(b.reshape(-1, Tq, Tk), qs, ks, alpha=scale, out=s)
            torch.softmax(s, dim=-1, out=s)  # fp32 inside the kernel, bf16 out
            torch.bmm(s, v[rows].flatten(0, 1), out=out[rows].view(-1, Tq, v.shape[-1]))
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.step = scale, step
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(q.dtype)
        dq = torch.empty_like(q) if need_q else None
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        for i in range(0, q.shape[0], ctx.step):
            rows = slice(i, i + ctx.step)
            p, do = probs[rows], grad_out[rows]
            if need_v:
                torch.matmul(p.transpose(-1, -2), do, out=dv[rows])
            if not (need_q or need_k):
                continue
            dp = torch.matmul(do, v[rows].transpose(-1, -2))
            # dS = P * (dP - rowsum(dP * P)): softmax's own fused backward (fp32 inside, bf16 out)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            if need_q:
                torch.matmul(ds, k[rows], out=dq[rows]).mul_(ctx.scale)
            if need_k:
                torch.matmul(ds.transpose(-1, -2), q[rows], out=dk[rows]).mul_(ctx.scale)
        return dq, dk, dv, None, None


def route_attention(base: nn.Module) -> None:
    """Run a base that uses transformers' SDPA through ptune's attention function, whatever the method: the
    same results as SDPA, with the faster kernel where one was measured. Bases on another implementation
    (eager, flex, flash) or outside the attention interface keep their own; T5 has its own prefix attention
    (:mod:`ptune.methods.prefix_seq2seq`)."""
    from .models import backbone_of

    if getattr(base.config, "is_encoder_decoder", False) or getattr(base.config, "_attn_implementation", None) != "sdpa":
        return
    if getattr(type(backbone_of(base)), "_supports_attention_backend", False):
        base.set_attn_implementation(ATTN_IMPL)


def routed(base: nn.Module) -> bool:
    """Whether ``base`` runs its attention through :func:`attention_forward`."""
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == ATTN_IMPL


def training_note(base: nn.Module, precision: str, device_type: str) -> str:
    """For the training log: that ptune's kernel trains this base (a bf16 run on a CPU, not held to SDPA)."""
    if precision != "bf16" or device_type != "cpu" or not routed(base):
        return ""
    if any(getattr(m, "ptune_attention", "auto") == "sdpa" for m in base.modules()):
        return ""
    return (" (attention: ptune's matmul kernel while training, SDPA's bf16 backward is slow on CPUs; "
            "--attention sdpa to keep SDPA)")


def use_kernel(model: nn.Module, kernel: str) -> None:
    """``auto`` (the matmul kernel where it pays, see the module doc) or ``sdpa`` (always SDPA) for every
    attention module of ``model``."""
    if kernel not in KERNELS:
        from .errors import ConfigError

        raise ConfigError(f"attention={kernel!r}: give one of {', '.join(KERNELS)}")
    from .methods.targets import ATTENTION_CLASS

    for m in model.modules():
        if ATTENTION_CLASS.search(type(m).__name__):
            m.ptune_attention = kernel


def matmul_path(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                position_bias: Any, kwargs: dict) -> bool:
    """Whether :class:`MatmulAttention` computes this call (a CPU bf16 call that needs gradients)."""
    return (getattr(module, "ptune_attention", "auto") == "auto" and query.device.type == "cpu"
            and query.dtype == torch.bfloat16 and key.dtype == value.dtype == torch.bfloat16
            and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
            and not dropout and position_bias is None and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None and not kwargs.get("output_attentions", False))


def additive_bias(attention_mask: torch.Tensor | None, causal: bool, Tq: int, Tk: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """An additive bias in ``dtype`` from a boolean (True = attend) or additive mask, or from causality alone."""
    low = torch.finfo(dtype).min
    if attention_mask is None:
        if not causal:
            return None
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)[None, None]
        return torch.zeros(keep.shape, device=device, dtype=dtype).masked_fill_(~keep, low)
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, device=device, dtype=dtype).masked_fill_(~attention_mask.to(device), low)
    return attention_mask.to(device, torch.float32).clamp(low, torch.finfo(dtype).max).to(dtype)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias: torch.Tensor | None = None, **kwargs: Any):
    """transformers' attention-interface signature: (B, H, Tq, D) in, ((B, Tq, H, Dv), None) out."""
    if not matmul_path(module, query, key, value, dropout, position_bias, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    Tq, Tk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    bias = additive_bias(attention_mask, bool(causal) and Tq > 1, Tq, Tk, query.device, query.dtype)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = MatmulAttention.apply(query, key, value, bias, float(scale))
    return out.transpose(1, 2).contiguous(), None
