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

Adding a method, an architecture or a head adds rows here (``METHODS``, ``HEADS``, ``allowed``).
"""

from __future__ import annotations


import pytest
import torch
import transformers as tf
from conftest import liven, tiny_base, train_steps

import ptune
from ptune.batching import collate
from ptune.quantize import quantize_model

METHODS = {
    "prompt_tuning": lambda: ptune.PromptTuningConfig(num_virtual_tokens=3),
    "p_tuning": lambda: ptune.PTuningConfig(template="[P:2] {field} [P:1] end", encoder="lstm", encoder_hidden_size=8),
    "p_tuning_v2": lambda: ptune.PTuningV2Config(num_virtual_tokens=3),
    "prefix_tuning": lambda: ptune.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "lora": lambda: ptune.LoraConfig(r=2),
    "adalora": lambda: ptune.AdaLoraConfig(init_r=3, target_r=2, total_step=10),
    "bitfit": lambda: ptune.BitFitConfig(),
    "full": lambda: ptune.FullFinetuneConfig(),
    "qlora": lambda: ptune.QLoraConfig(r=2),
}
PLAIN_HEADS = {  # the heads each tiny architecture can carry (test_methods_matrix.py shares this table)
    "bert": ("classification", "tagging", "verbalizer"),
    "roberta": ("classification", "tagging"),
    "gpt2": ("classification", "tagging", "verbalizer", "causal_lm"),
    "llama": ("classification", "tagging", "verbalizer", "causal_lm"),
    "gemma3": ("classification", "tagging", "causal_lm"),
}
HEADS = {**PLAIN_HEADS, "llama64": ("classification", "causal_lm")}  # 4-bit cases: whole NF4 blocks wide
for _arch in ("bert", "gpt2"):  # multiple choice: the body sees one plain row per choice, on an encoder and a decoder
    HEADS[_arch] = (*HEADS[_arch], "multiple_choice")
HEADS["gpt2"] = (*HEADS["gpt2"], "multiple_choice_lm")  # choices scored by the causal LM's own log-probs
for _arch in ("bert", "gpt2"):  # span QA: start / end logits per position of each context window
    HEADS[_arch] = (*HEADS[_arch], "span_qa")
MC = {"verbalizer": " {mask}", "multiple_choice": " {choice}", "multiple_choice_lm": " {choice}",
      "span_qa": " [SEP] {context}"}  # template tails
QA = [("what happened?", "a draw"), ("stir what?", "the sauce"), ("what won?", "a late goal"), ("why?", None)]
NO_BIAS = {"llama", "gemma3", "llama64"}  # built without bias terms: BitFit is refused there by design


def allowed(method: str, arch: str, quant: str | None) -> bool:
    if (quant is not None) != (arch == "llama64"):
        return False  # the 4-bit dimension runs on llama64, the plain one on the tiny zoo
    if method == "qlora":
        return quant is not None  # QLoRA is LoRA on a 4-bit base, by definition
    if method == "full":
        return quant is None  # 4-bit weights cannot be fine-tuned directly
    return not (method == "bitfit" and arch in NO_BIAS)


CASES = [(m, a, h, q) for a, heads in HEADS.items() for h in heads for m in METHODS for q in (None, "nf4")
         if allowed(m, a, q)]

TEXTS = ["the match ended in a draw", "stir the sauce gently", "a late goal won the cup", "bake the bread"]
WORDS = [["John", "lives", "in", "Paris"], ["unbelievably", "good", "pasta"], ["the", "team", "won"],
         ["Kuala", "Lumpur"]]
TAGS = [[1, 0, 0, 2], [0, 0, 3], [0, 1, 0], [2, 2]]
TARGETS = [" yes", " no", " yes", " no"]
CHOICES = [["yes", "no"], ["salt", "sugar", "flour"], ["won", "lost"], ["bread", "cake", "rice", "soup"]]


def make_base(arch: str, kind: str, quant: str | None):
    """A deterministic tiny base: calling it twice gives two identical models."""
    if arch != "llama64":
        return liven(tiny_base(arch, kind))
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    model = tf.AutoModel.from_config(cfg) if kind == "backbone" else tf.AutoModelForCausalLM.from_config(cfg)
    model.config._ptune_source = "tiny-llama-64"
    return quantize_model(liven(model.eval()), quant) if quant else liven(model.eval())


def build(method: str, arch: str, head: str, quant: str | None, tokenizer):
    """(model, rows, batch, make_fresh_base) for one case; 4 rows of different lengths."""
    decoder = arch not in ("bert", "roberta")
    kind = {"classification": "backbone", "tagging": "backbone", "causal_lm": "causal_lm", "multiple_choice": "backbone",
            "multiple_choice_lm": "causal_lm", "span_qa": "backbone",
            "verbalizer": "causal_lm" if decoder else "masked_lm"}[head]
    field = "tokens" if head == "tagging" else "text"
    config = METHODS[method]()
    if method == "p_tuning":
        config = ptune.PTuningConfig(**{**config.__dict__, "template": config.template.replace("{field}", "{%s}" % field)
                                        + MC.get(head, "")})
    template = "{%s}" % field + MC.get(head, "")
    hc = ptune.HeadConfig(head, num_labels={"tagging": 4, "multiple_choice": 1, "multiple_choice_lm": 1}.get(head, 2),
                          dropout=0.0)
    model = ptune.apply(make_base(arch, kind, quant), config, head=hc, tokenizer=tokenizer, template=template,
                        labels=["good", "bad"] if head == "verbalizer" else ())
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=decoder)
    if head == "tagging":
        rows = [enc.encode({"tokens": w}, tagging_field="tokens", tags=t) for w, t in zip(WORDS, TAGS)]
        targets = None
    elif head == "causal_lm":
        rows = [enc.encode({"text": t}, target=y) for t, y in zip(TEXTS, TARGETS)]
        targets = None
    elif head.startswith("multiple_choice"):
        from ptune.data import Task

        task = Task(name="mc", head=head)
        rows = [task.kind.encode(task, enc, {"text": t, "choices": c}, False).encoded for t, c in zip(TEXTS, CHOICES)]
        targets = [0, 2, 1, 3]
    elif head == "span_qa":  # one window per record here (short contexts)
        from ptune.data import Task

        task = Task(name="qa", head=head, text_fields=("text", "context"), label_field="answers", allow_no_answer=True)
        recs = [{"text": q, "context": c, "answers": {"text": [a] if a else [], "answer_start": [c.index(a)] if a else []}}
                for (q, a), c in zip(QA, TEXTS)]
        rows = [task.kind.encode(task, enc, r, True).encoded for r in recs]
        targets = None
    else:
        rows = [enc.encode({"text": t}) for t in TEXTS]
        targets = [0, 1, 0, 1]
    batch = collate(rows, pad_id=tokenizer.pad_token_id, targets=targets)
    return model, rows, targets, batch, lambda: make_base(arch, kind, quant)


def per_row(logits: torch.Tensor, j: int, n: int) -> torch.Tensor:
    return logits[j] if logits.dim() == 2 else logits[j, :n]


@pytest.mark.parametrize("method, arch, head, quant", CASES,
                         ids=[f"{m}-{a}-{h}-{q or 'plain'}" for m, a, h, q in CASES])
def test_shared_checks(method, arch, head, quant, tokenizer, tmp_path):
    torch.manual_seed(0)
    model, rows, targets, batch, fresh_base = build(method, arch, head, quant, tokenizer)

    # forward
    out = model(**batch)
    B, T = batch["input_ids"].shape
    width = {"classification": 2, "verbalizer": 2, "tagging": 4, "causal_lm": 30522, "multiple_choice": 4,
             "multiple_choice_lm": 4, "span_qa": 2}[head]
    want = (B, width) if head in ("classification", "verbalizer") else (B, T, width)
    if head.startswith("multiple_choice"):  # one row per choice in the body, one score row per record out of the head
        want = (len(rows), width)
    if head == "span_qa":  # windows regrouped per record: (records, most windows, T, start / end)
        want = (len(rows), 1, T, width)
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
    with torch.no_grad():
        for j, row in enumerate(rows):
            alone = collate([row], pad_id=tokenizer.pad_token_id, targets=[targets[j]] if targets else None)
            n = len(row.input_ids)
            got, want_row = per_row(model(**alone).logits, 0, n), per_row(logits, j, n)
            if head.startswith("multiple_choice"):  # the batch pads the record's score row with -inf choices
                got, want_row = got[:len(CHOICES[j])], want_row[:len(CHOICES[j])]
            if head == "span_qa":  # per window, its real positions
                got, want_row = got[:, :n], want_row[:, :n]
            torch.testing.assert_close(got, want_row, atol=tol, rtol=tol)

    # disable_adapter(): exactly the untouched base, then the adapter again
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "virtual_index")}
    if method == "full":
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


# heads whose base this matrix's tiny zoo does not build, and the file that runs the same checks on theirs
ELSEWHERE = {"seq2seq": "tests/test_t5.py"}  # an encoder-decoder (T5): forward, base untouched, save/load,
# padding invariance, disable_adapter() for every method that fits it


def test_every_method_and_head_is_in_the_matrix():
    covered = {(m, h) for m, _, h, _ in CASES}
    assert {m for m, _ in covered} == set(ptune.methods.METHODS) - {"manual"}
    assert {h for _, h in covered} == set(ptune.HEAD_KINDS) - set(ELSEWHERE)
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for head, path in ELSEWHERE.items():
        text = (root / path).read_text()
        assert f'HeadConfig("{head}")' in text and "padded_batch" in text and "disable_adapter" in text, path
    assert any(q for *_, q in CASES)


def test_adapters_meet_the_protocol(tokenizer):
    from ptune.methods.base import Adapter, TrainingHooks

    for method in METHODS:
        quant = "nf4" if method == "qlora" else None
        model, *_ = build(method, "llama64" if quant else "bert", "classification", quant, tokenizer)
        assert isinstance(model.adapter, Adapter)
        assert isinstance(model.adapter, TrainingHooks) == (method == "adalora")
        assert model.adapter.trains_base == (method in ("lora", "adalora", "bitfit", "full", "qlora"))
