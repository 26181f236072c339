"""Metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from ptune.data import Task
from ptune.metrics import accuracy, entity_scores, macro_f1
from ptune.models import load_tokenizer
from ptune.templates import TemplateEncoder


def test_accuracy_and_macro_f1():
    preds = ["a", "a", "b", "c", "c", "c"]
    refs = ["a", "b", "b", "c", "a", "c"]
    assert accuracy(preds, refs) == pytest.approx(4 / 6)
    # a: tp1 fp1 fn1 -> 0.5; b: tp1 fp0 fn1 -> 2/3; c: tp2 fp1 fn0 -> 0.8
    assert macro_f1(preds, refs) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_entity_scores_are_entity_level():
    refs = [["B-per", "I-per", "O", "B-loc"], ["O", "B-org"]]
    preds = [["B-per", "O", "O", "B-loc"], ["O", "B-org"]]
    s = entity_scores(preds, refs)  # truncated person span is wrong: 2 of 3 right each way
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    task = Task(name="t", head="tagging", text_fields=("tokens",), label_field="tags",
                labels=("O", "B-per", "I-per", "B-loc", "B-org"), metric="entity_f1")
    assert task.metric == "f1"  # the old name of the main metric still reads
    enc = TemplateEncoder("{tokens}", load_tokenizer("minilm"), max_length=32)
    examples = [task.kind.encode(task, enc, {"tokens": ["w"] * len(r), "tags": r}, True) for r in refs]
    rows = []  # scores that put each predicted tag first at each word's (single) sub-token
    for ex, pred in zip(examples, preds):
        row = torch.zeros(len(ex.encoded.input_ids), len(task.labels))
        for pos, w in enumerate(ex.encoded.word_ids):
            if w >= 0:
                row[pos, task.label_to_id[pred[w]]] = 1.0
        rows.append(row)
    m = task.kind.compute_metrics(task, examples, rows)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(5 / 6)
