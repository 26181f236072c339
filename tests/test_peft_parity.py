"""Parity with HF PEFT 0.21.2: the same weights give the same logits (atol 1e-5).

PEFT concatenates after the fact: virtual tokens go in front of everything (before [CLS]) and prefix
tuning goes through ``past_key_values``. ptune places virtual tokens through the template and
prefixes through its attention function, so the batches here are built by hand to mean the same
thing: virtual_index 0..N-1 at positions 0..N-1, then the tokenized input. With prefix tuning PEFT's
real tokens sit after the cached prefix, at positions P..P+T-1 (decoders compute them from the cache
length, BERT's embeddings from ``past_key_values_length``); ptune keeps 0..T-1 and the position ids
are passed explicitly to match.

PEFT sizes its GQA prefixes (and, with ``prefix_projection``, the prefix *embedding*) by the key/value
width, ptune sizes that embedding by the model width; prefix projection is therefore compared on a
Llama without GQA. Everything else runs on the shared tiny models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_base, tiny_config

import ptune



peft = pytest.importorskip("peft")

TEXTS = ["the match ended in a draw after extra time", "stir gently", "a late goal won the cup for them"]
N = 4  # virtual tokens
E = 24  # encoder hidden size (P-Tuning / prefix projection), the same on both sides


def _tokens(tokenizer):
    t = tokenizer(TEXTS, padding=True, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


def _our_input_batch(tokenizer):
    """Virtual tokens 0..N-1 in front of the tokenized input, as PEFT lays it out."""
    ids, mask = _tokens(tokenizer)
    B = ids.shape[0]
    vidx = torch.cat([torch.arange(N).expand(B, N), torch.full_like(ids, -1)], 1)
    return {"input_ids": torch.cat([torch.zeros(B, N, dtype=torch.long), ids], 1),
            "attention_mask": torch.cat([torch.ones(B, N, dtype=torch.long), mask], 1),
            "virtual_index": vidx}


def _peft_config(method: str, task_type: str):
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=N)
    if method in ("p_tuning-lstm", "p_tuning-mlp"):
        return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=N, encoder_hidden_size=E,
                                        encoder_reparameterization_type=method.split("-")[1].upper())
    return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=N, encoder_hidden_size=E,
                                   prefix_projection=method == "prefix-projection")


def _our_config(method: str):
    if method == "prompt_tuning":
        return ptune.PromptTuningConfig(num_virtual_tokens=N)
    if method == "p_tuning-lstm":
        return ptune.PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=E)
    if method == "p_tuning-mlp":  # PEFT's MLP has 3 linear layers
        return ptune.PTuningConfig(num_virtual_tokens=N, encoder="mlp", encoder_hidden_size=E, encoder_num_layers=3)
    return ptune.PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=E,
                                    prefix_projection=method == "prefix-projection")


def _copy_prompt_weights(method: str, peft_model, ours) -> None:
    """PEFT's (random) adapter weights into ptune's tensors, by name."""
    enc = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        if method == "prompt_tuning":
            ours.adapter.weight.copy_(enc.embedding.weight[None])  # (1, N, d)
        elif method.startswith("p_tuning"):
            ours.adapter.embedding.copy_(enc.embedding.weight[None])
            theirs = {k: v for k, v in enc.state_dict().items() if not k.startswith("embedding")}
            mine = ours.adapter.encoder.state_dict()
            assert set(theirs) == set(mine), (sorted(theirs), sorted(mine))
            ours.adapter.encoder.load_state_dict(theirs)
        else:
            ours.adapter.encoder.embedding.copy_(enc.embedding.weight[None])  # (1, P, width)
            if method == "prefix-projection":
                ours.adapter.encoder.transform.load_state_dict(enc.transform.state_dict())
            else:
                assert ours.adapter.encoder.transform is None


def _perturb(module) -> None:
    """Move PEFT's freshly initialised adapter away from init so copying is really tested."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


METHODS = ["prompt_tuning", "p_tuning-lstm", "p_tuning-mlp", "prefix", "prefix-projection"]


