"""From a TrainConfig to a ready model and encoded data (shared by train, eval and predict)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..api import apply, base_kind
from ..data import Task, load_builtin, load_records
from ..data.builtin import BUILTIN_TASKS
from ..errors import ConfigError, DataError
from ..heads import HeadConfig, collision_message, first_token_collisions, label_word_ids
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


def load_task(cfg: TrainConfig, tokenizer: Any = None, *, need_train: bool = True,
              log: Any = None) -> tuple[Task, dict[str, list[dict]]]:
    """The task and its splits: a built-in, or a YAML task with data files.

    With a ``tokenizer`` and a verbalizer head, label words whose first tokens collide are
    refused, or dropped with their records where the task says ``label_collisions: drop``
    (``log`` receives a line saying what was dropped).
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
    if tokenizer is not None and head_config(cfg, task).kind == "verbalizer":
        task, splits = resolve_label_collisions(task, splits, tokenizer, causal=not model_is_encoder(cfg), log=log)
    return task, splits


def resolve_label_collisions(task: Task, splits: dict[str, list[dict]], tokenizer: Any, *, causal: bool,
                             log: Any = None) -> tuple[Task, dict[str, list[dict]]]:
    """Drop (or refuse, per ``task.label_collisions``) labels a verbalizer cannot tell apart."""
    words = [task.label_words[x] for x in task.labels] if task.label_words else list(task.labels)
    groups = first_token_collisions(words, label_word_ids(tokenizer, words, causal))
    if not groups:
        return task, splits
    if task.label_collisions != "drop":
        raise ConfigError(collision_message(groups) + "; or set label_collisions: drop in the task")
    by_word = {w: x for x, w in zip(task.labels, words)}
    dropped = {by_word[w] for group in groups for w in group}
    kept = tuple(x for x in task.labels if x not in dropped)
    if len(kept) < 2:
        raise ConfigError(f"task {task.name}: fewer than two labels remain once colliding label words are dropped")
    new_splits = {k: [r for r in v if r.get(task.label_field) not in dropped] for k, v in splits.items()}
    removed = sum(len(v) for v in splits.values()) - sum(len(v) for v in new_splits.values())
    if log:
        log(f"{task.name}: dropped {len(dropped)} of {len(task.labels)} labels whose first tokens collide "
            f"({', '.join(sorted(dropped)[:4])}{', ...' if len(dropped) > 4 else ''}) and their {removed} records")
    words_kept = {x: task.label_words[x] for x in kept} if task.label_words else None
    return dataclasses.replace(task, labels=kept, label_words=words_kept), new_splits


def model_is_encoder(cfg: TrainConfig) -> bool:
    from transformers import AutoConfig

    try:
        return is_encoder(AutoConfig.from_pretrained(resolve_model_path(cfg.model),
                                                     trust_remote_code=cfg.trust_remote_code))
    except OSError:
        return True  # load_base reports the real problem


def task_template(task: Task, head_kind: str, override: str | None) -> str:
    if override:
        return override
    if head_kind == "verbalizer" and task.verbalizer_template:
        return task.verbalizer_template
    if task.template:
        return task.template
    body = " ".join("{%s}" % f for f in task.text_fields)
    return body + " {mask}" if head_kind == "verbalizer" else body


def head_config(cfg: TrainConfig, task: Task) -> HeadConfig:
    kind = (task.default_head or HEAD_FOR_TASK[task.task_type]) if cfg.head == "auto" else cfg.head
    if kind == "verbalizer" and task.task_type != "classification":
        raise ConfigError(f"head=verbalizer needs a classification task; {task.name} is {task.task_type}")
    return HeadConfig(kind, num_labels=len(task.labels), pooling=cfg.pooling)


def build_model(cfg: TrainConfig, task: Task, tokenizer: Any) -> PtuneModel:
    head = head_config(cfg, task)
    base = load_base(cfg.model, base_kind(head, model_is_encoder(cfg)), quantize=cfg.quantize,
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
            if task.target_field:  # prompt -> response: the loss falls on the response only
                enc = encoder.encode(rec, target=rec.get(task.target_field) if labelled else None)
            else:  # plain text: every real token after the first is a target
                enc = encoder.encode(rec)
                enc.labels = [t if v < 0 else -100 for t, v in zip(enc.input_ids, enc.virtual_index)]
            out.append(Example(enc, None, rec))
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
