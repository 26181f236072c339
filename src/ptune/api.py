"""The Python API: put a method on a base model, save it, load it back.

    base = ptune.load_base("minilm")
    tok = ptune.load_tokenizer("minilm")
    model = ptune.apply(base, ptune.PTuningV2Config(num_virtual_tokens=16),
                        head=ptune.HeadConfig("classification", num_labels=5), tokenizer=tok)
    print(model.describe())          # trainable parameters and their share
    ptune.save_adapter(model, "out/adapter")
    model = ptune.load_adapter("out/adapter")  # loads the base named in the adapter, checks it

Adapters are a JSON config plus a safetensors file of the trainable tensors (adapter, head). The
base model's fingerprint is stored and checked on load. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import AdapterMismatchError, ConfigError, PtuneError
from .heads import Head, HeadConfig, collision_message, first_token_collisions, label_word_ids
from .methods import make_config, method_entry
from .model import PtuneModel
from .models import arch_facts, backbone_of, describe, fingerprint, load_base, load_tokenizer
from .templates import Template

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def default_template(head: HeadConfig) -> str:
    return "{text} {mask}" if head.kind == "verbalizer" else "{text}"


def apply(base: nn.Module, config: Any, *, head: HeadConfig | None = None, template: str | None = None,
          tokenizer: Any = None, labels: Sequence[str] = (), label_words: Sequence[str] | None = None
          ) -> PtuneModel:
    """Freeze ``base``, attach the method in ``config`` and a head; returns the trainable model.

    ``template``: the task template (``{text}`` by default); prompt methods add their virtual tokens
    to it (prompt tuning prepends ``[P:n]``; P-Tuning may bring its own). ``label_words``: the words
    a verbalizer scores, in label order (default: the labels themselves).
    """
    head = head or HeadConfig("classification", num_labels=len(labels) or 2)
    words = list(label_words) if label_words else list(labels)
    causal = not arch_facts(base).is_encoder
    if head.kind == "verbalizer" and not head.label_word_ids:
        if tokenizer is None or not words:
            raise ConfigError("a verbalizer head needs a tokenizer and label words")
        ids = label_word_ids(tokenizer, words, causal)
        groups = first_token_collisions(words, ids)
        if groups:
            raise ConfigError(collision_message(groups))
        head = dataclasses.replace(head, label_word_ids=ids)
    task_template = Template.parse(template or default_template(head))
    resolved = config.template_for(task_template)
    if head.kind == "verbalizer" and not resolved.has_mask:
        raise ConfigError(f"a verbalizer head needs a {{mask}} label slot in the template {resolved.source!r}")
    for p in base.parameters():
        p.requires_grad_(False)
    fp = fingerprint(base)  # before the method wraps any layer
    _, apply_fn = method_entry(config.method)
    adapter = apply_fn(base, config, template=resolved, tokenizer=tokenizer, label_words=words or None)
    facts = arch_facts(base)
    module = Head(head, base, facts.hidden_size, facts.is_encoder)
    model = PtuneModel(base, adapter, module, method_config=config, head_config=head, template=resolved,
                       fingerprint=fp, labels=tuple(labels), label_words=tuple(words))
    model.base_dropout = bool(getattr(adapter, "trains_base", False))
    return model


def base_kind(head: HeadConfig, is_encoder: bool) -> str:
    if not head.needs_lm:
        return "backbone"
    return "masked_lm" if is_encoder and head.kind == "verbalizer" else "causal_lm"


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def adapter_config(model: PtuneModel) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "ptune_version": __version__,
        "method": model.method,
        "method_config": dataclasses.asdict(model.method_config),
        "head": dataclasses.asdict(model.head_config),
        "template": model.template.source,
        "labels": list(model.labels),
        "label_words": list(model.label_words),
        "base_model": model.fingerprint,
    }


def save_adapter(model: PtuneModel, path: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (trainable tensors only)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    _atomic_write(path / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(adapter_config(model), indent=2)
    _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(text))
    return path


def read_adapter_config(path: str | Path) -> dict:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise PtuneError(f"{path} holds no ptune adapter ({CONFIG_NAME} missing); pass the folder save_adapter wrote")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtuneError(f"{cfg_path} is not valid JSON ({e}); the adapter is damaged") from e
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PtuneError(f"{cfg_path} has format_version {version!r}, newer than this ptune reads "
                         f"({FORMAT_VERSION}); upgrade ptune")
    return cfg


def check_fingerprint(saved: dict, base: nn.Module) -> None:
    actual = fingerprint(base)
    keys = [k for k in saved if k != "name"]
    diff = [k for k in keys if saved.get(k) != actual.get(k)]
    if diff:
        raise AdapterMismatchError(
            f"adapter was trained on {describe(saved)} but the base is {describe(actual)} "
            f"(differs in {', '.join(diff)}); load it onto the model it was trained on")


def load_adapter(path: str | Path, base: nn.Module | None = None, *, tokenizer: Any = None,
                 base_name: str | None = None) -> PtuneModel:
    """Rebuild a saved adapter on ``base`` (default: the base named in the adapter) and check it fits."""
    cfg = read_adapter_config(path)
    saved_fp = cfg["base_model"]
    head = HeadConfig(**{**cfg["head"], "label_word_ids": tuple(cfg["head"]["label_word_ids"])})
    name = base_name or saved_fp.get("name")
    if base is None:
        base = load_base(name, base_kind(head, saved_fp.get("is_encoder", True)))
    check_fingerprint(saved_fp, base)
    if tokenizer is None and name:
        tokenizer = load_tokenizer(name)
    config = make_config(cfg["method"], **cfg["method_config"])
    model = apply(base, config, head=head, template=cfg["template"], tokenizer=tokenizer,
                  labels=cfg.get("labels", ()), label_words=cfg.get("label_words") or None)
    model.template = Template.parse(cfg["template"])
    load_trainable(model, load_file(str(Path(path) / WEIGHTS_NAME)), str(path))
    return model


def load_trainable(model: PtuneModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = set(model.trainable_state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise AdapterMismatchError(
            f"{source} does not fit this {model.method} adapter: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if params[k].shape != v.shape:
                raise AdapterMismatchError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects "
                                           f"{tuple(params[k].shape)}; the adapter was made with other settings")
            params[k].copy_(v)
    after_load = getattr(model.adapter, "after_load", None)  # adapters with state derived from tensors
    if after_load is not None:
        after_load()


def export_peft(model: PtuneModel, path: str | Path) -> Path:
    """Write the adapter in HF PEFT's layout (``PeftModel.from_pretrained`` reads it).

    Prompt methods export their (encoded) prompt for task 0; the task head is not part of PEFT's
    layout and is written beside it as ``ptune_head.safetensors``. Deep prompts: PEFT feeds prefixes
    as a KV cache, so its real tokens sit at positions P..P+T-1 where ptune keeps 0..T-1; the
    exported prefixes are the same tensors, but PEFT's outputs differ from ptune's by that shift.
    """
    export = getattr(model.adapter, "peft_export", None)
    if export is None:
        raise ConfigError(f"{model.method} has no HF PEFT equivalent to export to")
    facts = arch_facts(model.base)
    extra, tensors = export(facts)
    task_type = {"causal_lm": "CAUSAL_LM", "verbalizer": "CAUSAL_LM" if not facts.is_encoder else None,
                 "classification": "SEQ_CLS", "tagging": "TOKEN_CLS"}[model.head_config.kind]
    cfg = {"base_model_name_or_path": model.fingerprint.get("name"), "task_type": task_type,
           "inference_mode": True, "revision": None, **extra}
    if extra["peft_type"] in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):  # they describe the model they prompt
        cfg.update(num_transformer_submodules=1, token_dim=facts.hidden_size,
                   num_attention_heads=facts.num_attention_heads, num_layers=facts.num_layers)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    head = {k: v.contiguous() for k, v in model.head.state_dict().items()}
    if head:
        save_file(head, str(path / "ptune_head.safetensors"))
    return path


__all__ = ["apply", "save_adapter", "load_adapter", "export_peft", "read_adapter_config", "backbone_of"]
