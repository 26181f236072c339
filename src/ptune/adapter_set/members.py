"""Building one member of an :class:`~ptune.adapter_set.AdapterSet` from a saved adapter.

The adapter is rebuilt from its spec on the set's plain base (``adapter_io.from_spec``) and loaded;
then what acts per row is taken out of the base: its input prompts and deep prompts computed once,
its low-rank branches unwrapped from the base's layers (the set wraps each layer once, see
:mod:`ptune.adapter_set.mixed`), its trained biases turned into deltas (the base keeps its own values).
What cannot act per row is refused with a one-line reason: a method that trains the base's own weights
(full fine-tuning), a base kind or quantization other than the set's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_io import from_spec, load_trainable
from ..engine.build import load_task, make_encoder
from ..engine.precision import run_precision
from ..engine.run_dir import read_run_config
from ..errors import ConfigError, PtuneError
from ..heads import head_kind
from ..methods.low_rank import LowRankLayer
from ..methods.lora import WeightAdapter
from ..methods.prompt_tuning import InputPrompts
from ..models import LOAD_OPTIONS, arch_facts, backbone_of
from ..quantize import QUANTIZED_LAYERS, is_quantized_layer
from .mixed import Member

BIAS_LAYERS = ("Linear", "Conv1D", "LayerNorm", *QUANTIZED_LAYERS)  # output = ... + bias, last


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def base_kind_of(base: nn.Module) -> str:
    """How ``base`` was loaded (``load_base`` records it); guessed from its modules for a base built in code."""
    kind = LOAD_OPTIONS.get(base, {}).get("kind")
    if kind:
        return kind
    if backbone_of(base) is base:
        return "backbone"
    return "masked_lm" if arch_facts(base).is_encoder else "causal_lm"


def check_base(base: nn.Module, spec: Any, where: str) -> None:
    """The member's base kind and quantization are the set's (the set holds one base)."""
    need, have = spec.base.kind, base_kind_of(base)
    if need not in arch_kinds(have):
        raise ConfigError(
            f"{where} ({spec.head.kind} head) needs the base loaded as a {need.replace('_', ' ')} (with its LM "
            f"head) but this set's base is a {have.replace('_', ' ')}; build the set with AdapterSet.load(...) "
            f"(it loads the LM head when any adapter needs it) or pass base=ptune.load_base(name, {need!r})")
    loaded = LOAD_OPTIONS.get(base)
    quantized = any(is_quantized_layer(m) for m in base.modules())
    if loaded is not None:
        have_q = loaded.get("quantize")
        mismatch = (spec.base.quantize or None) != (have_q or None)
    else:  # a base built in code records no load options: only a quantized adapter on a plain base shows
        have_q = "4/8-bit" if quantized else None
        mismatch = bool(spec.base.quantize) and not quantized
    if mismatch:
        trained = f"a {spec.base.quantize}" if spec.base.quantize else "an unquantized"
        raise ConfigError(f"{where} was trained on {trained} base but this set's base is "
                          f"{have_q or 'unquantized'}; the adapters of one set share one base, so they must agree "
                          "on its quantization: put it in a set of its own")


def arch_kinds(have: str) -> tuple[str, ...]:
    """The base kinds a base loaded as ``have`` serves: itself, and the bare body an LM class holds."""
    return (have,) if have == "backbone" else ("backbone", have)


def bias_modules(base: nn.Module) -> dict[str, str]:
    """Bias parameter name -> the name of a layer whose output ends by adding it (tied names included)."""
    out: dict[str, str] = {}
    owners = {id(m.bias): n for n, m in base.named_modules()
              if type(m).__name__ in BIAS_LAYERS and isinstance(getattr(m, "bias", None), nn.Parameter)}
    for n, p in base.named_parameters():
        if n.rsplit(".", 1)[-1] == "bias" and id(p) in owners:
            out[n] = owners[id(p)]
    return out


def member_task(spec: Any, run_dir: Path | None, tokenizer: Any, where: str) -> Any:
    """The member's task: its spec's, or (format-1 adapters saved none) rebuilt from its run's options."""
    if spec.task is not None:
        return spec.task
    if run_dir is None:
        raise PtuneError(f"{where} records no task and has no run directory around it; pass the run directory")
    task, _ = load_task(read_run_config(run_dir), tokenizer, need_train=False, encoder_model=spec.base.is_encoder)
    return task


