"""Loading records from files: CSV/TSV, JSONL, JSON (records, or SQuAD's data -> paragraphs -> qas), parquet,
CoNLL-style tagging files, a local ``datasets`` folder, or (for online users) a hub dataset name through ``datasets``.

A dataset with configurations is named ``DATASET:CONFIG[:SPLIT]`` (``glue:sst2``, ``glue:sst2:validation``,
``imdb::test``), or by a task YAML's ``dataset`` / ``config`` / ``splits``. ``DATASET`` is a hub name or
a local folder holding one ``save_to_disk`` folder per configuration (``glue/sst2``, ``glue/mrpc``).
Without a split the caller's (the split being loaded: train, validation, test) is used. Class-label
columns arrive as their names (GLUE's 0/1 as negative/positive); a hidden label (-1, GLUE's test
sets) arrives as missing.

Every failure is a :class:`DataError` naming the file, the line where it applies, and the problem:
a malformed row, bad JSON, non-UTF-8 bytes, an empty file, a record the task cannot use.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from . import formats
from .tasks import Task

TAGGING_SUFFIXES = (".conll", ".bio", ".iob", ".txt")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", *TAGGING_SUFFIXES)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: bytes at offset {e.start} are not UTF-8; "
                        "re-save the file as UTF-8") from None


def _csv(path: Path, delimiter: str) -> list[tuple[int, dict]]:
    text = _read_text(path)
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes; is it really a text file?")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{path}: no header row; the first line must name the columns")
        header = [h.strip() for h in header]
        out = []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path} line {reader.line_num}: expected {len(header)} fields "
                                f"({', '.join(header)}), got {len(row)}")
            out.append((reader.line_num, dict(zip(header, row))))
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: {e}") from None
    return out


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path} line {n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    return out


def _json(path: Path) -> list[tuple[int, dict]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, list) and data and all(isinstance(r, dict) and "paragraphs" in r for r in data):
        return _squad(path, data)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (or {{\"data\": [...]}})")
    return [(i + 1, r) for i, r in enumerate(data)]


def _squad(path: Path, articles: list[dict]) -> list[tuple[int, dict]]:
    """SQuAD JSON (``data`` -> ``paragraphs`` -> ``qas``) as flat records, one per question (numbered in file
    order): ``id``, ``title``, ``question``, ``context``, ``answers`` as ``{"text": [...], "answer_start": [...]}``
    and, where given, ``is_impossible`` (SQuAD 2.0)."""
    out: list[tuple[int, dict]] = []
    for a, article in enumerate(articles, 1):
        paragraphs = article["paragraphs"]
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: article {a}: 'paragraphs' must be a list")
        for paragraph in paragraphs:
            if not (isinstance(paragraph, dict) and isinstance(paragraph.get("context"), str)
                    and isinstance(paragraph.get("qas"), list)):
                raise DataError(f"{path}: article {a}: each paragraph needs 'context' (text) and 'qas' (a list)")
            for qa in paragraph["qas"]:
                answers = qa.get("answers", []) if isinstance(qa, dict) else None
                if not isinstance(answers, list) or not all(isinstance(x, dict) for x in answers):
                    raise DataError(f"{path}: question {len(out) + 1}: expected an object with 'question' and "
                                    "'answers' (a list of {\"text\", \"answer_start\"})")
                rec = {"id": qa.get("id"), "title": article.get("title"), "question": qa.get("question"),
                       "context": paragraph["context"],
                       "answers": {"text": [x.get("text") for x in answers],
                                   "answer_start": [x.get("answer_start") for x in answers]}}
                if "is_impossible" in qa:
                    rec["is_impossible"] = bool(qa["is_impossible"])
                out.append((len(out) + 1, rec))
    return out


def _tagging(path: Path) -> list[tuple[int, dict]]:
    out, tokens, tags, start = [], [], [], 1
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            if tokens:
                out.append((start, {"tokens": tokens, "tags": tags}))
            tokens, tags, start = [], [], n + 1
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[-1].strip():
            raise DataError(f"{path} line {n}: expected 'token<TAB>tag', got {line[:60]!r}")
        tokens.append(parts[0].strip())
        tags.append(parts[-1].strip())
    if tokens:
        out.append((start, {"tokens": tokens, "tags": tags}))
    return out


def _class_label_columns(ds: Any, task: Task | None) -> dict[str, Any]:
    """Columns whose values are class-label ids (or lists of them): column -> its ClassLabel. A task whose
    labels are the ids themselves ("0", "1", ...) keeps them as numbers."""
    import datasets

    out = {}
    for name, feature in (getattr(ds, "features", None) or {}).items():
        inner = getattr(feature, "feature", None)
        label = feature if isinstance(feature, datasets.ClassLabel) else inner
        if not isinstance(label, datasets.ClassLabel):
            continue
        if task is not None and set(task.labels) == {str(i) for i in range(label.num_classes)}:
            continue
        out[name] = label
    return out


def _records_from_dataset(ds: Any, task: Task | None = None) -> list[tuple[int, dict]]:
    names = _class_label_columns(ds, task)

    def name_of(label: Any, value: Any) -> Any:
        return None if value is None or value < 0 else label.int2str(int(value))  # -1: a hidden label

    rows = []
    for i, r in enumerate(ds):
        rec = dict(r)
        for col, label in names.items():
            value = rec.get(col)
            rec[col] = [name_of(label, v) for v in value] if isinstance(value, list) else name_of(label, value)
        rows.append((i + 1, rec))
    return rows


def _datasets_folder(path: Path, split: str | None, task: Task | None = None) -> list[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds
        raise DataError(f"{path}: not a dataset saved by datasets.save_to_disk ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} holds splits {sorted(ds)}; choose one (asked for {split!r})")
        ds = ds[split]
    return _records_from_dataset(ds, task)


def _first_line(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _hub(name: str, config: str | None, split: str, task: Task | None = None) -> list[tuple[int, dict]]:
    import datasets

    what = f"{name!r}" + (f" configuration {config!r}" if config else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(path=name, name=config, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load dataset {what} ({_first_line(e)}); it is not a local file or folder, and "
                        "the hub is unreachable or has no such dataset; offline, pass a local file") from None
    return _records_from_dataset(ds, task)


def parse_dataset_source(source: str) -> tuple[str, str | None, str | None] | None:
    """``DATASET:CONFIG[:SPLIT]`` -> (dataset, config or None, split or None); None when ``source`` has no colon."""
    if ":" not in source or "://" in source:
        return None
    parts = source.split(":")
    if len(parts) > 3 or not parts[0]:
        raise DataError(f"{source!r}: write a dataset with a configuration as DATASET:CONFIG or DATASET:CONFIG:SPLIT "
                        "(e.g. glue:sst2, glue:sst2:validation, imdb::test)")
    dataset, config, split = (parts + [""] * 3)[:3]
    return dataset, config or None, split or None


def _looks_like_path(source: str) -> bool:
    return Path(source).suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~"))


def _dataset_rows(dataset: str, config: str | None, split: str | None, task: Task | None) -> list[tuple[int, dict]]:
    """A split of a dataset by configuration: a local folder (``DATASET/CONFIG`` saved with save_to_disk)
    or a hub dataset."""
    label = f"{dataset}:{config or ''}"
    if split is None:
        raise DataError(f"{label}: name the split to load, e.g. {label}:validation")
    path = Path(dataset).expanduser()
    if path.is_dir():
        folder = path / config if config else path
        if not folder.is_dir():
            held = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(f"{path} has no configuration folder {config!r} (it holds {held}); save one with "
                            f"datasets.load_dataset(..., {config!r}).save_to_disk('{folder}')")
        return _datasets_folder(folder, split, task)
    if _looks_like_path(dataset):
        raise DataError(f"dataset folder {dataset} does not exist")
    return _hub(dataset, config, split, task)


def _checked(rows: list[tuple[int, dict]], source: str, task: Task | None) -> list[dict]:
    if not rows:
        raise DataError(f"{source}: no records")
    if task is not None:
        hidden = [line for line, rec in rows if rec.get(task.label_field, "") is None]
        if hidden and len(hidden) == len(rows):
            raise DataError(f"{source}: every label is hidden (-1, as in GLUE's test sets); score on a labelled "
                            "split instead (a task YAML's splits: {test: validation}, or DATASET:CONFIG:validation)")
        for line, rec in rows:
            task.validate_record(rec, f"{source} line {line}")
        if task.kind.data_formats and task.format == "auto":  # one data format per file
            formats.file_format(rows, source, task.own_fields)
    return [rec for _, rec in rows]


def load_dataset_split(dataset: str, config: str | None, split: str, *, task: Task | None = None) -> list[dict]:
    """One split of a dataset named by configuration (a task YAML's ``dataset`` / ``config``)."""
    return _checked(_dataset_rows(dataset, config, split, task), f"{dataset}:{config or ''}:{split}", task)


def load_records(source: str | Path, *, split: str | None = None, task: Task | None = None) -> list[dict]:
    """Records from a file, folder, ``DATASET:CONFIG[:SPLIT]`` or hub name; validated against ``task`` when given."""
    return _checked(_rows(source, split, task), str(source), task)


def data_format(source: str | Path, *, split: str | None = None) -> str | None:
    """The generation data format (:mod:`ptune.data.formats`) the records of ``source`` show, None when they
    show none (e.g. text/label records); DataError naming the record where a file mixes formats."""
    rows = _rows(source, split, None)
    if not rows:
        raise DataError(f"{source}: no records")
    return formats.file_format(rows, str(source))


def _rows(source: str | Path, split: str | None, task: Task | None) -> list[tuple[int, dict]]:
    path = Path(source)
    suffix = path.suffix.lower()
    named = None if path.exists() else parse_dataset_source(str(source))
    if named is not None:
        dataset, config, own_split = named
        rows = _dataset_rows(dataset, config, own_split or split, task)
    elif path.is_dir():
        rows = _datasets_folder(path, split, task)
    elif path.is_file():
        readers = {".csv": lambda p: _csv(p, ","), ".tsv": lambda p: _csv(p, "\t"), ".jsonl": _jsonl,
                   ".json": _json}
        if suffix == ".parquet":
            import datasets

            try:
                rows = _records_from_dataset(datasets.Dataset.from_parquet(str(path)), task)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
        elif suffix in readers:
            rows = readers[suffix](path)
        elif suffix in TAGGING_SUFFIXES:
            rows = _tagging(path)
        else:
            raise DataError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv, .jsonl, .json, .parquet "
                            "or .conll")
    elif _looks_like_path(str(source)):
        raise DataError(f"data file {source} does not exist")
    else:
        rows = _hub(str(source), None, split or "train", task)
    return rows
