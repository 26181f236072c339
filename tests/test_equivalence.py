"""Two equivalences a user can reason with.

(a) A soft prompt initialised from the text T *is* the hard prompt "T" until it is trained: the same
    logits as feeding the words of T through the same model and head.
(b) Generation with an adapter is ordinary greedy decoding: ``generate()`` (KV cache, prefix kept at
    every layer and step) equals argmax decoding by repeated full forward passes without a cache.
"""

from __future__ import annotations

import pytest
import torch
from cases import method_config, methods
from conftest import liven, tiny_base

import ptune
from ptune.batching import collate



HARD = "the following review is about"
TEXTS = ["a warm and funny film", "dull plot and wooden acting throughout the whole thing"]




@pytest.mark.parametrize("arch, head", [("bert", "classification"), ("gpt2", "verbalizer"),
                                        ("gemma3", "verbalizer")])  # Gemma scales its embeddings by sqrt(d)
def test_text_initialised_prompt_equals_hard_prompt(arch, head, tokenizer):
    causal = arch != "bert"
    n = len(tokenizer(HARD, add_special_tokens=False)["input_ids"])
    suffix = " it was {mask}" if head == "verbalizer" else ""
    kind = "causal_lm" if head == "verbalizer" else "backbone"
    config = ptune.PromptTuningConfig(num_virtual_tokens=n, init="text", init_text=HARD)
    if head == "verbalizer":
        hc = ptune.HeadConfig("verbalizer")
        model = ptune.apply(liven(tiny_base(arch, kind)), config, head=hc, tokenizer=tokenizer,
                            labels=["good", "bad"], template=f"[P:{n}] {{text}}{suffix}")
    else:
        hc = ptune.HeadConfig("classification", num_labels=3)
        model = ptune.apply(liven(tiny_base(arch, kind)), config, head=hc, tokenizer=tokenizer,
                            template=f"[P:{n}] {{text}}")
    model.eval()
    soft = ptune.TemplateEncoder(model.template, tokenizer, causal=causal)
    hard = ptune.TemplateEncoder(f"{HARD} {{text}}{suffix}", tokenizer, causal=causal)
    soft_rows = [soft.encode({"text": t}) for t in TEXTS]
    hard_rows = [hard.encode({"text": t}) for t in TEXTS]
    for s, h in zip(soft_rows, hard_rows):
        assert len(s.input_ids) == len(h.input_ids) and s.label_position == h.label_position
        assert all(v == -1 for v in h.virtual_index)  # the hard prompt goes in as ordinary tokens
    with torch.no_grad():
        soft_logits = model(**collate(soft_rows, pad_id=0)).logits
        hard_logits = model(**collate(hard_rows, pad_id=0)).logits
        # and the prompt matters at all: a prompt of other words gives other logits
        other = model(**collate([ptune.TemplateEncoder(f"{'nothing ' * n}{{text}}{suffix}", tokenizer,
                                                        causal=causal).encode({"text": t}) for t in TEXTS],
                                pad_id=0)).logits
    torch.testing.assert_close(soft_logits, hard_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(other, hard_logits, atol=1e-3)


def test_text_init_repeats_or_truncates_to_length(tokenizer):
    ids = tokenizer("red blue", add_special_tokens=False)["input_ids"]
    base = tiny_base("bert")
    table = base.get_input_embeddings().weight
    for n in (1, 2, 5):
        model = ptune.apply(base, ptune.PromptTuningConfig(num_virtual_tokens=n, init="text", init_text="red blue"),
                            head=ptune.HeadConfig("classification", num_labels=2), tokenizer=tokenizer)
        expected = table[torch.tensor((ids * 3)[:n])]
        torch.testing.assert_close(model.adapter.weight[0], expected, atol=0, rtol=0)


def test_random_and_vocab_init_match_the_scaled_table():
    """Random init has the table's spread and vocab init copies table rows, both in the model's input
    space (times Gemma's embed_scale); computed without a full-precision copy of the table."""
    from ptune.methods.prompt_tuning import _std, initial_prompt

    table = torch.nn.Embedding(7000, 32).to(torch.bfloat16)
    table.embed_scale = torch.tensor(4.0)
    exact = table.weight.float().std().item()
    assert abs(_std(table.weight, chunk=1000) - exact) < 1e-6 * exact
    rand = initial_prompt("random", 400, table, seed=1)
    assert rand.dtype == torch.float32 and abs(rand.std().item() / (4 * exact) - 1) < 0.05
    vocab = initial_prompt("vocab", 6, table, seed=1)
    rows = (table.weight.float() * 4).unsqueeze(0) == vocab.unsqueeze(1)  # (6, 7000, 32)
    assert rows.all(-1).any(-1).all()


# ---------------------------------------------------------------- generation

GEN_METHODS = methods(lambda c: c.prompts)  # tests/cases.py: weight-side methods change no input or cache
PROMPTS = ["once upon a time in a small village", "the recipe starts with"]
NEW = 8


def _gen_model(method: str, arch: str, tokenizer):
    model = ptune.apply(liven(tiny_base(arch, "causal_lm")), method_config(method),
                        head=ptune.HeadConfig("causal_lm"), tokenizer=tokenizer).eval()
    return model, ptune.TemplateEncoder(model.template, tokenizer, causal=True)


def _argmax_decode(model, batch, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes over the growing sequence, no cache."""
    ids, vidx = batch["input_ids"], batch["virtual_index"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, virtual_index=vidx, task_ids=batch.get("task_ids")).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            ids = torch.cat([ids, nxt], 1)
            vidx = torch.cat([vidx, torch.full_like(nxt, -1)], 1)
    return torch.cat(out, 1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", GEN_METHODS)
def test_generate_equals_step_by_step_argmax(method, arch, tokenizer):
    model, enc = _gen_model(method, arch, tokenizer)
    for prompt in PROMPTS:
        batch = collate([enc.encode({"text": prompt})], pad_id=0)
        generated = model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                                   max_new_tokens=NEW, do_sample=False)
        assert generated.shape == (1, NEW)
        assert torch.equal(generated, _argmax_decode(model, batch, NEW))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["p_tuning_v2", "prefix_tuning"])
def test_prefix_acts_at_every_generation_step(method, arch, tokenizer):
    model, enc = _gen_model(method, arch, tokenizer)
    liven(model.adapter)  # sized like a trained prefix: near its init (small since issue #15) it may not flip a token
    batch = collate([enc.encode({"text": PROMPTS[0]})], pad_id=0)
    generated = model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                               max_new_tokens=NEW, do_sample=False)
    plain = model.base.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                max_new_tokens=NEW, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert not torch.equal(generated, plain)  # the prefix changes what is generated
    # each cached step still sees the prefix: feed the generated text back and compare every step's logits
    full = torch.cat([batch["input_ids"], generated], 1)
    with torch.no_grad():
        nocache = model(full).logits[0, batch["input_ids"].shape[1] - 1:-1]  # (NEW, V) predictions of the new tokens
        base_logits = model.base(full).logits[0, batch["input_ids"].shape[1] - 1:-1]
    assert torch.equal(nocache.argmax(-1), generated[0])
    # at every step, not only the first, the adapter's scores differ from the base's on the same text
    assert all(not torch.allclose(nocache[i], base_logits[i], atol=1e-3) for i in range(NEW))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", GEN_METHODS)
def test_left_padded_batch_generates_like_single_rows(method, arch, tokenizer):
    model, enc = _gen_model(method, arch, tokenizer)
    rows = [enc.encode({"text": p}) for p in PROMPTS]
    batch = collate(rows, pad_id=0, left=True)
    together = model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                              max_new_tokens=NEW, do_sample=False)
    for i, r in enumerate(rows):
        b = collate([r], pad_id=0)
        alone = model.generate(b["input_ids"], b["attention_mask"], b["virtual_index"], max_new_tokens=NEW,
                               do_sample=False)
        assert torch.equal(together[i], alone[0])


def test_generate_gives_the_lm_head_dense_inputs(tokenizer):
    """generate() feeds the LM head a slice of the last position; with a frozen bf16 head, PyTorch's CPU
    linear copies the whole transposed weight for such a strided input (320 MB, 0.8 s on Gemma, per
    call). ptune hands the head a dense copy: every input the head computes on is densely strided."""
    model, enc = _gen_model("prompt_tuning", "llama", tokenizer)
    batch = collate([enc.encode({"text": p}) for p in PROMPTS], pad_id=0, left=True)
    head = model.base.get_output_embeddings()
    dense = []
    # a forward hook sees the inputs after every pre-hook, i.e. what the head computes on
    handle = head.register_forward_hook(lambda m, args, out: dense.append(
        args[0].stride() == torch.empty(args[0].shape, device="meta").stride()))
    try:
        model.base.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            max_new_tokens=3, do_sample=False)
        assert not all(dense)  # plain HF generate: the prefill slice is strided
        dense.clear()
        model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"], max_new_tokens=3,
                       do_sample=False)
    finally:
        handle.remove()
    assert len(dense) == 3 and all(dense)
    assert not head._forward_pre_hooks  # ptune's hook lives for one generate() call only


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_generate_with_beams_and_task_ids(method, tokenizer):
    """Beam search expands the per-row prompts/prefixes; task ids pick each row's prompt."""
    import dataclasses

    config = dataclasses.replace(method_config(method), num_tasks=2)
    model = ptune.apply(liven(tiny_base("llama", "causal_lm")), config, head=ptune.HeadConfig("causal_lm"),
                        tokenizer=tokenizer).eval()
    liven(model.adapter)  # sized like trained prompts: near their init (small since issue #15) tasks may not differ
    with torch.no_grad():
        for p in model.adapter.parameters():
            if p.dim() == 3 and p.shape[0] == 2:
                p[1] = -p[1].flip(0)
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=True)
    rows = [enc.encode({"text": p}) for p in PROMPTS]
    batch = collate(rows, pad_id=0, left=True, task_ids=[1, 0])
    beams = model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                           task_ids=batch["task_ids"], max_new_tokens=4, do_sample=False, num_beams=3,
                           num_return_sequences=2)
    assert beams.shape == (4, 4)
    greedy = model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                            task_ids=batch["task_ids"], max_new_tokens=NEW, do_sample=False)
    for i, (r, t) in enumerate(zip(rows, [1, 0])):
        b = collate([r], pad_id=0, task_ids=[t])
        alone = model.generate(b["input_ids"], b["attention_mask"], b["virtual_index"], task_ids=b["task_ids"],
                               max_new_tokens=NEW, do_sample=False)
        assert torch.equal(greedy[i], alone[0])
        assert torch.equal(alone, _argmax_decode(model, b, NEW))
    # the task id matters: row 0 under task 0 generates something else
    b = collate(rows[:1], pad_id=0, task_ids=[0])
    other = model.generate(b["input_ids"], b["attention_mask"], b["virtual_index"], task_ids=b["task_ids"],
                           max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(other[0], greedy[0])