@pytest.mark.parametrize("method", METHODS)
def test_parity_sequence_classification_bert(method, tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tiny_config("bert")
    cfg.num_labels = 3
    hf = tf.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # larger random weights: every input position visibly matters
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    our_body = copy.deepcopy(hf.bert)
    classifier = copy.deepcopy(hf.classifier)
    peft_model = peft.get_peft_model(hf, _peft_config(method, "SEQ_CLS")).eval()
    _perturb(peft_model.prompt_encoder["default"])

    ours = ptune.apply(our_body, _our_config(method), tokenizer=tokenizer,
                       head=ptune.HeadConfig("classification", num_labels=3, pooling="pooler")).eval()
    ours.head.classifier.load_state_dict(classifier.state_dict())
    _copy_prompt_weights(method, peft_model, ours)

    ids, mask = _tokens(tokenizer)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        plain = classifier(our_body(input_ids=ids, attention_mask=mask).pooler_output)
        assert not torch.allclose(plain, expected, atol=1e-4)  # PEFT's adapter does act
        if method.startswith("prefix"):
            T = ids.shape[1]
            got = ours(ids, attention_mask=mask, position_ids=torch.arange(N, N + T)[None]).logits
            # ptune's own positions (0..T-1) are a different, equally valid model: not PEFT's numbers
            own = ours(ids, attention_mask=mask).logits
            assert not torch.allclose(own, expected, atol=1e-4)
        else:
            got = ours(**_our_input_batch(tokenizer)).logits
    assert got.shape == expected.shape == (len(TEXTS), 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


INPUT_METHODS = [m for m in METHODS if not m.startswith("prefix")]


@pytest.mark.parametrize("method", INPUT_METHODS)
def test_the_peft_prompt_layout_encodes_what_peft_computes(method, tokenizer):
    """``prompt_layout="peft"``: the template encoder itself lays the rows out as PEFT does (virtual tokens
    before [CLS]), so ptune's own batch of the texts, not one built by hand, gives PEFT's logits."""
    import dataclasses

    import transformers as tf

    from ptune.batching import collate

    torch.manual_seed(0)
    cfg = tiny_config("bert")
    cfg.num_labels = 3
    hf = tf.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    our_body = copy.deepcopy(hf.bert)
    classifier = copy.deepcopy(hf.classifier)
    peft_model = peft.get_peft_model(hf, _peft_config(method, "SEQ_CLS")).eval()
    _perturb(peft_model.prompt_encoder["default"])
    config = dataclasses.replace(_our_config(method), prompt_layout="peft")
    ours = ptune.apply(our_body, config, tokenizer=tokenizer,
                       head=ptune.HeadConfig("classification", num_labels=3, pooling="pooler")).eval()
    ours.head.classifier.load_state_dict(classifier.state_dict())
    _copy_prompt_weights(method, peft_model, ours)
    enc = ptune.TemplateEncoder(ours.template, tokenizer, max_length=64)
    batch = collate([enc.encode({"text": t}) for t in TEXTS], pad_id=enc.placeholder_id)
    assert batch["virtual_index"][:, :N].tolist() == [list(range(N))] * len(TEXTS)
    ids, mask = _tokens(tokenizer)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _causal(arch: str, gqa: bool = True):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama" and not gqa:
        cfg = tiny_config("llama")
        cfg.num_key_value_heads = cfg.num_attention_heads
        model = tf.LlamaForCausalLM(cfg)
    else:
        model = tiny_base(arch, "causal_lm")
    with torch.no_grad():  # larger random weights: every input position visibly matters
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return model.eval()


CAUSAL = [(arch, m) for arch in ("gpt2", "llama") for m in METHODS]


@pytest.mark.parametrize("arch, method", CAUSAL, ids=[f"{a}-{m}" for a, m in CAUSAL])
def test_parity_causal_lm(arch, method, tokenizer):
    gqa = method != "prefix-projection"
    hf = _causal(arch, gqa)
    our_base = copy.deepcopy(hf)
    peft_model = peft.get_peft_model(hf, _peft_config(method, "CAUSAL_LM")).eval()
    _perturb(peft_model.prompt_encoder["default"])
    ours = ptune.apply(our_base, _our_config(method), head=ptune.HeadConfig("causal_lm"), tokenizer=tokenizer).eval()
    _copy_prompt_weights(method, peft_model, ours)

    ids, mask = _tokens(tokenizer)
    real = mask.bool()  # (B, T) real-token positions
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        if method.startswith("prefix"):
            T = ids.shape[1]
            got = ours(ids, attention_mask=mask, position_ids=torch.arange(N, N + T)[None]).logits
        else:
            assert expected.shape[1] == N + ids.shape[1]  # PEFT returns logits for the virtual tokens too
            expected = expected[:, N:]
            got = ours(**_our_input_batch(tokenizer)).logits[:, N:]
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    # the comparison has teeth: the base model alone is far from both
    with torch.no_grad():
        plain = our_base(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(plain[real], expected[real], atol=1e-3)
