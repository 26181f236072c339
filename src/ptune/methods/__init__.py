"""The method registry: one line per method, name -> (config class, apply function).

Every method module defines a frozen Config dataclass (with ``method``, ``default_lr`` and
``template_for``) and an ``apply_<method>(base, config, **context)`` that returns an adapter
meeting :class:`ptune.methods.base.Adapter` (``inject``, ``attention_kwargs``, ``trains_base``,
``set_enabled``); every adapter extends :class:`~ptune.methods.base.IdentityHooks`. Optional parts
are Protocols too, checked with ``isinstance``: ``TrainingHooks`` (AdaLoRA's loop hooks),
``PeftExportable``, ``ReloadHook``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError
from ..fields import from_values
from .base import Adapter, IdentityHooks, PeftExportable, ReloadHook, TrainingHooks  # noqa: I001
from .adalora import AdaLoraConfig, apply_adalora
from .bitfit import BitFitConfig, apply_bitfit
from .full import FullFinetuneConfig, apply_full
from .lora import LoraConfig, apply_lora, merge_and_unload
from .manual import ManualConfig, apply_manual
from .p_tuning import PTuningConfig, apply_p_tuning
from .prefix_tuning import PrefixTuningConfig, PTuningV2Config, apply_prefix_tuning
from .prompt_tuning import PromptTuningConfig, apply_prompt_tuning
from .qlora import QLoraConfig, apply_qlora

METHODS: dict[str, tuple[type, Callable[..., Any]]] = {
    "prompt_tuning": (PromptTuningConfig, apply_prompt_tuning),
    "p_tuning": (PTuningConfig, apply_p_tuning),
    "p_tuning_v2": (PTuningV2Config, apply_prefix_tuning),
    "prefix_tuning": (PrefixTuningConfig, apply_prefix_tuning),
    "lora": (LoraConfig, apply_lora),
    "adalora": (AdaLoraConfig, apply_adalora),
    "qlora": (QLoraConfig, apply_qlora),
    "bitfit": (BitFitConfig, apply_bitfit),
    "full": (FullFinetuneConfig, apply_full),
    "manual": (ManualConfig, apply_manual),  # the hand-written prompt, nothing trained (zero-shot)
}


def method_entry(name: str) -> tuple[type, Callable[..., Any]]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_config(name: str, **values: Any) -> Any:
    """Build a method config from plain values (YAML, CLI); unknown keys are refused by name."""
    cls, _ = method_entry(name)
    renamed = getattr(cls, "renamed", {})  # an option renamed so that one name means one thing across methods
    values = {renamed.get(k, k): v for k, v in values.items()}
    return from_values(cls, values, name)


def saved_method_config(name: str, values: dict[str, Any]) -> Any:
    """A method config as an adapter saved it: a key the file lacks means what it meant when the file was
    written (``absent_means``: e.g. P-Tuning v2 adapters saved before ``layers`` existed had every layer),
    not today's default."""
    cls, _ = method_entry(name)
    return make_config(name, **{**getattr(cls, "absent_means", {}), **values})


__all__ = ["METHODS", "Adapter", "IdentityHooks", "PeftExportable", "ReloadHook", "TrainingHooks", "method_entry", "make_config", "saved_method_config", "PromptTuningConfig", "PTuningConfig",
           "PrefixTuningConfig", "PTuningV2Config", "LoraConfig", "QLoraConfig", "AdaLoraConfig", "BitFitConfig",
           "FullFinetuneConfig", "ManualConfig", "merge_and_unload"]
