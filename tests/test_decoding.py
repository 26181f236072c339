"""Batched decoding (ptune.decoding, AdapterSet.generation): requests of different adapters, joining the
running batch at different steps, decode together, and each one's greedy output equals its adapter's own
``PtuneModel.generate`` alone (the bare base's: the base's ``generate``)."""

from __future__ import annotations

import pytest
import torch
from conftest import liven, tiny_base
from test_adapter_set import perturb

import ptune
from ptune.adapter_set import AdapterSet
from ptune.data import Task
from ptune.decoding import Decoder, Sampling

LM = Task("lm", head="causal_lm", max_length=48)
METHODS = {  # every method that can act per row in a set, with a causal_lm head
    "prompt_tuning": lambda: ptune.PromptTuningConfig(num_virtual_tokens=3),
    "p_tuning": lambda: ptune.PTuningConfig(num_virtual_tokens=2, encoder="mlp", encoder_hidden_size=8),
    "p_tuning_v2": lambda: ptune.PTuningV2Config(num_virtual_tokens=3),
    "prefix_tuning": lambda: ptune.PrefixTuningConfig(num_virtual_tokens=2, encoder_hidden_size=8),
    "lora": lambda: ptune.LoraConfig(r=2),
    "adalora": lambda: ptune.AdaLoraConfig(init_r=3, target_r=2, total_step=10),
    "bitfit": lambda: ptune.BitFitConfig(),
}
PROMPTS = ["the capital of france is", "hello", "a much longer prompt about the weather in the mountains today",
           "one two three", "water boils at"]
NEW = 20  # tokens: past the tiny Gemma's sliding window (16) with the longer prompts


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3"])
def adapters(request, tmp_path_factory, tokenizer):
    arch, root = request.param, tmp_path_factory.mktemp(f"gen-{request.param}")
    out = {}
    for k, (method, make) in enumerate(METHODS.items()):
        if method == "bitfit" and arch != "gpt2":
            continue  # Llama and Gemma are built without bias terms: BitFit has nothing to train there
        torch.manual_seed(0)
        model = ptune.apply(liven(tiny_base(arch, "causal_lm")), make(), head=ptune.HeadConfig("causal_lm"),
                            tokenizer=tokenizer, task=LM, max_length=LM.max_length)
        out[method] = ptune.save_adapter(perturb(model, 10 + k), root / method)
    return arch, out


def alone(arch, path, prompt, tokenizer, new=NEW):
    """The adapter on a base of its own, generating one prompt (None: the bare base)."""
    torch.manual_seed(0)
    base = liven(tiny_base(arch, "causal_lm"))
    if path is None:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        return base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
    model = ptune.load_adapter(path, base=base, tokenizer=tokenizer).eval()
    enc = ptune.TemplateEncoder(model.template, tokenizer, max_length=LM.max_length).encode({"text": prompt})
    batch = ptune.batching.collate([enc], pad_id=0, left=True)
    return model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"], max_new_tokens=new,
                          do_sample=False, pad_token_id=0)[0].tolist()


