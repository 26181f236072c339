"""A quantized token-embedding table shared by the input embedding and the (tied) LM head.

bitsandbytes quantizes a base's linear layers, but transformers leaves the token embedding and the LM
head in full precision. On a small-vocabulary-heavy model that is most of the model: Gemma 3 270M holds
168M of its 268M parameters in its 262,144 x 640 table (336 MB in bf16), which the LM head reuses
(tied). :func:`quantize_embeddings` replaces that table by a :class:`QuantizedTable` and the two modules
that read it by:

- :class:`QuantizedEmbedding`: the lookup dequantizes only the gathered rows (times the embedding's
  own scale, e.g. Gemma's sqrt(d));
- :class:`QuantizedLMHead`: logits ``h @ W.T`` computed in vocabulary chunks of ``CHUNK_ROWS`` rows,
  each chunk dequantized on the fly and dropped, in a custom autograd function whose backward
  dequantizes the chunks again for ``dL/dh`` (so autograd never holds a dequantized table). It is
  called on whatever hidden states the head passes: ptune's causal-LM head passes only the scored
  positions (:mod:`ptune.frozen`), a verbalizer only its label slot, ``generate()`` the last position.

Storage (``kind``):

- ``nf4``: each row cut into blocks of ``BLOCK`` = 64 weights (a row whose width is not a multiple of
  64 is padded with zeros), each weight the nearest of the 16 NF4 code values (QLoRA's code book,
  :data:`ptune.quantize.NF4_CODE`) times its block's absmax, two codes per byte, the absmax in fp32:
  4 + 32/64 = 4.5 bits per weight (no double quantization: the constants are 1/9 of the table and
  keeping them exact keeps the lookup a gather and a multiply). Error per weight at most half the
  widest gap between code values times the absmax (0.152 x absmax, between -1 and -0.696).
- ``int8``: each row as int8 times its absmax / 127 (LLM.int8()'s row-wise absmax scheme, no
  outliers): 8 + 32/d bits per weight, error at most absmax / 254.

Dequantization is plain torch (a 16-entry table lookup and a multiply), not bitsandbytes' kernel, so
it behaves the same on every CPU and GPU. Nothing in full precision is kept: ``weight`` (read by prompt
tuning's initialisation) is dequantized on each access and should be read once.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

BLOCK = 64
CHUNK_ROWS = 8192  # vocabulary rows dequantized at a time by the LM head (8192 x 640 fp32: 21 MB)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)  # = ptune.quantize.NF4_CODE (checked in tests)
KINDS = ("nf4", "int8")


class QuantizedTable(nn.Module):
    """A (V, d) table stored as NF4 blocks or int8 rows (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, kind: str = "nf4", chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        V, d = weight.shape
        self.kind, self.num_embeddings, self.embedding_dim = kind, V, d
        self.dtype = weight.dtype  # what the full-precision table was: lookups return it
        self.chunk_rows = chunk_rows
        self.padded = -(-d // BLOCK) * BLOCK if kind == "nf4" else d
        codes = torch.empty(V, self.padded // 2 if kind == "nf4" else d,
                            dtype=torch.uint8 if kind == "nf4" else torch.int8, device=weight.device)
        scales = torch.empty(V, self.padded // BLOCK if kind == "nf4" else 1, dtype=torch.float32, device=weight.device)
        with torch.no_grad():
            for s in range(0, V, chunk_rows):  # a chunk at a time: never an fp32 copy of the whole table
                codes[s:s + chunk_rows], scales[s:s + chunk_rows] = self._quantize(weight[s:s + chunk_rows].float())
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("code_book", torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device),
                             persistent=False)

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "int8":
            absmax = w.abs().amax(1, keepdim=True)
            scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            return torch.round(w / scale * 127).clamp(-127, 127).to(torch.int8), absmax
        n, d = w.shape
        if self.padded != d:
            w = torch.nn.functional.pad(w, (0, self.padded - d))
        blocks = w.view(n, -1, BLOCK)
        absmax = blocks.abs().amax(-1)  # (n, blocks)
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        book = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
        idx = torch.bucketize((blocks / scale[..., None]).contiguous(), (book[1:] + book[:-1]) / 2)  # nearest code
        idx = idx.view(n, -1, 2).to(torch.uint8)
        return (idx[..., 0] << 4) | idx[..., 1], absmax

    def dequantize_rows(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows (..., d) from their codes and scales, in ``dtype`` (default: the original table's)."""
        dtype = dtype or self.dtype
        if self.kind == "int8":
            return (codes.float() * (scales / 127)).to(dtype)
        lead = codes.shape[:-1]
        F = _bnb_functional()
        if F is not None and codes.numel():  # bitsandbytes' kernel: the same layout (high nibble first), ~10x faster
            state = F.QuantState(absmax=scales.reshape(-1).contiguous(), shape=torch.Size((codes.numel() * 2,)),
                                 code=self.code_book, blocksize=BLOCK, quant_type="nf4", dtype=dtype)
            w = F.dequantize_4bit(codes.reshape(-1, 1).contiguous(), state)
        else:  # plain torch: each byte -> its two code values, times the block's absmax
            pairs = torch.nn.functional.embedding(codes.reshape(-1, codes.shape[-1]).int(), self._byte_pairs())
            w = (pairs.view(-1, BLOCK) * scales.reshape(-1, 1)).to(dtype)
        return w.view(*lead, self.padded)[..., :self.embedding_dim]

    def _byte_pairs(self) -> torch.Tensor:
        book = self.code_book.float()
        return torch.stack([book.repeat_interleave(16), book.repeat(16)], 1)  # byte b -> (code[b >> 4], code[b & 15])

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized rows of ``ids`` (any shape) -> (*ids.shape, d): only they are dequantized."""
        return self.dequantize_rows(self.codes[ids], self.scales[ids], dtype)

    def chunk(self, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.dequantize_rows(self.codes[start:end], self.scales[start:end], dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole (V, d) table (tests, prompt initialisation): a full-precision copy, so read it once."""
        dtype = dtype or self.dtype
        out = torch.empty(self.num_embeddings, self.embedding_dim, dtype=dtype, device=self.codes.device)
        for s in range(0, self.num_embeddings, self.chunk_rows):
            out[s:s + self.chunk_rows] = self.chunk(s, s + self.chunk_rows, dtype)
        return out

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.num_embeddings * self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, kind={self.kind}, "
                f"{self.bits_per_weight():.3f} bits/weight, {self.nbytes() / 2**20:.1f} MB")


_BNB: list = []


def _bnb_functional() -> Any:
    """bitsandbytes.functional where it imports (its NF4 dequantization kernel), else None."""
    if not _BNB:
        try:
            import bitsandbytes.functional as F

            _BNB.append(F)
        except Exception:  # noqa: BLE001 - absent, or no kernel for this machine: the torch path
            _BNB.append(None)
    return _BNB[0]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


class _ChunkedLMHead(torch.autograd.Function):
    """``h @ W.T`` over vocabulary chunks, W dequantized chunk by chunk in forward and again in backward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, table: QuantizedTable, dtype: torch.dtype) -> torch.Tensor:
        ctx.table, ctx.dtype, ctx.in_dtype = table, dtype, h.dtype
        x = h.to(dtype)
        out = torch.empty(*h.shape[:-1], table.num_embeddings, dtype=dtype, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, table.num_embeddings, table.chunk_rows):
                w = table.chunk(s, s + table.chunk_rows, dtype)
                out[..., s:s + w.shape[0]] = x @ w.T
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        table = ctx.table
        g = grad.to(ctx.dtype)
        gh = torch.zeros(*grad.shape[:-1], table.embedding_dim, dtype=torch.float32, device=grad.device)
        used = (g.reshape(-1, g.shape[-1]) != 0).any(0).nonzero().squeeze(1)
        with torch.autocast(grad.device.type, enabled=False):
            if used.numel() <= table.num_embeddings // 4:
                # a few vocabulary columns carry gradient (a verbalizer's label words): only their rows (exact)
                return (g[..., used] @ table.rows(used, ctx.dtype)).to(ctx.in_dtype), None, None
            for s in range(0, table.num_embeddings, table.chunk_rows):
                w = table.chunk(s, s + table.chunk_rows, ctx.dtype)
                gh += (g[..., s:s + w.shape[0]] @ w).float()
        return gh.to(ctx.in_dtype), None, None


class _TableWeight(nn.Module):
    """``state_dict`` gives the module's ``weight`` dequantized (in the original dtype) under its usual name, so
    code that reads a base's state dict (merged exports) sees a plain model; loading a ``weight`` re-quantizes."""

    table: QuantizedTable

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.table.dequantize()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is not None:
            t = self.table
            with torch.no_grad():
                for s in range(0, t.num_embeddings, t.chunk_rows):
                    t.codes[s:s + t.chunk_rows], t.scales[s:s + t.chunk_rows] = t._quantize(
                        weight[s:s + t.chunk_rows].float())
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k != prefix + "weight"}, prefix,
                                      local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class QuantizedEmbedding(_TableWeight):
    """Token lookup from a :class:`QuantizedTable` (dequantizing the gathered rows only), times ``embed_scale``
    where the replaced embedding had one (Gemma), in the replaced table's dtype."""

    def __init__(self, table: QuantizedTable, padding_idx: int | None = None, embed_scale: Any = None) -> None:
        super().__init__()
        self.table = table
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim
        if embed_scale is not None:
            self.register_buffer("embed_scale", torch.as_tensor(embed_scale).detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (V, d) table, built on each access (prompt initialisation reads rows of it)."""
        return self.table.dequantize()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.table.rows(input_ids)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype)  # as Gemma3TextScaledWordEmbedding rounds it
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scaled={self.embed_scale is not None}"


class QuantizedLMHead(_TableWeight):
    """Vocabulary logits ``h @ W.T`` from a :class:`QuantizedTable` (no bias), computed in vocabulary chunks
    for exactly the hidden states passed in; in the autocast dtype under autocast, else in ``h``'s dtype."""

    def __init__(self, table: QuantizedTable) -> None:
        super().__init__()
        self.table = table
        self.in_features, self.out_features = table.embedding_dim, table.num_embeddings
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        return self.table.dequantize()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _ChunkedLMHead.apply(h, self.table, _compute_dtype(h))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, chunk_rows={self.table.chunk_rows}"


def _shares_table(head: nn.Module, embedding: nn.Module) -> bool:
    return (type(head) is nn.Linear and head.bias is None and isinstance(getattr(embedding, "weight", None), torch.Tensor)
            and head.weight.data_ptr() == embedding.weight.data_ptr() and head.weight.shape == embedding.weight.shape)


def tied_table(model: nn.Module) -> bool:
    """Whether the model's LM head is a plain bias-free ``nn.Linear`` sharing the token embedding's weight."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(emb, nn.Embedding) and head is not None and _shares_table(head, emb)


def quantize_embeddings(model: nn.Module, kind: str = "nf4", *, chunk_rows: int = CHUNK_ROWS) -> dict[str, Any]:
    """Replace a decoder's token embedding, and its LM head when that is a plain bias-free ``nn.Linear``, by
    quantized modules: one shared :class:`QuantizedTable` when the head is tied to the embedding, two
    tables when it is not. The full-precision table(s) are dropped. Returns what was done (empty when the
    model has no plain ``nn.Embedding``-like input table)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or isinstance(emb, QuantizedEmbedding) or not isinstance(getattr(emb, "weight", None), torch.Tensor) \
            or emb.weight.dim() != 2 or not isinstance(emb, nn.Embedding):
        return {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and _shares_table(head, emb)
    weight = emb.weight
    fp_sample = weight_sample(weight)  # for models.fingerprint: the sample of the table as loaded
    table = QuantizedTable(weight.detach(), kind, chunk_rows)
    table.fingerprint_sample = fp_sample
    q_emb = QuantizedEmbedding(table, getattr(emb, "padding_idx", None), getattr(emb, "embed_scale", None))
    model.set_input_embeddings(q_emb)
    info: dict[str, Any] = {"kind": kind, "embedding": tuple(weight.shape), "tied": tied,
                            "table_mb": round(table.nbytes() / 2**20, 1),
                            "replaced_mb": round(weight.numel() * weight.element_size() / 2**20, 1)}
    del weight, emb
    if head is not None and type(head) is nn.Linear and head.bias is None and \
            head.weight.shape == (table.num_embeddings, table.embedding_dim):
        head_table = table if tied else QuantizedTable(head.weight.detach(), kind, chunk_rows)
        model.set_output_embeddings(QuantizedLMHead(head_table))
        if not tied:
            info["head_table_mb"] = round(head_table.nbytes() / 2**20, 1)
        info["lm_head"] = True
        del head
    release_memory()
    return info


def weight_sample(p: torch.Tensor) -> torch.Tensor:
    """The strided sample of a weight that :func:`ptune.models.fingerprint` hashes (fp32, at most 4096 values)."""
    flat = p.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().clone()


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc ``malloc_trim``)."""
    gc.collect()
    try:
        import ctypes
        import ctypes.util

        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
