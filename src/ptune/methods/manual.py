"""The manual prompt: a hand-written template and nothing trained (the zero-shot baseline).

P-Tuning's experiments compare trained prompts against the best hand-written ones ("The capital of
France is" -> " Paris"). ``manual`` puts no parameters on the base: the task's template, its anchor
words and a verbalizer over label words make the whole classifier. Use it through
``ptune eval --zero-shot`` (or :func:`ptune.engine.evaluate_zero_shot`); training it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .base import IdentityHooks


class NoAdapter(IdentityHooks):
    """Identity hooks and no parameters."""


@dataclass(frozen=True)
class ManualConfig:
    method: ClassVar[str] = "manual"
    default_lr: ClassVar[float] = 0.0  # nothing trains

    def template_for(self, task_template: Template) -> Template:
        if task_template.num_virtual_tokens:
            raise ConfigError(f"a manual prompt has no trainable tokens; remove the [P] markers from "
                              f"{task_template.source!r} or use prompt_tuning / p_tuning")
        return task_template


def apply_manual(base: nn.Module, config: ManualConfig, **_: Any) -> NoAdapter:
    return NoAdapter()
