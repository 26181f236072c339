"""Tasks: what a dataset means to ptune (fields, labels, label words, template, metric, length).

Tasks are data, loaded from YAML (``yaml.safe_load``: nothing is evaluated) or built in code, in
the spirit of lm-evaluation-harness. A Task validates itself when built and validates each record
it is given, so a bad file fails at load time naming the file, the line and the problem.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, DataError
from ..fields import from_values

TASK_TYPES = ("classification", "tagging", "causal_lm")
METRICS = {"classification": ("accuracy", "macro_f1", "precision_at_1"), "tagging": ("entity_f1",),
           "causal_lm": ("loss",)}


@dataclass(frozen=True)
class Task:
    name: str
    task_type: str = "classification"  # classification | tagging | causal_lm
    text_fields: tuple[str, ...] = ("text",)
    label_field: str = "label"
    labels: tuple[str, ...] = ()  # class names; for tagging the BIO tags, "O" included
    label_words: dict[str, str] | None = None  # verbalizer: label -> word
    template: str | None = None  # prompt template (see ptune.templates)
    verbalizer_template: str | None = None  # the hand-written prompt for a verbalizer head, with {mask}
    metric: str = ""  # default by task type: accuracy / entity_f1 / loss
    max_length: int = 128
    target_field: str = "target"  # causal_lm: the response the loss falls on; "" = plain text, loss on all of it
    default_head: str = ""  # the head when --head is auto: "" = by task type, or "verbalizer"
    label_collisions: str = "error"  # verbalizer labels whose first tokens collide: error | drop (with their records)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("task name must be a non-empty string")
        if self.task_type not in TASK_TYPES:
            raise ConfigError(f"task {self.name}: task_type={self.task_type!r} is not one of {TASK_TYPES}")
        object.__setattr__(self, "text_fields", tuple(self.text_fields))
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if not self.text_fields:
            raise ConfigError(f"task {self.name}: text_fields is empty; name at least one input field")
        if not self.metric:
            object.__setattr__(self, "metric", METRICS[self.task_type][0])
        if self.metric not in METRICS[self.task_type]:
            raise ConfigError(f"task {self.name}: metric={self.metric!r} does not fit a {self.task_type} task; "
                              f"use one of {METRICS[self.task_type]}")
        if self.task_type != "causal_lm":
            if len(self.labels) < 2:
                raise ConfigError(f"task {self.name}: give at least two labels (got {list(self.labels)})")
            dup = sorted({x for x in self.labels if self.labels.count(x) > 1})
            if dup:
                raise ConfigError(f"task {self.name}: duplicate labels {dup}")
        if self.label_words is not None:
            missing = [x for x in self.labels if x not in self.label_words]
            if missing:
                raise ConfigError(f"task {self.name}: label_words has no word for {missing}; give one per label")
        if self.default_head not in ("", "verbalizer"):
            raise ConfigError(f"task {self.name}: default_head={self.default_head!r} must be empty or verbalizer")
        if self.default_head == "verbalizer" and self.task_type != "classification":
            raise ConfigError(f"task {self.name}: default_head verbalizer needs a classification task")
        if self.label_collisions not in ("error", "drop"):
            raise ConfigError(f"task {self.name}: label_collisions={self.label_collisions!r} must be error or drop")
        if self.verbalizer_template is not None and "{mask}" not in self.verbalizer_template:
            raise ConfigError(f"task {self.name}: verbalizer_template {self.verbalizer_template!r} needs a "
                              "{mask} label slot")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ConfigError(f"task {self.name}: max_length={self.max_length!r} must be a positive integer")

    @property
    def label_to_id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["text_fields"], d["labels"] = list(self.text_fields), list(self.labels)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "task") -> "Task":
        if "name" not in values:
            raise ConfigError(f"{source}: a task needs a name")
        return from_values(cls, values, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Task":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"task file {path} does not exist; give a built-in task name or a YAML file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of task keys")
        return cls.from_dict(values, str(path))

    def validate_record(self, rec: Any, source: str, allow_unlabeled: bool = False) -> None:
        """Raise DataError naming ``source`` when ``rec`` cannot be used by this task."""
        if not isinstance(rec, dict):
            raise DataError(f"{source}: expected a record with fields, got {type(rec).__name__}")
        for f in self.text_fields:
            value = rec.get(f)
            if self.task_type == "tagging":
                if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
                    raise DataError(f"{source}: field {f!r} must be a non-empty list of tokens")
            elif value is None:
                raise DataError(f"{source}: missing text field {f!r} (fields present: {sorted(rec)})")
            elif not isinstance(value, str) or not value.strip():
                raise DataError(f"{source}: text field {f!r} is empty")
        if self.task_type == "causal_lm":
            if self.target_field and not allow_unlabeled and not isinstance(rec.get(self.target_field), str):
                raise DataError(f"{source}: missing target field {self.target_field!r}")
            return
        if self.label_field not in rec or rec[self.label_field] is None:
            if allow_unlabeled:
                return
            raise DataError(f"{source}: missing label field {self.label_field!r} (fields present: {sorted(rec)})")
        label = rec[self.label_field]
        known = self.label_to_id
        if self.task_type == "tagging":
            tags = label
            if not isinstance(tags, list) or len(tags) != len(rec[self.text_fields[0]]):
                raise DataError(f"{source}: {self.label_field!r} must list one tag per token")
            bad = sorted({str(t) for t in tags if t not in known})
            if bad:
                raise DataError(f"{source}: unknown tag(s) {bad}; the task's tags are {list(self.labels)}")
        elif str(label) not in known:
            raise DataError(f"{source}: unknown label {label!r}; the task's labels are {list(self.labels)}")
        else:
            rec[self.label_field] = str(label)
