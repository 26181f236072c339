"""From a TrainConfig to a ready model and encoded data (shared by train, eval and predict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import apply, base_kind
from ..data import Task, load_builtin, load_records
from ..data.builtin import BUILTIN_TASKS
from ..errors import ConfigError, DataError
from ..heads import HeadConfig
from ..model import PtuneModel
from ..models import is_encoder, load_base, load_tokenizer, resolve_model_path
from ..templates import Encoded, TemplateEncoder
from .config import TrainConfig

HEAD_FOR_TASK = {"classification": "classification", "tagging": "tagging", "causal_lm": "causal_lm"}


@dataclass
class Example:
    encoded: Encoded
    target: int | None  # class id (classification / verbalizer); None for token-level labels
    record: dict


def load_task(cfg: TrainConfig) -> tuple[Task, dict[str, list[dict]]]:
    """The task and its splits: a built-in, or a YAML task with data files."""
    if cfg.task in BUILTIN_TASKS:
        task, splits = load_builtin(cfg.task, seed=cfg.seed)
    else:
        task = Task.from_yaml(cfg.task)
        splits = {}
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    for split, source in files.items():
        if source:
            splits[split] = load_records(source, split=split, task=task)
    if "train" not in splits:
        raise ConfigError(f"task {cfg.task!r} has no training data; pass --train-file")
    return task, splits


def task_template(task: Task, head_kind: str, override: str | None) -> str:
    if override:
        return override
    if task.template:
        return task.template
    body = " ".join("{%s}" % f for f in task.text_fields)
    return body + " {mask}" if head_kind == "verbalizer" else body


def head_config(cfg: TrainConfig, task: Task) -> HeadConfig:
    kind = HEAD_FOR_TASK[task.task_type] if cfg.head == "auto" else cfg.head
    if kind == "verbalizer" and task.task_type != "classification":
        raise ConfigError(f"head=verbalizer needs a classification task; {task.name} is {task.task_type}")
    return HeadConfig(kind, num_labels=len(task.labels), pooling=cfg.pooling)


def build_model(cfg: TrainConfig, task: Task, tokenizer: Any) -> PtuneModel:
    from transformers import AutoConfig

    head = head_config(cfg, task)
    try:
        encoder_model = is_encoder(AutoConfig.from_pretrained(resolve_model_path(cfg.model),
                                                              trust_remote_code=cfg.trust_remote_code))
    except OSError:
        encoder_model = True  # load_base below reports the real problem
    base = load_base(cfg.model, base_kind(head, encoder_model), quantize=cfg.quantize,
                     trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    method_config = cfg.method_config()
    words = [task.label_words[label] for label in task.labels] if task.label_words else None
    model = apply(base, method_config, head=head, template=task_template(task, head.kind, cfg.template),
                  tokenizer=tokenizer, labels=task.labels, label_words=words)
    if cfg.gradient_checkpointing:
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_encoder(model: PtuneModel, tokenizer: Any, max_length: int) -> TemplateEncoder:
    return TemplateEncoder(model.template, tokenizer, max_length=max_length,
                           causal=not model.fingerprint.get("is_encoder", True))


def encode_records(task: Task, encoder: TemplateEncoder, records: list[dict], *,
                   labelled: bool = True) -> list[Example]:
    label_id = task.label_to_id
    out = []
    for i, rec in enumerate(records):
        if task.task_type == "tagging":
            field = task.text_fields[0]
            tags = [label_id[t] for t in rec[task.label_field]] if labelled else None
            enc = encoder.encode(rec, tagging_field=field, tags=tags)
            if enc.labels is None:  # unlabelled prediction still needs a labels row shape
                enc.labels = [-100] * len(enc.input_ids)
            out.append(Example(enc, None, rec))
        elif task.task_type == "causal_lm":
            out.append(Example(encoder.encode(rec, target=rec.get(task.target_field) if labelled else None),
                               None, rec))
        else:
            target = None
            if labelled:
                label = rec.get(task.label_field)
                if label not in label_id:
                    raise DataError(f"record {i + 1}: label {label!r} is not one of the task's labels "
                                    f"{list(task.labels)}")
                target = label_id[label]
            out.append(Example(encoder.encode(rec), target, rec))
    return out


def load_run_tokenizer(cfg: TrainConfig) -> Any:
    return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
