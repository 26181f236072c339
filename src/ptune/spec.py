"""The resolved run spec: every fact needed to rebuild a model, resolved once and saved once.

A :class:`RunSpec` is made by :func:`ptune.apply` (from the base it is given, the method config, the
head and the template) and saved inside the adapter's ``adapter_config.json``. ``load_adapter``,
``Run`` and every CLI command rebuild the model from it unchanged: the base's name and how it was
loaded (kind, quantization, remote code, pickle), the head with its label word ids, the template
with its virtual tokens in place, the method config, the labels and, when trained through the
engine, the task itself and its max length. Nothing is re-derived on load.

Format 2 adds ``base`` (load options), ``task`` and ``max_length`` to format 1, which still loads:
its base was always loaded unquantized, its task is rebuilt from the run's config. Format 3 is
written only by what format 2 cannot describe: a prompt ensemble (``ensemble``) and a multi-task
adapter (:class:`MultiTaskSpec`: one base and method config, a list of per-task parts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import PtuneError
from .heads import HeadConfig, head_kind
from .templates import Template

FORMAT_VERSION = 3  # the newest format this ptune reads
TASK_KEYS = ("head", "template", "labels", "label_words", "task", "max_length")  # per task in format 3


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
    ensemble: int = 1  # prompt ensembling: K prompt tables, each row scored by all K, probabilities averaged

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
            "format_version": 3 if self.ensemble > 1 else 2,
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
            **({"ensemble": self.ensemble} if self.ensemble > 1 else {}),
        }

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "adapter") -> "RunSpec":
        from .data.tasks import Task
        from .methods import saved_method_config

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
            return cls(base=base, method_config=saved_method_config(cfg["method"], cfg["method_config"]), head=head,
                       template=Template.parse(cfg["template"]), labels=tuple(cfg.get("labels", ())),
                       label_words=tuple(cfg.get("label_words") or ()),
                       task=Task.from_dict(task, f"{source} task") if task else None,
                       max_length=cfg.get("max_length"), ensemble=int(cfg.get("ensemble", 1)))
        except (KeyError, TypeError) as e:
            raise PtuneError(f"{source}: adapter config is incomplete or damaged ({type(e).__name__}: {e}); "
                             "save the adapter again") from e


@dataclass(frozen=True)
class MultiTaskSpec:
    """One adapter trained on several tasks: each task's :class:`RunSpec` (one base, one method config)
    and the prompt table its rows use (all 0 with a shared prompt, the task's index otherwise)."""

    tasks: tuple[RunSpec, ...]
    prompt_index: tuple[int, ...]

    def __post_init__(self) -> None:
        names = self.names
        if len(set(names)) != len(names):
            raise PtuneError(f"task names must differ within one multi-task adapter, got {list(names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.task.name for t in self.tasks)

    @property
    def base(self) -> BaseSpec:
        return self.tasks[0].base

    @property
    def method_config(self) -> Any:
        return self.tasks[0].method_config

    @property
    def method(self) -> str:
        return self.method_config.method

    @property
    def share_prompt(self) -> bool:
        return len(set(self.prompt_index)) == 1

    def task(self, name: str) -> RunSpec:
        if name not in self.names:
            raise PtuneError(f"this adapter answers tasks {', '.join(self.names)}; {name!r} is not one of them")
        return self.tasks[self.names.index(name)]

    def to_dict(self) -> dict[str, Any]:
        parts = [t.to_dict() for t in self.tasks]
        common = {k: v for k, v in parts[0].items() if k not in TASK_KEYS}
        return {**common, "format_version": 3,
                "tasks": [{**{k: p[k] for k in TASK_KEYS}, "prompt_index": i}
                          for p, i in zip(parts, self.prompt_index)]}

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "adapter") -> "MultiTaskSpec":
        try:
            common = {k: v for k, v in cfg.items() if k != "tasks"}
            tasks = tuple(RunSpec.from_dict({**common, **{k: t[k] for k in TASK_KEYS}}, source) for t in cfg["tasks"])
            index = tuple(int(t["prompt_index"]) for t in cfg["tasks"])
        except (KeyError, TypeError) as e:
            raise PtuneError(f"{source}: multi-task adapter config is incomplete or damaged "
                             f"({type(e).__name__}: {e}); save the adapter again") from e
        if any(t.task is None for t in tasks):
            raise PtuneError(f"{source}: a multi-task adapter must record each of its tasks")
        return cls(tasks, index)


def spec_from_dict(cfg: dict[str, Any], source: str = "adapter") -> "RunSpec | MultiTaskSpec":
    """A saved spec: multi-task when it lists tasks, else one task's."""
    return MultiTaskSpec.from_dict(cfg, source) if "tasks" in cfg else RunSpec.from_dict(cfg, source)
