"""From a TrainConfig to a ready model and encoded data (shared by train, eval and predict).

What each head kind means lives in ``ptune.heads``; this module only asks the task's head (or the
``--head`` that stands in for it) for its base kind, template, label resolution and encoding.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

from ..assembly import apply
from ..data import Task, load_builtin, load_records
from ..data.formats import CHAT_FORMATS
from ..data.loaders import data_format, load_dataset_split
from ..data.builtin import BUILTIN_TASKS
from ..attention import use_kernel
from ..errors import ConfigError, DataError
from ..frozen import FrozenWork
from ..heads import HEAD_KINDS, Example, HeadConfig, HeadKind, head_kind
from ..heads.chat import ChatEncoder
from ..model import PtuneModel
from ..models import is_encoder, load_base, load_tokenizer, resolve_model_path
from ..templates import TemplateEncoder
from ..multitask import TaskPart, apply_multitask, base_kind_for
from .config import TaskEntry, TrainConfig
from .precision import run_precision

__all__ = ["Example", "load_task", "load_tasks", "task_config", "task_head", "build_model", "make_encoder",
           "encode_records", "model_is_encoder", "load_run_tokenizer"]


def task_head(cfg: TrainConfig, task: Task) -> HeadConfig:
    """The head for this run: the task's own, or ``--head`` when it answers the same form of label."""
    name = task.head if cfg.head == "auto" else cfg.head
    kind = head_kind(name)
    if not kind.fits_labels_of(task.kind):
        fits = [k for k, v in HEAD_KINDS.items() if v.fits_labels_of(task.kind)]
        raise ConfigError(f"head={name} cannot answer task {task.name} (a {task.head} task); "
                          f"heads that fit it: {', '.join(fits)}")
    return HeadConfig(name, num_labels=len(task.labels), pooling=cfg.pooling, dropout=cfg.head_dropout)


def load_task(cfg: TrainConfig, tokenizer: Any = None, *, need_train: bool = True, log: Any = None,
              encoder_model: bool | None = None) -> tuple[Task, dict[str, list[dict]]]:
    """The task and its splits: a built-in, or a YAML task with data files (or, when no file is given,
    the dataset, configuration and split mapping its YAML names).

    With a ``tokenizer`` the run's head resolves the labels it can use (a verbalizer refuses label
    words whose first tokens collide, or drops them with their records where the task says
    ``label_collisions: drop``; ``log`` receives a line saying what was dropped).
    """
    generation = generation_task(cfg, log=log, encoder_model=encoder_model)
    if generation is not None:
        task, splits = generation, {}
    elif cfg.task in BUILTIN_TASKS:
        task, splits = load_builtin(cfg.task, seed=cfg.seed)
    else:
        task = Task.from_yaml(cfg.task)
        splits = {}
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    for split, source in files.items():
        if source:
            splits[split] = load_records(source, split=split, task=task)
    if task.dataset and not any(files.values()):  # the task YAML names its data; data files replace it whole
        for split, source_split in task.data_splits().items():
            splits[split] = load_dataset_split(task.dataset, task.config, source_split, task=task)
    if need_train and "train" not in splits:
        raise ConfigError(f"task {cfg.task!r} has no training data; pass --train-file (or give the task YAML a "
                          "dataset: and config:)")
    if generation is not None:
        splits = hold_out_validation(cfg, splits, log)
    task = with_data_format(cfg, task, splits)
    if tokenizer is not None:
        encoder = model_is_encoder(cfg) if encoder_model is None else encoder_model
        task, splits = task_head(cfg, task).spec.resolve_labels(task, splits, tokenizer, causal=not encoder, log=log)
    return task, splits


GENERATION_FIELDS = {"alpaca": ("instruction", "output"), "chatglm": ("prompt", "response"),
                     "prompt_response": ("prompt", "response")}  # chat, sharegpt: a generated prompt is "prompt"


