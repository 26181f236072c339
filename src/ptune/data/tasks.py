"""Tasks: what a dataset means to ptune (fields, labels, label words, template, metric, length).

A task names the head kind that answers it (``head``); what a record must hold, how its label is
encoded and scored is that head's business (``ptune.heads``). Tasks are data, loaded from YAML (``ptune.yamlfile``: safe loading, nothing is evaluated, YAML 1.2 numbers) or built in code, in
the spirit of lm-evaluation-harness. A Task validates itself when built and validates each record
it is given, so a bad file fails at load time naming the file, the line and the problem. A task YAML
may also name its data (``dataset``, ``config``, ``splits``: GLUE's ``nyu-mll/glue`` / ``sst2``), read
when no data file is given (see ``configs/tasks/``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..fields import from_values
from ..heads import HEAD_KINDS, HeadKind, head_kind
from ..yamlfile import read_yaml
from . import formats

LEGACY_TASK_TYPES = {"classification": "classification", "tagging": "tagging", "causal_lm": "causal_lm"}
DATA_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Task:
    name: str
    head: str = "classification"  # the head kind that answers it: classification | tagging | verbalizer | causal_lm
    text_fields: tuple[str, ...] = ("text",)
    label_field: str = "label"
    labels: tuple[str, ...] = ()  # class names; for tagging the BIO tags, "O" included
    label_words: dict[str, str] | None = None  # verbalizer: label -> word
    template: str | None = None  # prompt template (see ptune.templates)
    verbalizer_template: str | None = None  # the hand-written prompt for a verbalizer head, with {mask}
    metric: str = ""  # the main metric; default: the head's first (accuracy / f1 / loss)
    max_length: int = 128
    target_field: str = "target"  # causal_lm: the response the loss falls on; "" = plain text, loss on all of it
    label_collisions: str = "error"  # verbalizer labels whose first tokens collide: error | drop (with their records)
    # span_qa: the step in tokens between the windows of a context longer than max_length (0: half a window),
    # the longest answer predicted (tokens), and whether questions may have no answer (SQuAD 2.0 style)
    doc_stride: int = 0
    max_answer_length: int = 30
    allow_no_answer: bool = False
    # causal_lm: the records' data format (ptune.data.formats): auto (detected from the fields) | prompt_response
    # | alpaca | chat | sharegpt | chatglm; the last four are rendered with the tokenizer's chat template
    format: str = "auto"
    # causal_lm: tokens the source (prompt, earlier turns) may take, cut from the oldest turn, then from the end of
    # the last prompt; tokens the target (the last response) may take, a longer one refused (None: max_length rules)
    max_source_length: int | None = None
    max_target_length: int | None = None
    # generating heads: evaluation by generation cuts each prediction at the first of these strings, found after
    # its leading whitespace (lm-evaluation-harness's ``until``; e.g. ["\n"] for one-line answers)
    stop: tuple[str, ...] = ()
    description: str = field(default="", compare=False)
    # where the task's data lives when no data file is given: a hub dataset (or a local folder of
    # save_to_disk folders, one per configuration), its configuration, and which of its splits serve as
    # ptune's train / validation / test (default: train and validation by those names; test only when mapped)
    dataset: str | None = field(default=None, compare=False)
    config: str | None = field(default=None, compare=False)
    splits: dict[str, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("task name must be a non-empty string")
        if self.head not in HEAD_KINDS:
            raise ConfigError(f"task {self.name}: head={self.head!r} is not one of {tuple(HEAD_KINDS)}")
        kind = self.kind
        object.__setattr__(self, "text_fields", tuple(self.text_fields))
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise ConfigError(f"task {self.name}: stop={self.stop!r} must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.text_fields:
            raise ConfigError(f"task {self.name}: text_fields is empty; name at least one input field")
        try:
            metric = kind.metric(self.metric) if self.metric else kind.metrics[0]
        except ConfigError as e:
            raise ConfigError(f"task {self.name}: {e}") from None
        object.__setattr__(self, "metric", metric.name)
        if kind.label_set:  # a closed set of classes or tags (not text, choices or answer spans per record)
            if len(self.labels) < 2:
                raise ConfigError(f"task {self.name}: give at least two labels (got {list(self.labels)})")
            dup = sorted({x for x in self.labels if self.labels.count(x) > 1})
            if dup:
                raise ConfigError(f"task {self.name}: duplicate labels {dup}")
        if self.label_words is not None:
            missing = [x for x in self.labels if x not in self.label_words]
            if missing:
                raise ConfigError(f"task {self.name}: label_words has no word for {missing}; give one per label")
        if self.label_collisions not in ("error", "drop"):
            raise ConfigError(f"task {self.name}: label_collisions={self.label_collisions!r} must be error or drop")
        if self.verbalizer_template is not None and "{mask}" not in self.verbalizer_template:
            raise ConfigError(f"task {self.name}: verbalizer_template {self.verbalizer_template!r} needs a "
                              "{mask} label slot")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ConfigError(f"task {self.name}: max_length={self.max_length!r} must be a positive integer")
        for key, low in (("doc_stride", 0), ("max_answer_length", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"task {self.name}: {key}={value!r} must be an integer >= {low}")
        if not isinstance(self.allow_no_answer, bool):
            raise ConfigError(f"task {self.name}: allow_no_answer={self.allow_no_answer!r} must be true or false")
        self._check_format()
        self._check_data_source()

    def _check_format(self) -> None:
        if self.format not in formats.FORMATS:
            raise ConfigError(f"task {self.name}: format={self.format!r} is not one of {formats.FORMATS}")
        if self.format not in ("auto", "prompt_response") and not self.kind.data_formats:
            raise ConfigError(f"task {self.name}: format={self.format} records train a causal_lm head, not {self.head}")
        for key in ("max_source_length", "max_target_length"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"task {self.name}: {key}={value!r} must be a positive integer (or unset)")

    @property
    def own_fields(self) -> tuple[str, ...]:
        """The fields of the task's own prompt/response form: its text fields and target."""
        return (*self.text_fields, *((self.target_field,) if self.target_field else ()))

    def record_format(self, rec: dict) -> str:
        """The record's format: the task's, or with ``auto`` the one its fields show (default prompt_response)."""
        if self.format != "auto":
            return self.format
        return formats.detect(rec, self.own_fields) or "prompt_response"

    def conversation(self, rec: dict, source: str = "record", labelled: bool = True) -> list[dict[str, str]] | None:
        """The record as chat turns ({role, content}), checked; None for a prompt/response record (template
        and target, as ever). See :mod:`ptune.data.formats`."""
        fmt = self.record_format(rec)
        if fmt not in formats.CHAT_FORMATS:
            return None
        return formats.conversation(fmt, rec, source, labelled=labelled, prompt_field=self.text_fields[0])

    def _check_data_source(self) -> None:
        for key in ("dataset", "config"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"task {self.name}: {key}={value!r} must be a non-empty name")
        if self.config is not None and self.dataset is None:
            raise ConfigError(f"task {self.name}: config={self.config!r} names a configuration of no dataset; "
                              "add dataset: (e.g. dataset: glue, config: sst2)")
        if self.splits is None:
            return
        if self.dataset is None:
            raise ConfigError(f"task {self.name}: splits maps the splits of no dataset; add dataset: (or drop splits "
                              "and pass --train-file / --validation-file / --test-file)")
        if not isinstance(self.splits, dict) or not all(isinstance(v, str) and v for v in self.splits.values()):
            raise ConfigError(f"task {self.name}: splits must map ptune splits to the dataset's split names, "
                              "e.g. {train: train, validation: validation, test: validation}")
        unknown = sorted(set(self.splits) - set(DATA_SPLITS))
        if unknown:
            raise ConfigError(f"task {self.name}: splits has unknown key(s) {unknown}; its keys are {list(DATA_SPLITS)}")
        object.__setattr__(self, "splits", dict(self.splits))

    def data_splits(self) -> dict[str, str]:
        """ptune split -> the dataset's split name (train and validation by their own names unless mapped)."""
        return {"train": "train", "validation": "validation", **(self.splits or {})}

    @property
    def kind(self) -> HeadKind:
        """The task's own head kind (``--head`` may put another head of the same label form on it)."""
        return head_kind(self.head)

    def words(self) -> list[str]:
        """The word a verbalizer scores for each label, in label order (default: the label itself)."""
        return [self.label_words[x] for x in self.labels] if self.label_words else list(self.labels)

    @property
    def label_to_id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["text_fields"], d["labels"], d["stop"] = list(self.text_fields), list(self.labels), list(self.stop)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "task") -> "Task":
        if "name" not in values:
            raise ConfigError(f"{source}: a task needs a name")
        values = dict(values)
        legacy_type, legacy_head = values.pop("task_type", None), values.pop("default_head", None)
        if legacy_type is not None or legacy_head is not None:  # task files written before head kinds
            if "head" in values:
                raise ConfigError(f"{source}: give head only (task_type / default_head are its old spelling)")
            if legacy_type is not None and legacy_type not in LEGACY_TASK_TYPES:
                raise ConfigError(f"{source}: task_type={legacy_type!r} is not one of {tuple(LEGACY_TASK_TYPES)}; "
                                  f"write head: one of {tuple(HEAD_KINDS)}")
            values["head"] = legacy_head or LEGACY_TASK_TYPES[legacy_type or "classification"]
        return from_values(cls, values, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Task":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"task file {path} does not exist; give a built-in task name or a YAML file")
        values = read_yaml(path)
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of task keys")
        return cls.from_dict(values, str(path))

    def validate_record(self, rec: Any, source: str, allow_unlabeled: bool = False) -> None:
        """Raise DataError naming ``source`` when ``rec`` cannot be used by this task."""
        if not isinstance(rec, dict):
            raise DataError(f"{source}: expected a record with fields, got {type(rec).__name__}")
        self.kind.validate_record(self, rec, source, allow_unlabeled)
