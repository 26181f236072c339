"""The PEFT export (``format="peft"``): a method's PEFT config and tensors (``PeftExportable``) placed
for the client model, with ``base_model_name_or_path`` resolved to where the client finds the base,
LoRA / AdaLoRA layers rerooted under the client's body prefix (``bert.`` in
``BertForSequenceClassification``), and the head under ``modules_to_save`` where it maps. For prompt
methods the layout gap is measured: ptune's model run on PEFT's layout (prompts before every token;
prefixes as a KV cache, shifting the real tokens' positions) against ptune's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..adapter_io import CONFIG_NAME, WEIGHTS_NAME
from ..errors import ConfigError, PtuneError
from ..methods.base import PeftExportable
from ..model import PtuneModel
from ..models import arch_facts, resolve_model_path
from .client_head import _client_head, _ClientHead, _head_use, _lm_notes
from .common import HEAD_NAME, ExportResult, _batch, _gap, _probe_examples, _reordered, _scale_tol, _Source

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
_LAYOUT_FIX = ("; train with --prompt-layout peft (prompt_layout='peft': the virtual tokens before the tokenizer's "
               "start tokens, as PEFT puts them), and --pooling pooler on BERT-family bases, for an export PEFT "
               "reproduces exactly")


def _base_path(model: PtuneModel) -> str:
    """Where the client finds the base: the absolute local folder (demo names resolved), or the hub id."""
    name = model.spec.base.name
    try:
        path = resolve_model_path(name)
    except PtuneError:
        return name
    return str(Path(path).resolve()) if path and os.path.isdir(path) else path


def _export_peft(source: _Source, tmp: Path, output: Path) -> ExportResult:
    model = source.model
    if not isinstance(model.adapter, PeftExportable):
        merged = " (use --format merged: it merges this method's weights into a plain transformers model)" \
            if model.adapter.trains_base else ""
        raise ConfigError(f"{model.method} has no HF PEFT equivalent to export to{merged}")
    facts = arch_facts(model.base)
    extra, tensors = model.adapter.peft_export(facts)
    peft_type = extra["peft_type"]
    prompt_learning = peft_type in PROMPT_TYPES
    client = _client_head(source, _backbone_state(model))
    differences: list[str] = []
    notes: list[str] = []
    base_path = _base_path(model)
    cfg: dict[str, Any] = {"base_model_name_or_path": base_path, "revision": None, "inference_mode": True,
                           **extra, "task_type": client.task_type}
    if prompt_learning:  # they describe the model they prompt
        cfg.update(num_transformer_submodules=1, token_dim=facts.hidden_size,
                   num_attention_heads=facts.num_attention_heads, num_layers=facts.num_layers)
    else:
        tensors, cfg = _reroot(tensors, cfg, client)
    if client.head_module is not None:
        cfg["modules_to_save"] = [client.head_module]
        where = "base_model." if prompt_learning else "base_model.model."
        tensors.update({where + k: v for k, v in client.head_tensors.items()})
    elif client.reason:
        differences.append(f"head: {client.reason}; PEFT gets the transformer body only (task type "
                           f"FEATURE_EXTRACTION), and ptune's head is in {HEAD_NAME} for you to apply to its "
                           f"hidden states{_head_use(model)}")
    head_state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
    if client.head_module is None and head_state:
        save_file(head_state, str(tmp / HEAD_NAME))
    tables = getattr(model.method_config, "num_tasks", 1)
    ensemble = getattr(model.spec, "ensemble", 1)
    if prompt_learning and (tables > 1 or ensemble > 1):
        what = f"a prompt ensemble of {ensemble}" if ensemble > 1 else f"{tables} prompt tables"
        differences.append(f"{what}: PEFT's layout holds one prompt, so only table 0 is exported (the measured "
                           "difference below does not include this)")
    max_diff = None
    if prompt_learning:
        max_diff, layout = _layout_gap(source, peft_type)
        differences += layout
    if model.spec.base.quantize:
        notes.append(f"the base was trained loaded with quantize={model.spec.base.quantize!r}: load it the same "
                     "way for PEFT (BitsAndBytesConfig, see ptune.quantize.bnb_config; compute dtype bfloat16, or "
                     "float32 where ptune computed in fp32: --precision fp32, or auto on a CPU without bf16 "
                     "arithmetic); on a CPU with AVX512-BF16, "
                     "bitsandbytes repacks NF4 weights for inference with their block constants rounded to bf16 "
                     "(logits differ by about 1e-3): ptune.quantize.hold_quantized_weights(base) keeps them as ptune "
                     "computes them")
    if not os.path.isdir(base_path):
        notes.append(f"base_model_name_or_path {base_path!r} is not a local folder: PEFT looks it up on the hub")
    notes += _lm_notes(model)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    labels = f", num_labels={model.head_config.num_labels}" if client.head_module else ""
    how = (f"PeftModel.from_pretrained(transformers.{client.auto_class}.from_pretrained({base_path!r}{labels}), "
           f"{str(output)!r})")
    return ExportResult(output, "peft", how, not differences, differences, max_diff, notes, client.auto_class)


def _backbone_state(model: PtuneModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.backbone.state_dict().items()}


def _reroot(tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
            client: _ClientHead) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """LoRA / AdaLoRA tensors and targets, named for the client model (its body may sit under ``bert.``)."""
    lead = "base_model.model."
    prefix = client.body_prefix
    names = sorted({k[len(lead):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(lead) and ".lora_" in k})
    full = [prefix + n for n in names]
    missing = [n for n in full if n not in client.module_names]
    if missing:
        raise PtuneError(f"the exported layers {missing[:3]} do not exist in {client.class_name}; export "
                         "cannot place this adapter")
    if prefix:
        tensors = {(lead + prefix + k[len(lead):] if k.startswith(lead) else k): v for k, v in tensors.items()}
        if cfg.get("rank_pattern"):
            cfg["rank_pattern"] = {prefix + k: v for k, v in cfg["rank_pattern"].items()}
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # suffixes: they must select exactly these layers in the client too
        hits = {n for n in client.module_names if any(n == s or n.endswith("." + s) for s in targets)}
        if hits != set(full):
            targets = None
    if not isinstance(targets, list):
        import re

        targets = "(" + "|".join(re.escape(n) for n in full) + ")"
    return tensors, {**cfg, "target_modules": targets}


def _layout_gap(source: _Source, peft_type: str) -> tuple[float | None, list[str]]:
    """Where PEFT's layout differs from ptune's, and by how much the logits move (ptune's model run on
    PEFT's layout: prompts before every token; prefixes with the real tokens at positions P..P+T-1)."""
    model = source.model
    examples = _probe_examples(source)
    if peft_type == "PREFIX_TUNING":
        P = model.method_config.num_virtual_tokens
        start = _position_start(model)
        what = (f"positions: PEFT feeds the {P} prefix vectors as a KV cache, so the real tokens take positions "
                f"{start + P}..{start + P}+T-1 (ptune's take {start}..{f'{start}+' if start else ''}T-1); call the "
                f"PEFT model with position_ids=torch.arange(T){start - P:+d} (PEFT adds {P}) for ptune's outputs exactly")
    else:
        n = model.template.num_virtual_tokens
        fix = _LAYOUT_FIX if getattr(model.method_config, "prompt_layout", "peft") != "peft" else ""
        what = (f"prompt position: ptune's template {model.template.source!r} places the {n} virtual tokens "
                f"where it says; PEFT prepends them before every token" + fix)
        if examples is not None:
            first = examples[0]
            where = [i for i, v in enumerate(first.virtual_index) if v >= 0]
            if all(e.virtual_index[:n] == list(range(n)) for e in examples):
                what = ""  # already in front, in order: PEFT's layout
            else:
                before = source.tokenizer.convert_ids_to_tokens(first.input_ids[:where[0]]) if where[0] else []
                what = (f"prompt position: ptune's template {model.template.source!r} puts the {n} virtual tokens at "
                        f"positions {_spans(where)}" + (f" (after {' '.join(before)})" if before else "")
                        + f"; PEFT prepends all {n} before the first token" + fix)
    if examples is None:
        return None, [what + " (not measured: no tokenizer to encode probe texts with)"] if what else []
    ours = model(**_batch(examples, source)).logits
    orders = []
    for e in examples:
        virtual = sorted((v, i) for i, v in enumerate(e.virtual_index) if v >= 0)
        orders.append([i for _, i in virtual] + [i for i, v in enumerate(e.virtual_index) if v < 0])
    batch = _batch([_reordered(e, o) for e, o in zip(examples, orders)], source)
    if peft_type == "PREFIX_TUNING":
        batch["position_ids"] = _shifted_positions(model, batch["attention_mask"], model.method_config.num_virtual_tokens)
    theirs = model(**batch).logits
    pairs = [([i for i, v in enumerate(e.virtual_index) if v < 0],
              [o.index(i) for i, v in enumerate(e.virtual_index) if v < 0]) for e, o in zip(examples, orders)]
    diff = _gap(ours, theirs, pairs)
    if diff <= _scale_tol(ours):
        return diff, []
    return diff, [what or "the outputs differ under PEFT's layout"]


def _spans(positions: list[int]) -> str:
    runs, start = [], positions[0]
    for a, b in zip(positions, positions[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if a == start else f"{start}..{a}")
            start = b
    return ", ".join(runs)


def _position_start(model: PtuneModel) -> int:
    """The first position id a model gives (RoBERTa-family models count from their padding index + 1)."""
    emb = getattr(model.backbone, "embeddings", None)
    return emb.padding_idx + 1 if hasattr(emb, "create_position_ids_from_input_ids") else 0


def _shifted_positions(model: PtuneModel, mask: torch.Tensor, P: int) -> torch.Tensor:
    """The position ids a model gives real tokens that follow a P-long cache."""
    T = mask.shape[1]
    return (torch.arange(T, device=mask.device) + _position_start(model) + P).expand(mask.shape[0], T)
