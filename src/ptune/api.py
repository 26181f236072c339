"""The Python API: put a method on a base model, save it, load it back.

    base = ptune.load_base("minilm")
    tok = ptune.load_tokenizer("minilm")
    model = ptune.apply(base, ptune.PTuningV2Config(num_virtual_tokens=16),
                        head=ptune.HeadConfig("classification", num_labels=5), tokenizer=tok)
    print(model.describe())          # trainable parameters and their share
    ptune.save_adapter(model, "out/adapter")
    model = ptune.load_adapter("out/adapter")  # loads the base its spec names, as it was loaded; checks it

Adapters are a JSON config plus a safetensors file of the trainable tensors (adapter, head). The
base model's fingerprint is stored and checked on load. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .attention import route_attention
from .encoder_decoder import check_base_kind, is_encoder_decoder
from .errors import AdapterMismatchError, ConfigError, PtuneError
from .heads import HeadConfig, head_kind
from .methods import method_entry
from .methods.base import ReloadHook
from .model import PtuneModel
from .models import LOAD_OPTIONS, arch_facts, backbone_of, describe, fingerprint, load_base, load_tokenizer
from .spec import FORMAT_VERSION, BaseSpec, RunSpec, spec_from_dict
from .templates import Template

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def base_spec_of(base: nn.Module, kind: str) -> BaseSpec:
    """What a spec records about ``base``: its name, how ``load_base`` loaded it (``kind`` when it did
    not), encoder or decoder, and its fingerprint (taken before a method wraps any layer)."""
    facts = arch_facts(base)
    loaded = LOAD_OPTIONS.get(base, {})
    fp = fingerprint(base)
    return BaseSpec(name=fp.get("name", ""), kind=loaded.get("kind") or kind, is_encoder=facts.is_encoder,
                    quantize=loaded.get("quantize"), trust_remote_code=bool(loaded.get("trust_remote_code")),
                    allow_pickle=bool(loaded.get("allow_pickle")), fingerprint=fp)


def resolve_spec(base_spec: BaseSpec, config: Any, *, head: HeadConfig, template: str | None, tokenizer: Any,
                 labels: Sequence[str], label_words: Sequence[str] | None, task: Any, max_length: int | None,
                 ensemble: int = 1) -> RunSpec:
    """One task's spec: the template with the method's virtual tokens, the head resolved against the
    tokenizer (a verbalizer's label word ids)."""
    kind = head_kind(head.kind)
    words = list(label_words) if label_words else list(labels)
    resolved = config.template_for(Template.parse(template or kind.default_template()))
    head = kind.resolve(head, resolved, tokenizer=tokenizer, label_words=words, causal=not base_spec.is_encoder)
    return RunSpec(base=base_spec, method_config=config, head=head, template=resolved, labels=tuple(labels),
                   label_words=tuple(words), task=task, max_length=max_length, ensemble=ensemble)


def attach_adapter(base: nn.Module, spec: RunSpec, tokenizer: Any) -> Any:
    """Freeze ``base`` and put the spec's method on it; returns the adapter."""
    for p in base.parameters():
        p.requires_grad_(False)
    _, apply_fn = method_entry(spec.method)
    route_attention(base)
    return apply_fn(base, spec.method_config, template=spec.template, tokenizer=tokenizer,
                    label_words=list(spec.label_words) or None)


def build_head(spec: RunSpec, base: nn.Module) -> nn.Module:
    facts = arch_facts(base)
    return head_kind(spec.head.kind).build(spec.head, base, facts.hidden_size, facts.is_encoder)


def apply(base: nn.Module, config: Any, *, head: HeadConfig | None = None, template: str | None = None,
          tokenizer: Any = None, labels: Sequence[str] = (), label_words: Sequence[str] | None = None,
          task: Any = None, max_length: int | None = None, ensemble: int = 1) -> PtuneModel:
    """Freeze ``base``, attach the method in ``config`` and a head; returns the trainable model.

    ``template``: the task template (the head's default: ``{text}``, or ``{text} {mask}`` for a
    verbalizer); prompt methods add their virtual tokens to it (prompt tuning prepends ``[P:n]``;
    P-Tuning may bring its own). ``label_words``: the words a verbalizer scores, in label order
    (default: the labels themselves). ``task`` / ``max_length`` are recorded in the model's spec
    (the engine passes them, so a saved run can be used without its task file). ``ensemble`` K > 1:
    a prompt ensemble over the method's K prompt tables (``config.num_tasks`` must be K).
    """
    head = head or HeadConfig("classification", num_labels=len(labels) or 2)
    if ensemble > 1 and getattr(config, "num_tasks", 1) != ensemble:
        raise ConfigError(f"an ensemble of {ensemble} needs a method config with num_tasks={ensemble} "
                          f"(got {getattr(config, 'num_tasks', None)})")
    kind = head_kind(head.kind).base_kind(arch_facts(base).is_encoder)
    check_base_kind(base.config, kind, type(base).__name__, head.kind)  # T5 answers through the seq2seq head only
    if is_encoder_decoder(base.config) and getattr(config, "layers", None) is not None:
        raise ConfigError(f"layers={config.layers!r} counts the layers of one stack; an encoder-decoder model has two, "
                          f"so {config.method} acts in all of them (leave layers unset)")
    base_spec = base_spec_of(base, kind)
    spec = resolve_spec(base_spec, config, head=head, template=template, tokenizer=tokenizer, labels=labels,
                        label_words=label_words, task=task, max_length=max_length, ensemble=ensemble)
    adapter = attach_adapter(base, spec, tokenizer)
    return PtuneModel(base, adapter, build_head(spec, base), spec)


def from_spec(spec: Any, base: nn.Module, tokenizer: Any = None) -> PtuneModel:
    """A fresh model (untrained adapter) built from a resolved spec on ``base`` (a multi-task spec
    gives a :class:`ptune.multitask.MultiTaskModel`)."""
    from .spec import MultiTaskSpec

    if isinstance(spec, MultiTaskSpec):
        from .multitask import multitask_from_spec

        return multitask_from_spec(spec, base, tokenizer)
    return apply(base, spec.method_config, head=spec.head, template=spec.template.source, tokenizer=tokenizer,
                 labels=spec.labels, label_words=spec.label_words or None, task=spec.task,
                 max_length=spec.max_length, ensemble=spec.ensemble)


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def adapter_config(model: PtuneModel) -> dict:
    return {**model.spec.to_dict(), "ptune_version": __version__}


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


def read_spec(path: str | Path) -> Any:
    """The resolved spec saved with an adapter: a :class:`RunSpec` (formats 1-3), or a
    :class:`MultiTaskSpec` for an adapter trained on several tasks."""
    return spec_from_dict(read_adapter_config(path), str(path))


def load_base_for(spec: Any, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                  base_name: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the base a spec names, the way it was loaded for training (quantization included).

    Remote code and pickle files stay the caller's decision: a spec that needed them is refused
    unless the caller passes the same consent, so a saved file never switches them on by itself.
    """
    b = spec.base
    for option, given in (("trust_remote_code", trust_remote_code), ("allow_pickle", allow_pickle)):
        if getattr(b, option) and not given:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"this adapter's base {b.name!r} was loaded with {option} (it runs or unpickles "
                              f"code from the model folder); pass {flag} (Python: {option}=True) to load it again")
    return load_base(base_name or b.name, b.kind, quantize=b.quantize, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle, dtype=None if b.quantize else dtype)


def load_adapter(path: str | Path, base: nn.Module | None = None, *, tokenizer: Any = None,
                 base_name: str | None = None, trust_remote_code: bool = False,
                 allow_pickle: bool = False, dtype: torch.dtype | None = None) -> PtuneModel:
    """Rebuild a saved adapter on ``base`` (default: the base its spec names, loaded as it was for
    training, e.g. 4-bit, in ``dtype`` when given and not quantized) and check that the base is the one it
    was trained on."""
    spec = read_spec(path)
    name = base_name or spec.base.name
    if base is None:
        base = load_base_for(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, base_name=name,
                             dtype=dtype)
    check_fingerprint(spec.base.fingerprint, base)
    if tokenizer is None and name:
        tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = from_spec(spec, base, tokenizer)
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
    if isinstance(model.adapter, ReloadHook):  # state derived from the tensors (AdaLoRA's rank pattern)
        model.adapter.after_load()


def export_peft(model: PtuneModel | str | Path, path: str | Path | None = None, **kwargs: Any) -> Path:
    """Write the adapter in HF PEFT's layout (``PeftModel.from_pretrained`` reads it); returns the folder.

    A thin front for :func:`ptune.export.export_peft` (options, the head as the client's own head
    where transformers has one of the same form, and the exactness report: see :mod:`ptune.export`).
    """
    from .export import export_peft as _export_peft

    return _export_peft(model, path, **kwargs)


__all__ = ["apply", "from_spec", "save_adapter", "load_adapter", "read_spec", "load_base_for", "export_peft",
           "read_adapter_config", "backbone_of"]
