"""Batching must not change answers: padding invariance, per-row task selection, tagging alignment.

A row's output may depend only on that row (and its task id), never on the rows it is batched with.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cases import method_config, methods
from conftest import liven, tiny_base

import ptune
from ptune.batching import collate



METHODS = methods(lambda c: c.prompts, variants=("p_tuning-mlp-layernorm",))  # tests/cases.py

SHORT = "a goal"
LONGER = ["the striker scored a late goal in the final minute of the match",
          "whisk the eggs with sugar then fold in the flour and bake slowly"]




def make(method: str, arch: str, tokenizer, head: str = "classification", num_tasks: int = 1):
    decoder = arch != "bert"
    kind = "causal_lm" if head == "causal_lm" else "backbone"
    config = method_config(method)
    if num_tasks != 1:
        config = dataclasses.replace(config, num_tasks=num_tasks)
    hc = ptune.HeadConfig(head, num_labels=3, dropout=0.0) if head != "causal_lm" else ptune.HeadConfig("causal_lm")
    model = ptune.apply(liven(tiny_base(arch, kind)), config, head=hc, tokenizer=tokenizer).eval()
    return model, ptune.TemplateEncoder(model.template, tokenizer, causal=decoder)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_padding_invariance(method, arch, tokenizer):
    model, enc = make(method, arch, tokenizer)
    short = enc.encode({"text": SHORT})
    longer = [enc.encode({"text": t}) for t in LONGER]
    with torch.no_grad():
        alone = model(**collate([short], pad_id=0)).logits[0]
        batched = model(**collate([longer[0], short, longer[1]], pad_id=0))
    assert batched.logits.shape[0] == 3
    torch.testing.assert_close(batched.logits[1], alone, atol=1e-5, rtol=0)
    # the test can see a difference: the rows really differ
    assert not torch.allclose(batched.logits[0], batched.logits[1], atol=1e-3)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_padding_invariance_per_token(method, arch, tokenizer):
    """Tagging logits at the real positions of the short row are unchanged by padding."""
    model, enc = make(method, arch, tokenizer, head="tagging")
    short = enc.encode({"text": SHORT})
    n = len(short.input_ids)
    with torch.no_grad():
        alone = model(**collate([short], pad_id=0)).logits[0]
        batched = model(**collate([enc.encode({"text": LONGER[0]}), short], pad_id=0)).logits[1]
    assert batched.shape[0] > n
    torch.testing.assert_close(batched[:n], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_padding_invariance_causal_lm(method, tokenizer):
    model, enc = make(method, "llama", tokenizer, head="causal_lm")
    short = enc.encode({"text": SHORT})
    n = len(short.input_ids)
    with torch.no_grad():
        alone = model(**collate([short], pad_id=0)).logits[0]
        batched = model(**collate([short, enc.encode({"text": LONGER[1]})], pad_id=0)).logits[0]
    torch.testing.assert_close(batched[:n], alone, atol=1e-5, rtol=0)


def _distinct_tasks(model) -> None:
    """Tasks start as copies of one another; make task 1's trainable table differ."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.adapter.named_parameters():
            if p.dim() == 3 and p.shape[0] == 2:  # (num_tasks, N, d) tables
                p[1] += torch.randn(p[1].shape, generator=gen) * p[0].std()


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_mixed_task_batch_matches_rows_run_alone(method, arch, tokenizer):
    model, enc = make(method, arch, tokenizer, num_tasks=2)
    _distinct_tasks(model)
    rows = [enc.encode({"text": SHORT}), enc.encode({"text": LONGER[0]}), enc.encode({"text": LONGER[1]})]
    task_ids = [0, 1, 1]
    with torch.no_grad():
        mixed = model(**collate(rows, pad_id=0, task_ids=task_ids)).logits
        for i, (row, t) in enumerate(zip(rows, task_ids)):
            alone = model(**collate([row], pad_id=0, task_ids=[t])).logits[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
        # the task id is honoured: the same row under the other task gives another answer
        other = model(**collate(rows[:1], pad_id=0, task_ids=[1])).logits[0]
        assert not torch.allclose(other, mixed[0], atol=1e-4)
        # no task_ids means task 0 for every row
        default = model(**collate(rows, pad_id=0)).logits
        zeros = model(**collate(rows, pad_id=0, task_ids=[0, 0, 0])).logits
        torch.testing.assert_close(default, zeros, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_tagging_predictions_line_up_with_words(arch, tokenizer):
    """Train a tagger under an infix template, then read one prediction per word through word_ids."""
    tag_of = {"john": 1, "mary": 1, "paris": 2, "london": 2}  # others: 0 ("O")
    sentences = [["John", "lives", "in", "Paris"], ["Mary", "unbelievably", "loves", "London"],
                 ["we", "met", "John", "in", "London", "today"], ["Paris"]]
    tags = [[tag_of.get(w.lower(), 0) for w in s] for s in sentences]
    config = ptune.PTuningConfig(template="[P:2] {tokens} [P:1] end", encoder="mlp")
    base = liven(tiny_base(arch))
    model = ptune.apply(base, config, head=ptune.HeadConfig("tagging", num_labels=3, dropout=0.0),
                        tokenizer=tokenizer, template="{tokens}")
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=arch != "bert")
    encoded = [enc.encode({"tokens": s}, tagging_field="tokens", tags=t) for s, t in zip(sentences, tags)]
    batch = collate(encoded, pad_id=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)  # (B, T)
    for i, e in enumerate(encoded):
        words = [-1] * e.num_words
        for pos, w in enumerate(e.word_ids):
            if w >= 0:
                words[w] = int(pred[i, pos])
        assert words == tags[i], f"row {i}: {sentences[i]}"
        # labelled positions are exactly the word starts, and they hold the word's tag
        labelled = (batch["labels"][i] != -100).nonzero().flatten().tolist()
        assert labelled == [pos for pos, w in enumerate(e.word_ids) if w >= 0]
        assert all(batch["virtual_index"][i, pos] == -1 for pos in labelled)
