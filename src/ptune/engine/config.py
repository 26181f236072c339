"""TrainConfig: everything a training run needs, as one frozen dataclass.

The same names are the YAML keys, the CLI flags (``--batch-size`` for ``batch_size``) and the
fields of ``config.json`` in the run directory. Method options (``num_virtual_tokens``,
``encoder``, ``r``...) go in ``method_options`` and are validated by the method's own config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..fields import from_values
from ..heads import HEAD_KINDS

SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "minilm"
    """demo name (minilm, gemma), local folder or hub id"""
    task: str = "bbc"
    """built-in task name (bbc, wnut, lama-*) or a task YAML file"""
    train_file: str | None = None
    """data files (csv, jsonl, json, parquet, conll, datasets folder, hub name)"""
    validation_file: str | None = None
    """validation data file (scored after every epoch or --eval-every steps; the best adapter is kept by it)"""
    test_file: str | None = None
    """test data file (scored once, with the best adapter, at the end)"""
    method: str = "p_tuning_v2"
    """prompt_tuning | p_tuning | p_tuning_v2 | prefix_tuning | lora | ..."""
    method_options: dict = field(default_factory=dict)
    """options of the method's config"""
    head: str = "auto"
    """auto: the task's own head; or one of the same label form (e.g. verbalizer for classification)"""
    pooling: str = "auto"
    """classification pooling: auto | cls | pooler | mean | last"""
    template: str | None = None
    """task template override, e.g. "{text} It is about {mask}." """
    max_length: int | None = None
    """default: the task's"""
    epochs: float = 3.0
    """passes over the training data (fractions allowed)"""
    max_steps: int = 0
    """> 0: stop after this many optimizer steps"""
    batch_size: int = 32
    """training examples per optimizer step (before --grad-accum)"""
    eval_batch_size: int = 64
    """examples per batch when scoring"""
    lr: float | None = None
    """None: the method's default (prompts 1e-2..3e-2, LoRA 5e-4, full 3e-5)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    scheduler: str = "linear"
    """learning-rate schedule after warmup: linear | cosine | constant"""
    warmup_ratio: float = 0.06
    """share of the steps spent warming the learning rate up from 0"""
    grad_accum: int = 1
    """micro-batches accumulated into one optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping norm; 0 = off"""
    precision: str = "auto"
    """auto: bf16 autocast where the hardware has it"""
    gradient_checkpointing: bool = False
    """recompute the base's activations in the backward pass (less memory, more time)"""
    quantize: str | None = None
    """nf4 | int8 (bitsandbytes)"""
    trust_remote_code: bool = False
    """run model code shipped with a hub model (off: never)"""
    allow_pickle: bool = False
    """accept .bin/.pt base weights (read with weights_only=True)"""
    eval_every: int = 0
    """steps between evaluations; 0 = once per epoch"""
    save_every: int = 0
    """steps between checkpoints; 0 = at each evaluation"""
    early_stopping_patience: int = 0
    """evaluations without improvement before stopping; 0 = off"""
    limit_train: int = 0
    """use only the first N training records (0 = all)"""
    limit_eval: int = 0
    """score only the first N validation / test records (0 = all)"""
    nan_policy: str = "stop"
    """stop | skip: what a non-finite loss does"""
    log_every: int = 10
    """steps between training-loss lines in metrics.jsonl"""
    seed: int = 13
    """seed of the data splits, the batch order and the adapter's initialisation"""
    output_dir: str = "runs/default"
    """run directory: config.json, metrics.jsonl, checkpoints/, best/, summary.json"""
    overwrite: bool = False
    """replace an existing run directory"""
    resume: bool = False
    """continue the run in --output-dir from its latest checkpoint"""
    allow_changes: bool = False
    """with --resume: accept a changed learning rate, schedule, weight decay or clipping (recorded in the history)"""
    progress: bool = True
    """show a progress bar and per-evaluation lines"""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(f"{f.name}={value!r} must be true or false")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{f.name}={value!r} must be a number")
                if isinstance(default, int) and not isinstance(default, bool) and int(value) != value:
                    raise ConfigError(f"{f.name}={value!r} must be a whole number")
            if isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f"{f.name}={value!r} must be text")
        checks = [
            (self.epochs > 0 or self.max_steps > 0, "epochs", self.epochs, "a positive number"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "a positive integer"),
            (self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "a positive integer"),
            (self.lr is None or (isinstance(self.lr, (int, float)) and self.lr > 0), "lr", self.lr,
             "a positive number"),
            (self.scheduler in SCHEDULERS, "scheduler", self.scheduler, f"one of {SCHEDULERS}"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)"),
            (self.save_every >= 0, "save_every", self.save_every, "0 or a positive integer"),
            (self.eval_every >= 0, "eval_every", self.eval_every, "0 or a positive integer"),
            (self.grad_accum >= 1, "grad_accum", self.grad_accum, "a positive integer"),
            (self.precision in PRECISIONS, "precision", self.precision, f"one of {PRECISIONS}"),
            (self.quantize in (None, "nf4", "int8"), "quantize", self.quantize, "nf4, int8 or unset"),
            (self.nan_policy in ("stop", "skip"), "nan_policy", self.nan_policy, "stop or skip"),
            (self.max_length is None or self.max_length > 0, "max_length", self.max_length, "a positive integer"),
            (self.head == "auto" or self.head in HEAD_KINDS, "head", self.head,
             f"auto or a head kind: {', '.join(HEAD_KINDS)}"),
            (not (self.overwrite and self.resume), "overwrite", self.overwrite, "not combined with resume"),
            (self.resume or not self.allow_changes, "allow_changes", self.allow_changes, "used with resume only"),
        ]
        for ok, name, value, want in checks:
            if not ok:
                raise ConfigError(f"{name}={value!r} is invalid: it must be {want}")
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a mapping, got {type(self.method_options).__name__}")
        self.method_config()  # unknown method or bad option values fail now, before any model loads

    @property
    def learning_rate(self) -> float:
        from ..methods import method_entry

        return float(self.lr) if self.lr is not None else method_entry(self.method)[0].default_lr

    def method_config(self) -> Any:
        """The method's own config, built from ``method_options`` (and ``seed`` where it has one)."""
        from ..methods import make_config, method_entry

        cls, _ = method_entry(self.method)
        seeded = "seed" in {f.name for f in dataclasses.fields(cls)} and "seed" not in self.method_options
        return make_config(self.method, **({"seed": self.seed} if seeded else {}), **self.method_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return from_values(cls, values, "training options")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of options, not {type(values).__name__}")
        options = {**values.get("method_options", {}), **overrides.pop("method_options", {})}
        return cls.from_dict({**values, **overrides, "method_options": options})
