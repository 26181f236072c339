"""The resolved run spec: every fact needed to rebuild a model, resolved once and saved once.

A :class:`RunSpec` is made by :func:`ptune.apply` (from the base it is given, the method config, the
head and the template) and saved inside the adapter's ``adapter_config.json``. ``load_adapter``,
``Run`` and every CLI command rebuild the model from it unchanged: the base's name and how it was
loaded (kind, quantization, remote code, pickle), the head with its label word ids, the template
with its virtual tokens in place, the method config, the labels and, when trained through the
engine, the task itself and its max length. Nothing is re-derived on load.

Format 2 (this one) adds ``base`` (load options), ``task`` and ``max_length`` to format 1, which
still loads: its base was always loaded unquantized, its task is rebuilt from the run's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import PtuneError
from .heads import HeadConfig, head_kind
from .templates import Template

FORMAT_VERSION = 2


@dataclass(frozen=True)
class BaseSpec:
    """Which base model, and how it was loaded."""

    name: str  # demo name, local folder or hub id
    kind: str  # backbone | masked_lm | causal_lm: which transformers class loads it
    is_encoder: bool  # bidirectional (masked-LM family) or causal
    quantize: str | None = None  # nf4 | int8 (bitsandbytes) | None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    fingerprint: dict = field(default_factory=dict, compare=False)  # architecture facts + weight sample hash

    def load_options(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "trust_remote_code": self.trust_remote_code,
                "allow_pickle": self.allow_pickle}


@dataclass(frozen=True)
class RunSpec:
    base: BaseSpec
    method_config: Any  # the method's frozen config dataclass
    head: HeadConfig  # label word ids resolved
    template: Template  # as the model reads it: virtual tokens placed by the method
    labels: tuple[str, ...] = ()
    label_words: tuple[str, ...] = ()
    task: Any = None  # the Task, when the model was built for one (the engine always does)
    max_length: int | None = None  # tokens per input (default: the task's)

    @property
    def method(self) -> str:
        return self.method_config.method

    @property
    def causal(self) -> bool:
        """Whether the label slot is the next token (causal LM) rather than a [MASK] token."""
        return not self.base.is_encoder

    def to_dict(self) -> dict[str, Any]:
        base = dataclasses.asdict(self.base)
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "method_config": dataclasses.asdict(self.method_config),
            "head": dataclasses.asdict(self.head),
            "template": self.template.source,
            "labels": list(self.labels),
            "label_words": list(self.label_words),
            "base": {k: v for k, v in base.items() if k != "fingerprint"},
            "base_model": self.base.fingerprint,
            "task": self.task.to_dict() if self.task is not None else None,
            "max_length": self.max_length,
        }

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "adapter") -> "RunSpec":
        from .data.tasks import Task
        from .methods import make_config

        try:
            fp = dict(cfg["base_model"])
            head = HeadConfig(**cfg["head"])
            if "base" in cfg:
                base = BaseSpec(**cfg["base"], fingerprint=fp)
            else:  # format 1: the base was loaded unquantized, its kind followed from the head
                is_encoder = bool(fp.get("is_encoder", True))
                base = BaseSpec(name=fp.get("name", ""), kind=head_kind(head.kind).base_kind(is_encoder),
                                is_encoder=is_encoder, fingerprint=fp)
            task = cfg.get("task")
            return cls(base=base, method_config=make_config(cfg["method"], **cfg["method_config"]), head=head,
                       template=Template.parse(cfg["template"]), labels=tuple(cfg.get("labels", ())),
                       label_words=tuple(cfg.get("label_words") or ()),
                       task=Task.from_dict(task, f"{source} task") if task else None,
                       max_length=cfg.get("max_length"))
        except (KeyError, TypeError) as e:
            raise PtuneError(f"{source}: adapter config is incomplete or damaged ({type(e).__name__}: {e}); "
                             "save the adapter again") from e
