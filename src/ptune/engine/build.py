"""From a TrainConfig to a ready model and encoded data (shared by train, eval and predict).

What each head kind means lives in ``ptune.heads``; this module only asks the task's head (or the
``--head`` that stands in for it) for its base kind, template, label resolution and encoding.
"""

from __future__ import annotations

from typing import Any

from ..api import apply
from ..data import Task, load_builtin, load_records
from ..data.builtin import BUILTIN_TASKS
from ..errors import ConfigError, DataError
from ..heads import HEAD_KINDS, Example, HeadConfig, HeadKind, head_kind
from ..model import PtuneModel
from ..models import is_encoder, load_base, load_tokenizer, resolve_model_path
from ..templates import TemplateEncoder
from .config import TrainConfig

__all__ = ["Example", "load_task", "task_head", "build_model", "make_encoder", "encode_records",
           "model_is_encoder", "load_run_tokenizer"]


def task_head(cfg: TrainConfig, task: Task) -> HeadConfig:
    """The head for this run: the task's own, or ``--head`` when it answers the same form of label."""
    name = task.head if cfg.head == "auto" else cfg.head
    kind = head_kind(name)
    if kind.label_form != task.kind.label_form:
        fits = [k for k, v in HEAD_KINDS.items() if v.label_form == task.kind.label_form]
        raise ConfigError(f"head={name} cannot answer task {task.name} (a {task.head} task); "
                          f"heads that fit it: {', '.join(fits)}")
    return HeadConfig(name, num_labels=len(task.labels), pooling=cfg.pooling)


def load_task(cfg: TrainConfig, tokenizer: Any = None, *, need_train: bool = True, log: Any = None,
              encoder_model: bool | None = None) -> tuple[Task, dict[str, list[dict]]]:
    """The task and its splits: a built-in, or a YAML task with data files.

    With a ``tokenizer`` the run's head resolves the labels it can use (a verbalizer refuses label
    words whose first tokens collide, or drops them with their records where the task says
    ``label_collisions: drop``; ``log`` receives a line saying what was dropped).
    """
    if cfg.task in BUILTIN_TASKS:
        task, splits = load_builtin(cfg.task, seed=cfg.seed)
    else:
        task = Task.from_yaml(cfg.task)
        splits = {}
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    for split, source in files.items():
        if source:
            splits[split] = load_records(source, split=split, task=task)
    if need_train and "train" not in splits:
        raise ConfigError(f"task {cfg.task!r} has no training data; pass --train-file")
    if tokenizer is not None:
        encoder = model_is_encoder(cfg) if encoder_model is None else encoder_model
        task, splits = task_head(cfg, task).spec.resolve_labels(task, splits, tokenizer, causal=not encoder, log=log)
    return task, splits


def model_is_encoder(cfg: TrainConfig) -> bool:
    """Read from the model's config file alone (before loading weights: it decides which class loads them)."""
    from transformers import AutoConfig

    try:
        return is_encoder(AutoConfig.from_pretrained(resolve_model_path(cfg.model),
                                                     trust_remote_code=cfg.trust_remote_code))
    except OSError:
        return True  # load_base reports the real problem


def build_model(cfg: TrainConfig, task: Task, tokenizer: Any, *, encoder_model: bool | None = None) -> PtuneModel:
    head = task_head(cfg, task)
    encoder = model_is_encoder(cfg) if encoder_model is None else encoder_model
    base = load_base(cfg.model, head.spec.base_kind(encoder), quantize=cfg.quantize,
                     trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    model = apply(base, cfg.method_config(), head=head, template=cfg.template or head.spec.task_template(task),
                  tokenizer=tokenizer, labels=task.labels, label_words=task.words(), task=task,
                  max_length=cfg.max_length or task.max_length)
    if cfg.gradient_checkpointing:
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_encoder(model: PtuneModel, tokenizer: Any, max_length: int | None = None) -> TemplateEncoder:
    return TemplateEncoder(model.template, tokenizer, max_length=max_length or model.spec.max_length or 128,
                           causal=model.spec.causal)


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
