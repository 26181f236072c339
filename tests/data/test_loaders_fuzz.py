"""Property-based fuzzing of the loaders: any bytes give records or a DataError, nothing else."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptune.data import Task, load_records
from ptune.errors import DataError

TASK = Task(name="t", labels=("pos", "neg"))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
lines = st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                           st.sampled_from([b"text,label", b"good,pos", b'{"text": "a", "label": "pos"}',
                                            b"tok\tO", b"", b'"unclosed', b"\xff\xfe"])), max_size=8)


def _load(suffix: str, data: bytes, task=None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"f{suffix}"
        p.write_bytes(data)
        try:
            out = load_records(p, task=task)
        except DataError as e:
            assert str(e)
            return
        assert isinstance(out, list) and out and all(isinstance(r, dict) for r in out)


@FUZZ
@given(lines, st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".conll"]), st.booleans())
def test_any_bytes_load_or_fail_cleanly(parts, suffix, with_task):
    _load(suffix, b"\n".join(parts), TASK if with_task else None)