def strip(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_every_method_and_the_bare_base_decode_together_as_alone(adapters, tokenizer):
    arch, paths = adapters
    torch.manual_seed(0)
    s = AdapterSet(liven(tiny_base(arch, "causal_lm")), tokenizer)
    for method, path in paths.items():
        s.add(method, path)
    gen = s.generation
    requests = [(m, PROMPTS[k % len(PROMPTS)]) for k, m in enumerate(paths)] + [(None, PROMPTS[2]), (None, PROMPTS[1])]
    rows = []
    for k, (adapter, prompt) in enumerate(requests):  # one newcomer every step: rows join a running batch
        rows.append(gen.add(adapter, prompt, Sampling(max_new_tokens=NEW)))
        gen.step()
    seen = 0
    while any(not r.done for r in rows):
        seen = max(seen, len(gen.decoder.rows))
        gen.step()
    assert seen >= 5, "the requests should have decoded side by side"
    for (adapter, prompt), row in zip(requests, rows):
        want = strip(alone(arch, paths.get(adapter), prompt, tokenizer), 102)
        assert row.tokens == want, f"{adapter or 'base'}: {row.tokens} != {want}"
        assert row.finish_reason == ("stop" if row.tokens[-1] in gen.eos_ids else "length")


def test_sampling_is_seeded_per_request_and_stops_where_asked(adapters, tokenizer):
    arch, paths = adapters
    s = AdapterSet(liven(tiny_base(arch, "causal_lm")), tokenizer)
    s.add("lora", paths["lora"])
    s.add("v2", paths["p_tuning_v2"])
    req = {"adapter": "lora", "prompt": PROMPTS[0], "max_new_tokens": 12, "temperature": 1.5, "seed": 7}
    first = s.generation.generate([req, {**req, "seed": 8}, {**req, "adapter": "v2"}])
    again = s.generation.generate([{**req, "adapter": "v2"}, req])  # other neighbours, other order
    assert again == [first[2], first[0]]  # a seeded row samples from its own generator
    greedy = s.generation.generate([{"adapter": "v2", "prompt": PROMPTS[3], "max_new_tokens": 12}])[0]
    words = greedy.split()
    if len(words) >= 3:  # stop at a string: the text is cut before it, and decoding ends there
        row = s.generation.add("v2", PROMPTS[3], Sampling(max_new_tokens=12, stop=(words[2],)))
        while not row.done:
            s.generation.step()
        assert row.finish_reason == "stop" and s.generation.finished_text(row) == greedy[:greedy.index(words[2])]
        assert len(row.tokens) < 12


def test_a_cancelled_row_frees_its_slot_and_the_others_go_on(adapters, tokenizer):
    arch, paths = adapters
    s = AdapterSet(liven(tiny_base(arch, "causal_lm")), tokenizer)
    s.add("lora", paths["lora"])
    gen = s.generation
    a = gen.add("lora", PROMPTS[0], Sampling(max_new_tokens=NEW))
    b = gen.add("lora", PROMPTS[2], Sampling(max_new_tokens=NEW))
    gen.step()
    gen.step()
    gen.decoder.cancel(b)
    gen.step()
    assert [r.id for r in gen.decoder.rows] == [a.id] and b.finish_reason == "cancelled"
    width = gen.decoder.width
    assert all(layer.keys.shape[0] == 1 and layer.keys.shape[2] == width for layer in gen.decoder.cache.layers)
    while not a.done:
        gen.step()
    assert a.tokens == strip(alone(arch, paths["lora"], PROMPTS[0], tokenizer), 102)
    gen.step()
    assert gen.decoder.active == 0 and gen.decoder.cache is None  # every slot freed


def test_bad_requests(tokenizer, tmp_path):
    s = AdapterSet(liven(tiny_base("llama", "causal_lm")), tokenizer)
    topic = Task("topic", labels=("a", "b"), max_length=16)
    model = ptune.apply(liven(tiny_base("llama", "causal_lm")), ptune.LoraConfig(r=2), tokenizer=tokenizer,
                        head=ptune.HeadConfig("classification", num_labels=2), labels=topic.labels, task=topic)
    s.add("topic", ptune.save_adapter(model, tmp_path / "topic"))
    with pytest.raises(ptune.ConfigError, match="'topic' has a classification head, which labels its inputs"):
        s.generation.add("topic", "hello")
    assert s.generation.adapters() == []
    with pytest.raises(ptune.ConfigError, match="max_new_tokens=0 must be a positive integer"):
        Sampling(max_new_tokens=0)
    with pytest.raises(ptune.ConfigError, match="top_p=0 must be in"):
        Sampling(top_p=0)
    with pytest.raises(ptune.ConfigError, match="unknown adapter 'x'"):
        s.generation.add("x", "hello")
    with pytest.raises(ptune.ConfigError, match="unknown fields \\['n'\\]"):
        s.generation.generate([{"adapter": None, "prompt": "hi", "n": 2}])
    from test_t5 import t5_base

    with pytest.raises(ptune.ConfigError, match="batched decoding is for causal LMs; an encoder-decoder"):
        Decoder(ptune.apply(t5_base(), ptune.LoraConfig(r=2), head=ptune.HeadConfig("seq2seq"),
                            tokenizer=tokenizer), eos_ids=[1], pad_id=0)


@pytest.mark.parametrize("method", ["lora", "bitfit", "p_tuning_v2"])
def test_a_classifier_trained_on_the_bare_body_serves_beside_generating_adapters(method, tiny_gpt2_dir, tokenizer,
                                                                              tmp_path):
    """One set, one copy of the base in its fullest (causal LM) form: a classifier trained on the bare body
    (its LoRA / bias tensors named after the body's modules) labels beside a generating adapter, and
    scores as it does on a base of its own."""
    topic = Task("topic", labels=("sport", "food"), max_length=16)
    body = ptune.load_base(tiny_gpt2_dir)  # the bare GPT-2 body, as `ptune train` loads it for a classifier
    clf = perturb(ptune.apply(body, METHODS[method](), head=ptune.HeadConfig("classification", num_labels=2),
                                tokenizer=tokenizer, labels=topic.labels, task=topic, max_length=16), 3)
    clf_path = ptune.save_adapter(clf, tmp_path / "clf")
    lm = perturb(ptune.apply(ptune.load_base(tiny_gpt2_dir, "causal_lm"), ptune.LoraConfig(r=2), tokenizer=tokenizer,
                               head=ptune.HeadConfig("causal_lm"), task=LM, max_length=LM.max_length), 4)
    lm_path = ptune.save_adapter(lm, tmp_path / "lm")
    s = AdapterSet.load({"clf": clf_path, "lm": lm_path}, tokenizer=tokenizer)
    assert type(s.base).__name__ == "GPT2LMHeadModel"
    want = ptune.load_adapter(clf_path, base=ptune.load_base(tiny_gpt2_dir), tokenizer=tokenizer).eval()
    enc = ptune.TemplateEncoder(want.template, tokenizer, max_length=16)
    texts = ["the match ended", "bake the bread"]
    with torch.no_grad():
        alone_logits = want(**ptune.batching.collate([enc.encode({"text": t}) for t in texts], pad_id=0)).logits
    got = s.logits([{"adapter": "clf", "text": t} for t in texts])
    torch.testing.assert_close(torch.stack(got), alone_logits, atol=1e-5, rtol=0)
    text = s.generation.generate([{"adapter": "lm", "prompt": "hello", "max_new_tokens": 5}])[0]
    assert isinstance(text, str)
