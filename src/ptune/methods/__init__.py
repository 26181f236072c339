"""The method registry: one line per method, name -> (config class, apply function).

Every method module defines a frozen Config dataclass (with ``method``, ``template_for``) and an
``apply_<method>(base, config, **context)`` that returns the adapter module. An adapter offers
``inject(embeds, virtual_index, task_ids)`` (input-side prompts), ``attention_kwargs(batch_size,
task_ids)`` (deep prompts) and ``peft_export(facts)``; weight-side methods change the base's modules
in place and return identity hooks. Optional hooks, found with ``getattr``: ``trains_base`` (keep the
base's dropout on), ``extra_loss()``, ``set_total_steps(n)`` and ``after_optimizer_step(step)`` (the
training loop's, for AdaLoRA) and ``after_load()`` (called once the saved tensors are loaded).
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError
from ..fields import from_values
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
    return from_values(cls, values, name)


__all__ = ["METHODS", "method_entry", "make_config", "PromptTuningConfig", "PTuningConfig",
           "PrefixTuningConfig", "PTuningV2Config", "LoraConfig", "QLoraConfig", "AdaLoraConfig", "BitFitConfig",
           "FullFinetuneConfig", "ManualConfig", "merge_and_unload"]