def generation_task(cfg: TrainConfig, *, log: Any = None, encoder_model: bool | None = None) -> Task | None:
    """With no --task (the default's name) and a --train-file of generation records (alpaca, chat, sharegpt,
    ChatGLM, prompt/response; see :mod:`ptune.data.formats`), the causal-LM task those records make;
    None otherwise (the task is the one named)."""
    default = TrainConfig.__dataclass_fields__["task"].default
    if cfg.task != default or not cfg.train_file:
        return None
    fmt = data_format(cfg.train_file, split="train")
    if fmt is None:
        return None
    encoder = model_is_encoder(cfg) if encoder_model is None else encoder_model
    if encoder:
        raise ConfigError(f"--train-file {cfg.train_file} holds {fmt} records, which train a causal LM; --model "
                          f"{cfg.model} is an encoder: give a causal LM (e.g. --model gemma)")
    prompt, target = GENERATION_FIELDS.get(fmt, ("prompt", "response"))
    task = Task(name=Path(cfg.train_file).stem or "generation", head="causal_lm", text_fields=(prompt,),
                target_field=target, format=fmt, max_length=512,
                description=f"{fmt} records of {cfg.train_file}")
    if log is not None:
        log(f"{cfg.train_file} holds {fmt} records: training causal-LM task {task.name!r} on them")
    return task


