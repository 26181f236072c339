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

from ..errors import ConfigError
from ..fields import from_values
from ..heads import HEAD_KINDS
from ..yamlfile import read_yaml
from .tracking import parse_report_to, parse_tags

SCHEDULERS = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class TaskEntry:
    """One task of a run: a built-in name or a task YAML, its data files and its sampling weight."""

    task: str
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    weight: float = 1.0

    @classmethod
    def from_value(cls, value: Any) -> "TaskEntry":
        if isinstance(value, str) and value.strip():
            return cls(value.strip())
        if isinstance(value, dict):
            entry = from_values(cls, value, f"task entry {value}")
            if not isinstance(entry.task, str) or not entry.task:
                raise ConfigError(f"task entry {value}: 'task' must name a built-in task or a task YAML")
            if not isinstance(entry.weight, (int, float)) or isinstance(entry.weight, bool) or entry.weight <= 0:
                raise ConfigError(f"task entry {value}: weight={entry.weight!r} must be a positive number")
            return entry
        raise ConfigError(f"task entry {value!r} must be a task name or a mapping with 'task'")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "minilm"
    """demo name (minilm, gemma), local folder or hub id"""
    task: str = "bbc"
    """built-in task name (bbc, wnut, lama-*) or a task YAML file; several, comma-separated (bbc,wnut), train one multi-task adapter (YAML: a list of names or of {task, weight, train_file, validation_file, test_file})"""
    train_file: str | None = None
    """data files (csv, jsonl, json, parquet, conll, datasets folder, hub name, DATASET:CONFIG[:SPLIT] e.g. glue:sst2); none: the data a task YAML names (dataset, config, splits)"""
    validation_file: str | None = None
    """validation data file (scored after every epoch or --eval-every steps; the best adapter is kept by it)"""
    test_file: str | None = None
    """test data file (scored once, with the best adapter, at the end)"""
    method: str = "p_tuning_v2"
    """prompt_tuning | p_tuning | p_tuning_v2 | prefix_tuning | lora | ..."""
    method_options: dict = field(default_factory=dict)
    """options of the method's config"""
    share_prompt: bool = False
    """multi-task: one prompt for every task, each task keeping its own head (P-Tuning v2's multi-task pre-training); default: a prompt per task"""
    task_temperature: float = 1.0
    """multi-task sampling: task t is drawn with probability proportional to (weight_t * n_t) ** (1 / T); 1 = in proportion to its data, large = uniform"""
    ensemble: int = 1
    """prompt ensembling: K prompts for the task trained side by side in one run (each row scored by all K); predictions average their probabilities"""
    init_from: str | None = None
    """warm start: a saved adapter or run directory whose prompts (and prompt encoder; the head too for a task of the same name) start this run"""
    init_task: str | None = None
    """with --init-from a multi-task adapter: the task whose prompt starts this run"""
    head: str = "auto"
    """auto: the task's own head; or one of the same label form (e.g. verbalizer for classification)"""
    head_dropout: float = 0.1
    """dropout on the head's input (classification / tagging heads)"""
    pooling: str = "auto"
    """classification pooling: auto | cls | pooler | mean | last"""
    template: str | None = None
    """task template override, e.g. "{text} It is about {mask}." """
    max_length: int | None = None
    """default: the task's"""
    max_source_length: int | None = None
    """causal LM: tokens the source may take (the prompt; for conversations every turn before the last response); a longer one is cut: oldest exchange first (a system turn kept), then the end of the last prompt. Default: whatever max_length leaves"""
    max_target_length: int | None = None
    """causal LM: tokens the target may take (the last response, its end-of-turn or EOS token included); a record with a longer one is refused, naming it. Default: whatever max_length leaves"""
    epochs: float = 3.0
    """passes over the training data (fractions allowed)"""
    max_steps: int = 0
    """> 0: stop after this many optimizer steps"""
    max_minutes: float = 0.0
    """> 0: stop training after this many minutes (of this session), then evaluate and test as usual (a time-boxed run)"""
    batch_size: int = 16
    """training examples per optimizer step (before --grad-accum); 32 before issue #29 (16 reaches a given accuracy on bbc in fewer seconds of training, bench/results/time_to_target*.md)"""
    eval_batch_size: int = 64
    """examples per batch when scoring"""
    lr: float | None = None
    """None: the method's default (prompts 1e-2..3e-2, prefix tuning 3e-3, LoRA 5e-4, full 3e-5)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    scheduler: str = "linear"
    """learning-rate schedule after warmup: linear | cosine | constant"""
    warmup_ratio: float = 0.02
    """share of the steps spent warming the learning rate up from 0 (0.06 before issue #29)"""
    grad_accum: int = 1
    """micro-batches accumulated into one optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping norm; 0 = off"""
    precision: str = "auto"
    """auto: bf16 autocast where the hardware has it"""
    sharding: str = "none"
    """none | fsdp: shard the frozen base's weights across the processes of a torchrun launch with torch's own FSDP (fully_shard; gloo on CPU too), the trainable weights kept whole on each (ptune.engine.sharding)"""
    gradient_checkpointing: bool = False
    """recompute the base's activations in the backward pass (less memory, more time)"""
    base_dropout: str = "auto"
    """the frozen base's own dropout while training: auto (on only where the base's own weights train: BitFit, full fine-tuning) | on | off"""
    attention: str = "auto"
    """attention kernel: auto (ptune's matmul kernel where SDPA's backward is slow: bf16 training on a CPU; SDPA elsewhere) | sdpa (always SDPA)"""
    prune_last_layer: bool = True
    """compute the last layer only at the position the head reads (CLS-pooled classifiers, multiple choice, verbalizers; BERT-family encoders): same logits, less work"""
    cache_frozen_layers: bool = True
    """with a method confined to upper layers (--layers top:K): compute the frozen layers below once per example and reuse them in later epochs and evaluations (same results)"""
    cache_limit: float = 2048.0
    """megabytes of memory the frozen-layer cache may hold; rows beyond it are recomputed each time"""
    cache_dtype: str = "float32"
    """float32 | bfloat16: how the frozen-layer cache stores hidden states (bfloat16: half the memory, rounded values)"""
    cache_dir: str | None = None
    """keep the frozen-layer cache in a memory-mapped file in this folder (for data that outgrows memory) instead of in memory; still bounded by --cache-limit"""
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
    eval_generate: int = 0
    """> 0: at each evaluation also answer this many validation records (and as many test records at the end) by greedy generation, scored by ROUGE-1/2/L and BLEU-4 (heads that write text: causal_lm, seq2seq)"""
    metric: str | None = None
    """the validation metric the best adapter is kept by (and early stopping watches); default: the task's main metric. rouge1, rouge2, rougeL and bleu4 need --eval-generate"""
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
    report_to: str = "none"
    """experiment trackers that get the run's metrics and hyperparameters besides metrics.jsonl: none | tensorboard | mlflow | wandb | all (those installed), or several comma-separated; written under <output-dir>/tracking (install them: ./install.sh track)"""
    tracking_project: str = "ptune"
    """the trackers' project: TensorBoard's folder under <output-dir>/tracking, MLflow's experiment, W&B's project (a study: the study folder's name)"""
    tracking_tags: str | None = None
    """KEY=VALUE,... recorded with the run by every tracker (MLflow and W&B tags, TensorBoard hyperparameters tag.KEY); a study adds study, study_kind, variant and seed"""
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
            if isinstance(default, str) and not isinstance(value, str) and f.name != "task":
                raise ConfigError(f"{f.name}={value!r} must be text")
        checks = [
            (self.epochs > 0 or self.max_steps > 0, "epochs", self.epochs, "a positive number"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "a positive integer"),
            (self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "a positive integer"),
            (self.lr is None or (isinstance(self.lr, (int, float)) and self.lr > 0), "lr", self.lr,
             "a positive number"),
            (self.scheduler in SCHEDULERS, "scheduler", self.scheduler, f"one of {SCHEDULERS}"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)"),
            (self.max_minutes >= 0, "max_minutes", self.max_minutes, "0 (no limit) or a positive number"),
            (self.save_every >= 0, "save_every", self.save_every, "0 or a positive integer"),
            (self.eval_every >= 0, "eval_every", self.eval_every, "0 or a positive integer"),
            (self.eval_generate >= 0, "eval_generate", self.eval_generate, "0 or a positive integer"),
            (self.metric is None or (isinstance(self.metric, str) and self.metric.strip() != ""), "metric",
             self.metric, "a metric name (e.g. rougeL) or unset"),
            (self.grad_accum >= 1, "grad_accum", self.grad_accum, "a positive integer"),
            (self.precision in PRECISIONS, "precision", self.precision, f"one of {PRECISIONS}"),
            (self.quantize in (None, "nf4", "int8"), "quantize", self.quantize, "nf4, int8 or unset"),
            (self.nan_policy in ("stop", "skip"), "nan_policy", self.nan_policy, "stop or skip"),
            (self.max_length is None or self.max_length > 0, "max_length", self.max_length, "a positive integer"),
            (self.max_source_length is None or self.max_source_length > 0, "max_source_length",
             self.max_source_length, "a positive integer"),
            (self.max_target_length is None or self.max_target_length > 0, "max_target_length",
             self.max_target_length, "a positive integer"),
            (self.head == "auto" or self.head in HEAD_KINDS, "head", self.head,
             f"auto or a head kind: {', '.join(HEAD_KINDS)}"),
            (not (self.overwrite and self.resume), "overwrite", self.overwrite, "not combined with resume"),
            (self.resume or not self.allow_changes, "allow_changes", self.allow_changes, "used with resume only"),
            (0 <= self.head_dropout < 1, "head_dropout", self.head_dropout, "in [0, 1)"),
            (self.ensemble >= 1, "ensemble", self.ensemble, "a positive integer"),
            (self.task_temperature > 0, "task_temperature", self.task_temperature, "a positive number"),
            (self.init_from is not None or self.init_task is None, "init_task", self.init_task,
             "used with init_from only"),
            (self.base_dropout in ("auto", "on", "off"), "base_dropout", self.base_dropout, "auto, on or off"),
            (self.attention in ("auto", "sdpa"), "attention", self.attention, "auto or sdpa"),
            (self.sharding in ("none", "fsdp"), "sharding", self.sharding, "none or fsdp"),
            (self.cache_limit >= 0, "cache_limit", self.cache_limit, "0 (no cache) or a number of megabytes"),
            (self.cache_dtype in ("float32", "bfloat16"), "cache_dtype", self.cache_dtype, "float32 or bfloat16"),
            (bool(self.tracking_project.strip()), "tracking_project", self.tracking_project, "a name"),
        ]
        for ok, name, value, want in checks:
            if not ok:
                raise ConfigError(f"{name}={value!r} is invalid: it must be {want}")
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a mapping, got {type(self.method_options).__name__}")
        entries = self.task_entries()
        if len(entries) > 1 and self.ensemble > 1:
            raise ConfigError("ensemble trains K prompts for one task; give one task, or train the tasks "
                              "together without --ensemble")
        if self.share_prompt and len(entries) == 1:
            raise ConfigError("share_prompt shares one prompt between several tasks; give them as --task a,b")
        if "num_tasks" in self.method_options:
            raise ConfigError("num_tasks follows from the run: one prompt per task of --task a,b (or one with "
                              "--share-prompt), K with --ensemble K; do not set it")
        parse_report_to(self.report_to), parse_tags(self.tracking_tags)  # names checked; packages when it starts
        self.method_config()  # unknown method or bad option values fail now, before any model loads

    @property
    def learning_rate(self) -> float:
        from ..methods import method_entry

        return float(self.lr) if self.lr is not None else method_entry(self.method)[0].default_lr

    def task_entries(self) -> list["TaskEntry"]:
        """The run's tasks: one (``task`` with the data-file options), or several for a multi-task run."""
        task = self.task
        if isinstance(task, str):
            names = [t.strip() for t in task.split(",")]
            if len(names) == 1:
                return [TaskEntry(task, self.train_file, self.validation_file, self.test_file)]
            task = names
        if not isinstance(task, (list, tuple)) or not task:
            raise ConfigError(f"task={task!r} must be a task name, a comma-separated list of names or a list")
        if self.train_file or self.validation_file or self.test_file:
            raise ConfigError("with several tasks give each task's data files in the task list (YAML: task: "
                              "[{task: my.yaml, train_file: ..., validation_file: ...}, bbc])")
        entries = [TaskEntry.from_value(t) for t in task]
        if len(entries) == 1:
            return entries
        names = [e.task for e in entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"task lists {names}: each task once")
        return entries

    @property
    def multi_task(self) -> bool:
        return len(self.task_entries()) > 1

    def prompt_tables(self) -> int:
        """How many prompt tables the method holds (its ``num_tasks``)."""
        if self.ensemble > 1:
            return self.ensemble
        return 1 if self.share_prompt else len(self.task_entries())

    def method_config(self) -> Any:
        """The method's own config, built from ``method_options`` (and ``seed`` where it has one); its
        ``num_tasks`` (prompt tables) follows from the tasks and --ensemble."""
        from ..methods import make_config, method_entry

        cls, _ = method_entry(self.method)
        names = {f.name for f in dataclasses.fields(cls)}
        extra: dict[str, Any] = {"seed": self.seed} if "seed" in names and "seed" not in self.method_options else {}
        tables = self.prompt_tables()
        if tables > 1:
            if "num_tasks" not in names:
                if self.ensemble > 1:
                    raise ConfigError(f"ensemble needs a method with prompts to replicate (prompt_tuning, p_tuning, "
                                      f"p_tuning_v2, prefix_tuning); {self.method} has none")
                tables = 1  # weight methods: every task shares the adapter, each keeps its own head
            else:
                extra["num_tasks"] = tables
        return make_config(self.method, **extra, **self.method_options)

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
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of options, not {type(values).__name__}")
        options = {**values.get("method_options", {}), **overrides.pop("method_options", {})}
        return cls.from_dict({**values, **overrides, "method_options": options})
