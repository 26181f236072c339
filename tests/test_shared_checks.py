"""One matrix, every shared check: method x architecture x head x {plain base, 4-bit NF4 base}.

Each case builds a model the way a user would (``ptune.apply``), trains it a few steps so every
adapter tensor is non-trivial (LoRA's B starts at zero), then checks what users rely on, for every
method alike:

- forward: the head's logits shape and a finite loss;
- base untouched: every frozen tensor of the base is bit-identical after training;
- save/load: the saved adapter, loaded onto a fresh copy of the base, gives the same logits;
- padding invariance: a row scored alone equals the same row in a padded batch;
- disable_adapter(): inside it the body computes exactly what the untouched base computes, and after
  it the adapted outputs come back (full fine-tuning keeps no copy of the original weights, so it
  refuses, with a message saying so).

Adding a method, an architecture or a head is one row in tests/cases.py; this matrix picks it up.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import ARCH_CASES, HEAD_CASES, METHOD_CASES, fits, method_config, methods
from conftest import liven, tiny_base, train_steps

import ptune
from ptune.batching import collate
from ptune.quantize import quantize_model

# every trained method x every architecture x every head it carries, plain and on a 4-bit base (tests/cases.py)
CASES = [(m, a, h, q) for a, arch in ARCH_CASES.items() for h in arch.heads for m in methods()
         for q in (None, "nf4") if fits(m, a, q)]


_BUILT: dict = {}  # (arch, kind) -> (the livened base as built, the global RNG state building it left)


def make_base(arch: str, kind: str, quant: str | None):
    """A deterministic tiny base: calling it twice gives two identical models. Each (arch, kind) is built once
    (its random initialisation is most of a case's time) and copied; the global RNG is set to the state building
    it leaves, so what a case draws next (the adapter's initialisation) is what it drew with a fresh build."""
    if (arch, kind) not in _BUILT:
        _BUILT[arch, kind] = liven(tiny_base(arch, kind)), torch.get_rng_state()
    built, rng = _BUILT[arch, kind]
    base = copy.deepcopy(built)
    torch.set_rng_state(rng)
    return quantize_model(base, quant) if quant else base


def build(method: str, arch: str, head: str, quant: str | None, tokenizer):
    """(model, rows, targets, batch, make_fresh_base) for one case; 4 rows of different lengths."""
    h, decoder = HEAD_CASES[head], ARCH_CASES[arch].decoder
    kind = h.base_kind(decoder)
    config = method_config(method, field=h.field, tail=h.tail)
    model = ptune.apply(make_base(arch, kind, quant), config, head=h.head_config(), tokenizer=tokenizer,
                        template=h.template(), labels=h.labels)
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=decoder)
    rows, targets = h.examples(enc)
    batch = collate(rows, pad_id=tokenizer.pad_token_id, targets=targets)
    return model, rows, targets, batch, lambda: make_base(arch, kind, quant)


@pytest.mark.parametrize("method, arch, head, quant", CASES,
                         ids=[f"{m}-{a}-{h}-{q or 'plain'}" for m, a, h, q in CASES])
def test_shared_checks(method, arch, head, quant, tokenizer, tmp_path):
    torch.manual_seed(0)
    model, rows, targets, batch, fresh_base = build(method, arch, head, quant, tokenizer)

    # forward
    out = model(**batch)
    want = HEAD_CASES[head].shape(len(rows), batch["input_ids"].shape[1])
    assert tuple(out.logits.shape) == want and torch.isfinite(out.loss)

    # a few steps, then the frozen part of the base is bit-identical
    trainable = {p.data_ptr() for p in model.base.parameters() if p.requires_grad}  # tied names share storage
    frozen = {k: v.clone() for k, v in model.base.state_dict().items() if v.data_ptr() not in trainable}
    train_steps(model, batch, steps=3, lr=1e-2)
    changed = [k for k, v in model.base.state_dict().items() if k in frozen and not torch.equal(v, frozen[k])]
    assert not changed, f"frozen base tensors changed: {changed[:3]}"
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits

    # save -> load onto a fresh copy of the base -> same outputs
    path = ptune.save_adapter(model, tmp_path / "adapter")
    loaded = ptune.load_adapter(path, base=fresh_base(), tokenizer=tokenizer).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, atol=1e-5, rtol=1e-4)

    # padding invariance: each row alone equals its row in the padded batch (a 4-bit base computes in bf16,
    # whose kernels round differently for other shapes)
    tol = 5e-2 if quant else 1e-4
    h = HEAD_CASES[head]
    with torch.no_grad():
        for j, row in enumerate(rows):
            alone = collate([row], pad_id=tokenizer.pad_token_id, targets=[targets[j]] if targets else None)
            n = len(row.input_ids)
            got, want_row = h.real(model(**alone).logits[0], j, n), h.real(logits[j], j, n)
            torch.testing.assert_close(got, want_row, atol=tol, rtol=tol)

    # disable_adapter(): exactly the untouched base, then the adapter again
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "virtual_index")}
    if not METHOD_CASES[method].keeps_base:
        with pytest.raises(ptune.ConfigError, match="keeps no copy"):
            with model.disable_adapter():
                pass
        return
    reference = ptune.models.backbone_of(fresh_base())
    with torch.no_grad():  # the base fed its own embeddings of the same ids (as ptune feeds every base)
        embeds = reference.get_input_embeddings()(batch["input_ids"])
        want_hidden = reference(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        with model.disable_adapter():
            got = model.hidden_states(**inputs)
        torch.testing.assert_close(got, want_hidden, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(model.hidden_states(**inputs), want_hidden, atol=1e-4)  # the adapter is back
        torch.testing.assert_close(model(**batch).logits, logits)


def test_every_method_and_head_has_a_row_and_is_in_the_matrix():
    """tests/cases.py has a row for every registered method and head kind (a new one fails here until it has
    its row), the rows' flags say what the library says, and the matrix covers every row."""
    assert set(METHOD_CASES) == set(ptune.methods.METHODS), "add a MethodCase row in tests/cases.py"
    assert set(HEAD_CASES) == set(ptune.HEAD_KINDS), "add a HeadCase row in tests/cases.py"
    for name, h in HEAD_CASES.items():
        kind = ptune.HEAD_KINDS[name]
        assert kind.base_kinds[0] == h.base_kind(decoder=False) or h.decoder_only, name
        assert kind.base_kinds[-1] == h.base_kind(decoder=True), name
        assert (h.base == "lm") == (set(kind.base_kinds) == {"masked_lm", "causal_lm"}), name
    for a in ARCH_CASES.values():
        assert set(a.heads) <= set(HEAD_CASES) and not any(HEAD_CASES[h].elsewhere for h in a.heads), a.name
        assert a.decoder or not any(HEAD_CASES[h].decoder_only for h in a.heads), a.name

    covered = {(m, h) for m, _, h, _ in CASES}
    assert {m for m, _ in covered} == {m for m, c in METHOD_CASES.items() if c.trained}
    assert {h for _, h in covered} == {h for h, c in HEAD_CASES.items() if not c.elsewhere}
    assert any(q for *_, q in CASES)
    # heads whose base the tiny zoo does not build: their file runs the same checks on theirs (T5: forward,
    # base untouched, save/load, padding invariance, disable_adapter() for every method that fits it)
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for head, h in HEAD_CASES.items():
        if h.elsewhere:
            text = (root / h.elsewhere).read_text()
            assert f'HeadConfig("{head}")' in text and "padded_batch" in text and "disable_adapter" in text, h.elsewhere
            assert "METHOD_CASES" in text or "methods(" in text, f"{h.elsewhere} draws its methods from tests/cases.py"


def test_adapters_meet_the_protocol(tokenizer):
    """Every method's adapter meets the Adapter protocol, and its row's flags say what the adapter does."""
    from ptune.methods.base import Adapter, PeftExportable, TrainingHooks

    for method, case in METHOD_CASES.items():
        quant = "nf4" if case.base_4bit == "only" else None
        if not case.trained:  # nothing trained: the hand-written prompt needs a verbalizer
            model, *_ = build_manual(tokenizer)
        else:
            model, *_ = build(method, "llama64" if quant else "bert", "classification", quant, tokenizer)
        assert isinstance(model.adapter, Adapter), method
        assert isinstance(model.adapter, TrainingHooks) == case.loop_hooks, method
        assert model.adapter.trains_base == case.trains_base, method
        assert isinstance(model.adapter, PeftExportable) == case.peft_exportable, method
        assert hasattr(model.adapter, "merge") == (case.mergeable or method == "qlora"), method  # QLoRA refuses it
        assert (model.template.num_virtual_tokens > 0) == case.input_prompts, method
        assert (model.trainable_parameters()[0] > 0) == case.trained, method


def build_manual(tokenizer):
    h = HEAD_CASES["verbalizer"]
    model = ptune.apply(make_base("bert", "masked_lm", None), METHOD_CASES["manual"].config(), head=h.head_config(),
                        tokenizer=tokenizer, template=h.template(), labels=h.labels)
    return (model,)
