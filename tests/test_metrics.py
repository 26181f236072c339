"""Metrics against hand-computed values."""

from __future__ import annotations

import pytest

from ptune.data import Task
from ptune.metrics import accuracy, compute_metrics, entity_scores, macro_f1


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
    task = Task(name="t", task_type="tagging", text_fields=("tokens",), label_field="tags",
                labels=("O", "B-per", "I-per", "B-loc", "B-org"))
    m = compute_metrics(task, preds, refs)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(5 / 6)
