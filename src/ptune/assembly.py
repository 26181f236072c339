"""Model assembly: a base, a method and a head put together into a :class:`~ptune.model.PtuneModel`.

    model = apply(base, ptune.PTuningV2Config(num_virtual_tokens=16),
                  head=ptune.HeadConfig("classification", num_labels=5), tokenizer=tok)

``resolve_spec`` resolves every fact the model is built from (template with virtual tokens, head
against the tokenizer) into a :class:`~ptune.spec.RunSpec`; ``attach_adapter`` freezes the base and
puts the method on it; ``build_head`` builds the head module. Saving and loading live one floor
up, in :mod:`ptune.adapter_io`.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .attention import route_attention
from .encoder_decoder import check_base_kind, is_encoder_decoder
from .errors import ConfigError
from .heads import HeadConfig, head_kind
from .methods import method_entry
from .methods.layers import picks_layers
from .model import PtuneModel
from .models import LOAD_OPTIONS, arch_facts, fingerprint
from .spec import BaseSpec, RunSpec
from .templates import Template


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
    if is_encoder_decoder(base.config) and picks_layers(getattr(config, "layers", None)):
        raise ConfigError(f"layers={config.layers!r} counts the layers of one stack; an encoder-decoder model has two, "
                          f"so {config.method} acts in all of them (leave layers unset)")
    base_spec = base_spec_of(base, kind)
    spec = resolve_spec(base_spec, config, head=head, template=template, tokenizer=tokenizer, labels=labels,
                        label_words=label_words, task=task, max_length=max_length, ensemble=ensemble)
    adapter = attach_adapter(base, spec, tokenizer)
    return PtuneModel(base, adapter, build_head(spec, base), spec)


__all__ = ["apply", "attach_adapter", "base_spec_of", "build_head", "resolve_spec"]
