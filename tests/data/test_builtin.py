"""Built-in tasks: the real packaged data, split the documented way."""

from __future__ import annotations

from collections import Counter

from ptune.data import load_builtin


def test_bbc_splits_are_stratified_disjoint_and_fixed():
    task, splits = load_builtin("bbc")
    assert task.labels == ("business", "entertainment", "politics", "sports", "tech")
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 1777, "validation": 223, "test": 225} and sum(sizes.values()) == 2225
    ids = [set(r["id"] for r in v) for v in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    total = Counter(r["label"] for v in splits.values() for r in v)
    assert total == {"sports": 511, "business": 510, "politics": 417, "tech": 401, "entertainment": 386}
    for name, frac in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        got = Counter(r["label"] for r in splits[name])
        for label, n in total.items():
            assert abs(got[label] - frac * n) <= 1.5, (name, label)
    _, again = load_builtin("bbc")
    assert [r["id"] for r in again["test"]] == [r["id"] for r in splits["test"]]
    _, other = load_builtin("bbc", seed=1)
    assert [r["id"] for r in other["test"]] != [r["id"] for r in splits["test"]]


def test_wnut_sentences_and_tags():
    task, splits = load_builtin("wnut")
    assert sum(len(v) for v in splits.values()) == 2394
    assert task.labels[0] == "O" and len(task.labels) == 21  # O + B/I for 10 entity types
    assert sum(len(r["tokens"]) for v in splits.values() for r in v) == 46469
    for v in splits.values():
        for r in v:
            task.validate_record(r, "wnut")