def hold_out_validation(cfg: TrainConfig, splits: dict[str, list[dict]], log: Any = None) -> dict[str, list[dict]]:
    """A task made from a --train-file alone: without --validation-file, a seeded tenth of the file (at least one
    record) is held out for validation, the same records at every load of the run (train, eval)."""
    if "validation" in splits or "train" not in splits:
        return splits
    records = splits["train"]
    if len(records) < 2:
        raise ConfigError(f"--train-file {cfg.train_file} holds one record; give at least two (one is held out for "
                          "validation) or pass --validation-file")
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:max(1, len(records) // 10)])
    if log is not None:
        log(f"no --validation-file: {len(held)} of the {len(records)} training records held out for validation "
            f"(seed {cfg.seed})")
    return {**splits, "train": [r for i, r in enumerate(records) if i not in held],
            "validation": [r for i, r in enumerate(records) if i in held]}


def with_data_format(cfg: TrainConfig, task: Task, splits: dict[str, list[dict]]) -> Task:
    """The task with its ``format`` fixed (auto: the training data's, so a saved run renders prompts as it
    trained) and the run's --max-source-length / --max-target-length."""
    changes: dict[str, Any] = {}
    if task.kind.data_formats and task.format == "auto" and splits.get("train"):
        fmt = task.record_format(splits["train"][0])
        if fmt in CHAT_FORMATS:
            changes["format"] = fmt
    for key in ("max_source_length", "max_target_length"):
        if getattr(cfg, key) is not None:
            if not task.kind.data_formats:
                raise ConfigError(f"--{key.replace('_', '-')} bounds a causal_lm task's prompt or response; task "
                                  f"{task.name} is a {task.head} task (use --max-length)")
            changes[key] = getattr(cfg, key)
    return dataclasses.replace(task, **changes) if changes else task


def task_config(cfg: TrainConfig, entry: TaskEntry) -> TrainConfig:
    """The run's options for one task of a multi-task run (its name and data files)."""
    return dataclasses.replace(cfg, task=entry.task, train_file=entry.train_file, validation_file=entry.validation_file,
                               test_file=entry.test_file, share_prompt=False, ensemble=1, init_from=None,
                               init_task=None)


def load_tasks(cfg: TrainConfig, tokenizer: Any = None, *, need_train: bool = True, log: Any = None,
               encoder_model: bool | None = None) -> list[tuple[Task, dict[str, list[dict]]]]:
    """Every task of the run with its splits (one for a single-task run)."""
    entries = cfg.task_entries()
    if len(entries) == 1:
        return [load_task(cfg, tokenizer, need_train=need_train, log=log, encoder_model=encoder_model)]
    out = [load_task(task_config(cfg, e), tokenizer, need_train=need_train, log=log, encoder_model=encoder_model)
           for e in entries]
    names = [t.name for t, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"the tasks' names must differ (they key each task's head and metrics): {names}")
    return out


def model_is_encoder(cfg: TrainConfig) -> bool:
    """Read from the model's config file alone (before loading weights: it decides which class loads them)."""
    from transformers import AutoConfig

    try:
        return is_encoder(AutoConfig.from_pretrained(resolve_model_path(cfg.model),
                                                     trust_remote_code=cfg.trust_remote_code))
    except OSError:
        return True  # load_base reports the real problem


def weight_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """float32 where the run computes in fp32 (``--precision fp32``, or ``auto`` on a CPU without bf16
    arithmetic); else None, the checkpoint's own dtype (a quantized base: bf16, QLoRA's compute dtype). A
    checkpoint stored in bf16 (Gemma) would otherwise compute in emulated bf16 there: matmuls measured about
    2.5x slower than fp32 on such a CPU (bench/mfu.py), and its fp32 heads would meet bf16 hidden states with
    no autocast to reconcile them. A 4-bit base computes in fp32 there too (bitsandbytes' compute dtype): its
    bf16 backward matmuls fell to PyTorch's reference CPU gemm, minutes per Gemma step (issue #26);
    ``--precision bf16`` keeps bf16 compute, for its smaller activations."""
    if run_precision(cfg) == "bf16":
        return None
    return torch.float32


def build_model(cfg: TrainConfig, task: Task | list[Task], tokenizer: Any, *,
                encoder_model: bool | None = None) -> PtuneModel:
    """The run's model: one task's, or a :class:`MultiTaskModel` when ``task`` lists several."""
    tasks = task if isinstance(task, list) else [task]
    heads = [task_head(cfg, t) for t in tasks]
    encoder = model_is_encoder(cfg) if encoder_model is None else encoder_model
    if cfg.ensemble > 1:
        check_ensemble(cfg, heads[0])
    base = load_base(cfg.model, base_kind_for(heads, encoder), quantize=cfg.quantize, dtype=weight_dtype(cfg),
                     trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    if len(tasks) > 1:
        parts = [TaskPart(t, h, cfg.template or h.spec.task_template(t), cfg.max_length or t.max_length)
                 for t, h in zip(tasks, heads)]
        config = cfg.method_config()
        share = cfg.share_prompt or getattr(config, "num_tasks", 1) == 1
        model: PtuneModel = apply_multitask(base, config, parts, tokenizer=tokenizer, share_prompt=share)
    else:
        t, head = tasks[0], heads[0]
        model = apply(base, cfg.method_config(), head=head, template=cfg.template or head.spec.task_template(t),
                      tokenizer=tokenizer, labels=t.labels, label_words=t.words(), task=t,
                      max_length=cfg.max_length or t.max_length, ensemble=cfg.ensemble)
    if cfg.base_dropout != "auto":
        model.base_dropout = cfg.base_dropout == "on"
    use_kernel(model.base, cfg.attention)
    if cfg.gradient_checkpointing:
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return attach_frozen_work(model, cfg)


def attach_frozen_work(model: PtuneModel, cfg: TrainConfig) -> PtuneModel:
    """``model.frozen``: the work the run's options let the frozen base skip (see :mod:`ptune.frozen`)."""
    skip = FrozenWork(model, cache=cfg.cache_frozen_layers and cfg.cache_limit > 0, cache_limit_mb=cfg.cache_limit,
                      cache_dtype=getattr(torch, cfg.cache_dtype), prune_last=cfg.prune_last_layer,
                      cache_dir=cfg.cache_dir)
    model.frozen = skip if skip.describe() else None
    return model


def check_ensemble(cfg: TrainConfig, head: HeadConfig) -> None:
    if head.spec.generates:
        raise ConfigError(f"ensemble averages class or tag probabilities; a {head.kind} head generates text")
    if head.spec.multi_row:
        raise ConfigError(f"ensemble repeats every row per member, and a {head.kind} head scores several rows per "
                          "record; train it without --ensemble")
    init = getattr(cfg.method_config(), "init", "random")
    if init in ("text", "labels"):
        raise ConfigError(f"ensemble members must start apart, and init={init} gives all {cfg.ensemble} the same "
                          "prompt (they would train identically); use init random or vocab")


def make_encoder(model: PtuneModel, tokenizer: Any, max_length: int | None = None) -> TemplateEncoder:
    length = max_length or model.spec.max_length or 128
    task = model.spec.task
    if task is not None and getattr(task, "format", "auto") in CHAT_FORMATS:  # prompts rendered as conversations
        return ChatEncoder(model.template, tokenizer, task, max_length=length, causal=model.spec.causal)
    return TemplateEncoder(model.template, tokenizer, max_length=length, causal=model.spec.causal)


def encode_records(task: Task, encoder: TemplateEncoder, records: list[dict], *, labelled: bool = True,
                   kind: HeadKind | None = None) -> list[Example]:
    """Records through the template and the head's label encoding (``kind``: default the task's head;
    heads of one label form encode alike)."""
    kind = kind or task.kind
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(kind.encode(task, encoder, rec, labelled))
        except DataError as e:
            raise DataError(f"record {i + 1}: {e}") from None
    return out


def load_run_tokenizer(cfg: TrainConfig) -> Any:
    return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
