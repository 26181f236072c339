"""Loading records from files: CSV/TSV, JSONL, JSON, parquet, CoNLL-style tagging files, a local
``datasets`` folder, or (for online users) a hub dataset name through ``datasets``.

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
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (or {{\"data\": [...]}})")
    return [(i + 1, r) for i, r in enumerate(data)]


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


def _records_from_dataset(ds: Any) -> list[tuple[int, dict]]:
    return [(i + 1, dict(r)) for i, r in enumerate(ds)]


def _datasets_folder(path: Path, split: str | None) -> list[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds
        raise DataError(f"{path}: not a dataset saved by datasets.save_to_disk ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} holds splits {sorted(ds)}; choose one (asked for {split!r})")
        ds = ds[split]
    return _records_from_dataset(ds)


def _hub(name: str, split: str | None) -> list[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load dataset {name!r} ({type(e).__name__}); it is not a local file, and "
                        "the hub is unreachable or has no such dataset; offline, pass a local file") from None
    return _records_from_dataset(ds)


def load_records(source: str | Path, *, split: str | None = None, task: Task | None = None) -> list[dict]:
    """Records from a file, folder or hub name; validated against ``task`` when given."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _datasets_folder(path, split)
    elif path.is_file():
        readers = {".csv": lambda p: _csv(p, ","), ".tsv": lambda p: _csv(p, "\t"), ".jsonl": _jsonl,
                   ".json": _json}
        if suffix == ".parquet":
            import datasets

            try:
                rows = _records_from_dataset(datasets.Dataset.from_parquet(str(path)))
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
        elif suffix in readers:
            rows = readers[suffix](path)
        elif suffix in TAGGING_SUFFIXES:
            rows = _tagging(path)
        else:
            raise DataError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv, .jsonl, .json, .parquet "
                            "or .conll")
    elif suffix in FILE_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise DataError(f"data file {source} does not exist")
    else:
        rows = _hub(str(source), split)
    if not rows:
        raise DataError(f"{source}: no records")
    if task is not None:
        for line, rec in rows:
            task.validate_record(rec, f"{source} line {line}")
    return [rec for _, rec in rows]