def build_member(base: nn.Module, tokenizer: Any, name: str, adapter_dir: Path, run_dir: Path | None, spec: Any,
                 tensors: dict[str, torch.Tensor], device: torch.device) -> Member:
    """The adapter built on the (plain) shared base and loaded; its per-row parts taken out of the base."""
    where = f"adapter {name!r} ({adapter_dir})"
    # an adapter trained on the bare body (a classifier) over a set whose base is the LM class (it also holds
    # generating or verbalizer adapters): built on the body inside it, its layer names prefixed to the base's
    root, prefix = base, ""
    if spec.base.kind == "backbone" and backbone_of(base) is not base:
        body = next(n for n, m in base.named_modules() if m is backbone_of(base)) + "."
        named_in_base = any(k.startswith("base." + body) for k in tensors)  # trained on the LM class itself
        if any(k.startswith("base.") for k in tensors) and not named_in_base:
            root, prefix = backbone_of(base), body
    try:
        model = from_spec(spec, root, tokenizer)
    except PtuneError as e:
        raise type(e)(f"{where}: {e}") from None
    adapter = model.adapter
    branches: dict[str, LowRankLayer] = {}
    trained_base: dict[str, nn.Parameter] = {}  # the base's own weights this adapter trains (BitFit)
    biased = bias_modules(root)
    if isinstance(adapter, WeightAdapter):
        branches = dict(adapter.layers())  # the low-rank tensors live in wrappers, not in the base's weights
    else:
        trained_base = {n: p for n, p in root.named_parameters() if p.requires_grad}
        other = [n for n in trained_base if n not in biased]
        if other:
            raise ConfigError(f"{where}: {spec.method} changes the base's own weights ({other[0]} and "
                              f"{len(other) - 1} more) for every row, so a set cannot apply it per row; "
                              "score it with ptune.engine.Run (or ptune.load_adapter) on a base of its own")
    original = {n: p.detach().clone() for n, p in trained_base.items()}
    try:
        load_trainable(model, tensors, str(adapter_dir))
        deltas = {prefix + biased[n]: (p.detach() - original[n]).clone() for n, p in trained_base.items()}
    finally:
        with torch.no_grad():  # the base keeps its own values: BitFit's biases become per-row deltas
            for n, p in trained_base.items():
                p.copy_(original[n])
        for layer_name, layer in branches.items():  # the plain layer back; the branch keeps its tensors
            set_module(root, layer_name, layer.base_layer)
    branches = {prefix + n: layer for n, layer in branches.items()}  # named as the set's base names them
    model.eval()
    config = read_run_config(run_dir) if run_dir is not None else None
    task = member_task(spec, run_dir, tokenizer, where)
    member = Member(name=name, path=adapter_dir, spec=spec, task=task, kind=head_kind(spec.head.kind),
                    encoder=make_encoder(model, tokenizer, spec.max_length or (config.max_length if config else None)
                                         or task.max_length),
                    adapter=adapter, head=model.head.eval(), trainable=sum(t.numel() for t in tensors.values()),
                    branches=branches, bias_deltas=deltas,
                    bf16=config is not None and run_precision(config) == "bf16")  # as Run scores the run
    with torch.no_grad():
        if isinstance(adapter, InputPrompts):
            member.prompts = adapter.prompts().detach().to(device)
        extra = adapter.attention_kwargs(1, None)
        if set(extra) - {"ptune_prefix", "ptune_prefix_layers"}:
            raise ConfigError(f"{where}: {spec.method} passes {sorted(extra)} to the attention layers; a set "
                              "can route only ptune_prefix (and its layer range) per row")
        if "ptune_prefix" in extra:
            member.prefix = extra["ptune_prefix"][0].detach().to(device)  # (L, 2, Hkv, P, D)
        if "ptune_prefix_layers" in extra:
            member.prefix_layers = extra["ptune_prefix_layers"][0].to(device)  # (L,) bool
    return member
