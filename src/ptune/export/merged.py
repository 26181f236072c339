"""The merged export (``format="merged"``): a plain transformers folder for the weight-side methods
(LoRA, AdaLoRA, QLoRA, BitFit, full) with every low-rank update merged into its layer and quantized
layers dequantized to their compute dtype, the head as the model's own where it maps, tokenizer files
beside it. Prompt methods are refused. The folder's model itself is run on the probe inputs and
measured against ptune's (the merged gap); ptune's model is left as it was.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, PtuneError
from ..methods.base import PeftExportable
from ..methods.lora import LowRankLayer
from ..model import PtuneModel
from ..quantize import is_quantized_layer
from .client_head import _client_head, _ClientHead, _head_use, _lm_notes
from .common import (HEAD_NAME, ExportResult, _batch, _device, _gap, _plain_probe, _probe_examples, _scale_tol,
                     _Source)



def _export_merged(source: _Source, tmp: Path, output: Path) -> ExportResult:
    import transformers

    model = source.model
    if not model.adapter.trains_base:
        if isinstance(model.adapter, PeftExportable) or model.template.num_virtual_tokens:
            raise ConfigError(f"{model.method} cannot be merged into weights: its prompts are extra inputs or "
                              "attention keys/values that no plain transformers model takes; use --format peft")
        raise ConfigError(f"{model.method} trains nothing: the base model is unchanged, so use it as it is")
    state, dtype, quantized = _merged_state(model)
    client = _client_head(source, state)
    cfg = copy.deepcopy(model.base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype", "_ptune_source"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    if client.head_module is not None:
        labels = list(model.labels) or [str(i) for i in range(model.head_config.num_labels)]
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {x: i for i, x in enumerate(labels)}
    # built in its dtype (not cast after): buffers such as rotary frequencies stay as from_pretrained makes them
    merged = getattr(transformers, client.auto_class).from_config(cfg, dtype=dtype)
    tensors = {client.body_prefix + k: v for k, v in state.items()}
    tensors.update(client.head_tensors)
    expected = set(merged.state_dict())
    missing = sorted(expected - set(tensors))
    if missing:
        raise PtuneError(f"cannot build {type(merged).__name__} from the merged weights: {missing[:3]} missing")
    merged.load_state_dict({k: v for k, v in tensors.items() if k in expected})
    merged.eval()
    merged.save_pretrained(str(tmp))
    differences: list[str] = []
    notes: list[str] = []
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(str(tmp))
    else:
        differences.append("no tokenizer files: the base's tokenizer could not be loaded (pass tokenizer=)")
    if client.reason:
        differences.append(f"head: {client.reason}; the folder holds the transformer body ({client.class_name}, "
                           f"AutoModel), and ptune's head is in {HEAD_NAME} for you to apply to its hidden "
                           f"states{_head_use(model)}")
        head_state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
        if head_state:
            save_file(head_state, str(tmp / HEAD_NAME))
    notes += _lm_notes(model)
    diff, tol = _merged_gap(source, merged, client)
    if quantized:
        short = str(dtype).removeprefix("torch.")
        what = (f"quantized base: its {model.spec.base.quantize or '4/8-bit'} weights are dequantized to {short} "
                f"(the compute dtype) and the low-rank update merged in, so the folder computes in plain {short} "
                "where ptune computes from the quantized weights")
        if diff > tol:
            differences.append(what)
        else:
            notes.append(what)
    elif diff > tol and not client.reason:
        differences.append(f"the merged model's logits differ from ptune's by up to {diff:.3g}")
    how = f"transformers.{client.auto_class}.from_pretrained({str(output)!r})"
    return ExportResult(output, "merged", how, not differences, differences, diff, notes, client.auto_class)


def _dequantized(layer: nn.Module) -> torch.Tensor:
    if not is_quantized_layer(layer):
        return layer.weight.detach()
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).detach()


def _merged_state(model: PtuneModel) -> tuple[dict[str, torch.Tensor], torch.dtype, bool]:
    """The base's weights with every low-rank update merged in and quantized layers dequantized,
    under the plain layers' names; the dtype they share; whether the base was quantized. ptune's model
    is left as it is."""
    base = model.base
    low = {n: m for n, m in base.named_modules() if isinstance(m, LowRankLayer)}
    quant = {n: m for n, m in base.named_modules() if is_quantized_layer(m)}
    quantized = bool(quant)
    if quantized:
        first = next(iter(quant.values()))
        dtype = getattr(first, "compute_dtype", None) or torch.float16
    else:
        dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
    inside = tuple(n + "." for n in list(low) + list(quant))
    state = {k: v.detach() for k, v in base.state_dict().items() if not k.startswith(inside)}
    for name, layer in low.items():
        inner = layer.base_layer
        weight = _dequantized(inner).float()
        if not layer.merged:
            delta = layer.delta_weight().detach().float()
            weight = weight + (delta.T if layer.transposed else delta)
        state[name + ".weight"] = weight
        if inner.bias is not None:
            state[name + ".bias"] = inner.bias.detach()
    for name, layer in quant.items():
        if name.startswith(tuple(n + "." for n in low)):
            continue  # a LoRA layer's own base layer: merged above
        state[name + ".weight"] = _dequantized(layer)
        if layer.bias is not None:
            state[name + ".bias"] = layer.bias.detach()
    state = {k: (v.to(dtype) if v.is_floating_point() else v).cpu().contiguous() for k, v in state.items()}
    return state, dtype, quantized


def _merged_gap(source: _Source, merged: nn.Module, client: _ClientHead) -> tuple[float, float]:
    """Largest |logit difference| between the merged model and ptune's on the probe inputs, and the
    tolerance for them."""
    model = source.model
    examples = _probe_examples(source)
    batch = _batch(examples, source) if examples is not None else _plain_probe(source)
    ours = model(**batch).logits
    inputs = {"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu()}
    out = merged(**inputs)
    if client.auto_class == "AutoModel":  # the body alone: ptune's head applied to its hidden states
        dtype = next((p.dtype for p in model.head.parameters()), ours.dtype)
        theirs = model.head(out.last_hidden_state.to(_device(model), dtype), batch)
    else:
        theirs = out.logits
        ids = model.head_config.label_word_ids
        if ours.dim() == 2 and theirs.dim() == 3 and ids:  # a verbalizer: the label words at the label slot
            rows = torch.arange(theirs.shape[0])
            theirs = theirs[rows, batch["label_position"].cpu()][:, list(ids)]
    return _gap(ours, theirs, None, batch["attention_mask"]), _scale_tol(ours)
