"""Data files: every format loads, and every broken file fails naming the file, the line and the problem."""

from __future__ import annotations

import json

import pytest

from ptune.data import Task, load_records
from ptune.errors import ConfigError, DataError

TASK = Task(name="t", labels=("pos", "neg"))


def write(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def test_csv_jsonl_json_tsv_roundtrip(tmp_path):
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad, sad film", "label": "neg"}]
    csv_p = write(tmp_path, "a.csv", 'text,label\ngood film,pos\n"bad, sad film",neg\n')
    tsv_p = write(tmp_path, "a.tsv", "text\tlabel\ngood film\tpos\nbad, sad film\tneg\n")
    jsonl_p = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    json_p = write(tmp_path, "a.json", json.dumps({"data": rows}))
    for p in (csv_p, tsv_p, jsonl_p, json_p):
        assert load_records(p, task=TASK) == rows


def test_parquet_and_datasets_folder(tmp_path):
    import datasets

    rows = {"text": ["good film", "bad film"], "label": ["pos", "neg"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    assert [r["text"] for r in load_records(tmp_path / "a.parquet", task=TASK)] == rows["text"]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "folder"))
    assert len(load_records(tmp_path / "folder", split="train", task=TASK)) == 2
    with pytest.raises(DataError, match="splits"):
        load_records(tmp_path / "folder", split="test")


def test_conll_tagging_file(tmp_path):
    p = write(tmp_path, "a.conll", "Paris\tB-geo\nis\tO\n\nBob\tB-per\n")
    assert load_records(p) == [{"tokens": ["Paris", "is"], "tags": ["B-geo", "O"]},
                               {"tokens": ["Bob"], "tags": ["B-per"]}]
    bad = write(tmp_path, "b.conll", "Paris\tB-geo\nis O\n")
    with pytest.raises(DataError, match=r"b.conll line 2: expected 'token<TAB>tag'"):
        load_records(bad)


@pytest.mark.parametrize("name, content, message", [
    ("bad.csv", "text,label\ngood,pos\nbad,neg,extra\n", r"bad.csv line 3: expected 2 fields"),
    ("bad.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": \n', r"bad.jsonl line 2: not valid JSON"),
    ("list.jsonl", '["a", "pos"]\n', r"list.jsonl line 1: expected a JSON object"),
    ("empty.csv", "", "no header row"),
    ("header_only.csv", "text,label\n", "no records"),
    ("nolabel.csv", "text\ngood\n", r"nolabel.csv line 2: missing label field 'label'"),
    ("notext.csv", "body,label\ngood,pos\n", r"missing text field 'text'"),
    ("emptytext.csv", "text,label\n   ,pos\n", r"emptytext.csv line 2: text field 'text' is empty"),
    ("unknown.csv", "text,label\ngood,neutral\n", r"unknown label 'neutral'; the task's labels are \['pos', 'neg'\]"),
    ("a.xlsx", "whatever", "unknown file type '.xlsx'"),
])
def test_bad_files_name_file_line_and_problem(tmp_path, name, content, message):
    p = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        load_records(p, task=TASK)


def test_non_utf8_bytes(tmp_path):
    p = write(tmp_path, "latin.csv", b"text,label\ncaf\xe9 ok,pos\n", mode="wb")
    with pytest.raises(DataError, match=r"latin.csv line 2: bytes at offset 14 are not UTF-8"):
        load_records(p, task=TASK)


def test_missing_file_and_offline_hub_name(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.csv")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="offline, pass a local file"):
        load_records("no-such-user/no-such-dataset-xyz")


def test_task_yaml_roundtrip_and_errors(tmp_path):
    t = Task(name="x", labels=("a", "b"), label_words={"a": "apple", "b": "banana"}, template="{text} {mask}")
    p = tmp_path / "task.yaml"
    import yaml

    p.write_text(yaml.safe_dump(t.to_dict()))
    assert Task.from_yaml(p) == t
    p.write_text("name: x\nlabels: [a, b]\ncolour: red\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['colour'\]"):
        Task.from_yaml(p)
    with pytest.raises(ConfigError, match="label_words has no word for"):
        Task(name="x", labels=("a", "b"), label_words={"a": "apple"})
    with pytest.raises(ConfigError, match="duplicate labels"):
        Task(name="x", labels=("a", "a"))
    with pytest.raises(ConfigError, match="head='regression' is not one of"):
        Task(name="x", head="regression", labels=("a", "b"))
    with pytest.raises(ConfigError, match="task_type='regression' is not one of"):  # the old key, in a file
        Task.from_dict({"name": "x", "task_type": "regression", "labels": ["a", "b"]})
    # old task files still load: task_type (and default_head) become head
    assert Task.from_dict({"name": "x", "task_type": "tagging", "labels": ["O", "B-x"]}).head == "tagging"
    assert Task.from_dict({"name": "x", "task_type": "classification", "default_head": "verbalizer",
                           "labels": ["a", "b"]}).head == "verbalizer"
    with pytest.raises(ConfigError, match="does not fit a tagging head"):
        Task(name="x", head="tagging", labels=("O", "B-x"), metric="macro_f1")
    p.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # configs are data: nothing is evaluated
        Task.from_yaml(p)
