"""LoRA: starts as the base, trains, merges, unloads, saves, and matches HF PEFT weight for weight."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, DECODERS, liven, tiny_base, tiny_config, train_steps

import ptune
from ptune.batching import collate
from ptune.errors import ConfigError
from ptune.methods.lora import LoraLinear, LowRankLayer

TEXTS = ["the team won the match", "simmer the sauce slowly", "a late goal", "bake the bread"]


def classification_batch(model, tok, arch):
    enc = ptune.TemplateEncoder(model.template, tok, max_length=24, causal=arch in DECODERS)
    return collate([enc.encode({"text": t}) for t in TEXTS], pad_id=0, targets=[0, 1, 0, 1])


def lm_batch(model, tok):
    enc = ptune.TemplateEncoder(model.template, tok, max_length=24, causal=True)
    return collate([enc.encode({"text": "the cat sat"}, target="on the mat"),
                    enc.encode({"text": "bake the"}, target="bread")], pad_id=0)


def train(model, batch, steps=5, lr=2e-2):
    return train_steps(model, batch, steps, lr)


def classifier(arch, config, tokenizer, **head):
    return ptune.apply(liven(tiny_base(arch)), config, tokenizer=tokenizer, labels=("a", "b"),
                       head=ptune.HeadConfig("classification", num_labels=2, dropout=0.0, **head))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_starts_at_base_trains_merges_and_unloads(arch, tokenizer):
    base = liven(tiny_base(arch))
    probe = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        plain = base(input_ids=probe).last_hidden_state
    m = ptune.apply(base, ptune.LoraConfig(r=4, alpha=8), tokenizer=tokenizer, labels=("a", "b"),
                    head=ptune.HeadConfig("classification", num_labels=2, dropout=0.0))
    b = classification_batch(m, tokenizer, arch)
    with torch.no_grad():  # B = 0: the adapted model is the base, bit for bit
        assert torch.equal(m.backbone(input_ids=probe).last_hidden_state, plain)
    r, n = 4, len(m.adapter.names)
    widths = sum(lay.in_features + lay.out_features for lay in m.adapter.layers().values())
    assert m.trainable_parameters()[0] == r * widths + 32 * 2 + 2  # A and B of every layer, plus the head
    frozen = {k: v.clone() for k, v in m.base.state_dict().items() if "lora_" not in k}
    losses = train(m, b)
    assert losses[-1] < losses[0]
    for k, v in m.base.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), f"frozen base tensor {k} changed"
    assert all(lay.lora_B.abs().sum() > 0 for lay in m.adapter.layers().values()) and n > 0
    with torch.no_grad():
        before = m(**b).logits
        assert not torch.allclose(m.base(input_ids=probe).last_hidden_state, plain)
        m.adapter.merge()
        torch.testing.assert_close(m(**b).logits, before, atol=1e-5, rtol=0)
        m.adapter.unmerge()
        for k, v in m.base.state_dict().items():  # unmerge restores W (up to float rounding)
            if "lora_" not in k:
                torch.testing.assert_close(v, frozen[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(m(**b).logits, before, atol=1e-5, rtol=0)
        ptune.merge_and_unload(m)
        assert not any(isinstance(x, LowRankLayer) for x in m.modules())
        assert not any("lora_" in k for k in m.state_dict())
        torch.testing.assert_close(m(**b).logits, before, atol=1e-5, rtol=0)


def test_default_targets_regex_and_all_linear(tokenizer):
    def targets(arch, kind="backbone", **kw):
        m = ptune.apply(tiny_base(arch, kind), ptune.LoraConfig(r=2, **kw), tokenizer=tokenizer, labels=("a", "b"),
                        head=ptune.HeadConfig("causal_lm") if kind == "causal_lm" else None)
        return m.adapter.names

    assert targets("bert") == [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    assert targets("roberta")[:2] == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    assert targets("gpt2") == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    qv = [f"layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    assert targets("llama") == qv and targets("gemma3") == qv
    assert targets("bert", target_modules=("re:encoder\\.layer\\.1\\..*dense",)) == [
        "encoder.layer.1.attention.output.dense", "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]
    assert targets("bert", target_modules="key") == ["encoder.layer.0.attention.self.key",
                                                     "encoder.layer.1.attention.self.key"]
    everything = targets("llama", "causal_lm", target_modules="all-linear")
    assert len(everything) == 2 * 7 and everything[0] == "model.layers.0.self_attn.q_proj"  # q k v o gate up down
    assert not any("lm_head" in n for n in everything)


def test_lora_config_errors(tokenizer):
    with pytest.raises(ConfigError, match=r"\['nope'\] match no module of BertModel; its linear layers are named "
                                          r"\['dense', 'key', 'query', 'value'\]"):
        classifier("bert", ptune.LoraConfig(target_modules=("nope",)), tokenizer)
    with pytest.raises(ConfigError, match=r"attention is a BertAttention; LoRA wraps linear layers"):
        classifier("bert", ptune.LoraConfig(target_modules=("attention",)), tokenizer)
    with pytest.raises(ConfigError, match=r"r=64 exceeds the width of encoder\.layer\.0\.attention\.self\.query "
                                          r"\(32 -> 32\); use r <= 32"):
        classifier("bert", ptune.LoraConfig(r=64), tokenizer)
    with pytest.raises(ConfigError, match=r"r=40 exceeds the width of h\.0\.attn\.c_attn \(32 -> 96\)"):
        classifier("gpt2", ptune.LoraConfig(r=40), tokenizer)
    for bad, match in [(dict(r=0), "r=0 must be a positive integer"), (dict(r=2.5), "positive integer"),
                       (dict(alpha=0), "alpha=0 must be positive"), (dict(lora_dropout=1.0), "lora_dropout=1.0"),
                       (dict(target_modules=()), "target_modules is empty"),
                       (dict(target_modules=("re:([",)), "not a valid regular expression")]:
        with pytest.raises(ConfigError, match=match):
            ptune.LoraConfig(**bad)
    with pytest.raises(ConfigError, match=r"trains weights, not prompts"):
        ptune.apply(tiny_base("bert"), ptune.LoraConfig(), tokenizer=tokenizer, template="[P:2] {text}")
    with pytest.raises(ConfigError, match="unknown option"):
        ptune.make_config("lora", rank=4)


def test_conv1d_gpt2_layer_matches_its_definition():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nx=8 in, nf=12 out, weight (8, 12)
    layer = LoraLinear("c_attn", conv, r=3, alpha=6, dropout=0.0)
    assert (layer.in_features, layer.out_features, layer.transposed) == (8, 12, True)
    assert layer.lora_A.shape == (3, 8) and layer.lora_B.shape == (12, 3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 8)
    w = conv.weight.detach().clone()
    want = x @ w + conv.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # W x + (alpha / r) B A x
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)
    layer.merge()
    torch.testing.assert_close(conv.weight, w + 2.0 * (layer.lora_B @ layer.lora_A).T)  # stored (in, out)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)


def _peft_pair(arch, tokenizer):
    """(ptune model, PEFT model, batch) on the same random weights, LoRA r=4 alpha=8 on the default targets."""
    import peft
    import transformers as tf

    torch.manual_seed(0)
    targets = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[arch]
    if arch == "bert":  # PEFT's sequence classifier vs ptune's head on the BERT pooler, classifier copied
        full = liven(tf.BertForSequenceClassification(tiny_config("bert"))).eval()
        weights = {k: v.clone() for k, v in full.state_dict().items()}
        ours = ptune.apply(full.bert, ptune.LoraConfig(r=4, alpha=8), tokenizer=tokenizer, labels=("a", "b"),
                           head=ptune.HeadConfig("classification", num_labels=2, pooling="pooler", dropout=0.0))
        ours.head.classifier.load_state_dict(full.classifier.state_dict())
        ref_base, task = liven(tf.BertForSequenceClassification(tiny_config("bert"))).eval(), "SEQ_CLS"
        ref_base.load_state_dict(weights)
        batch = classification_batch(ours, tokenizer, arch)
    else:
        ours = ptune.apply(liven(tiny_base(arch, "causal_lm")), ptune.LoraConfig(r=4, alpha=8), tokenizer=tokenizer,
                           head=ptune.HeadConfig("causal_lm"))
        ref_base, task = liven(tiny_base(arch, "causal_lm")), "CAUSAL_LM"
        batch = lm_batch(ours, tokenizer)
    ref = peft.get_peft_model(ref_base, peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets,
                                                        fan_in_fan_out=arch == "gpt2"))
    params = dict(ref.named_parameters())
    prefix = "base_model.model." + ("bert." if arch == "bert" else "")
    with torch.no_grad():
        for name, layer in ours.adapter.layers().items():
            layer.lora_A.copy_(params[f"{prefix}{name}.lora_A.default.weight"])  # PEFT's own init
            params[f"{prefix}{name}.lora_B.default.weight"].normal_()
            layer.lora_B.copy_(params[f"{prefix}{name}.lora_B.default.weight"])
    return ours.eval(), ref.eval(), batch


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_logits_match_peft_lora(arch, tokenizer):
    ours, ref, b = _peft_pair(arch, tokenizer)
    with torch.no_grad():
        got = ours(**b).logits
        want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        base_only = ours.head(ours.base.base_model(input_ids=b["input_ids"]).last_hidden_state, b) \
            if arch == "bert" else None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if base_only is not None:  # the comparison is not vacuous: LoRA moved the output
        assert (got - base_only).abs().max() > 1e-2
    # merged, still the same
    ours.adapter.merge()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, want, atol=1e-5, rtol=0)


def test_save_load_round_trip(tokenizer, tmp_path):
    m = classifier("bert", ptune.LoraConfig(r=4, target_modules=("query", "value", "dense")), tokenizer)
    b = classification_batch(m, tokenizer, "bert")
    train(m, b, steps=3)
    want = m(**b).logits
    saved = ptune.save_adapter(m, tmp_path / "ad")
    from safetensors.torch import load_file

    keys = set(load_file(str(saved / "adapter_model.safetensors")))
    assert "base.encoder.layer.0.attention.self.query.lora_A" in keys
    assert keys == {k for k, p in m.named_parameters() if p.requires_grad}
    assert ptune.read_adapter_config(saved)["method_config"]["target_modules"] == ["query", "value", "dense"]
    again = ptune.load_adapter(saved, base=liven(tiny_base("bert")), tokenizer=tokenizer)
    assert isinstance(again.adapter.layers()["encoder.layer.1.output.dense"], LoraLinear)
    assert torch.equal(again.eval()(**b).logits, want)


@pytest.mark.parametrize("arch, regex", [("gpt2", False), ("llama", False), ("llama", True), ("bert", False)])
def test_export_peft_is_read_back_by_peft(arch, regex, tokenizer, tmp_path):
    import peft

    config = ptune.LoraConfig(r=4, target_modules=("re:.*layers\\.1\\.self_attn\\.[qv]_proj",) if regex else None)
    if arch == "bert":  # a backbone under ptune's own head: PEFT sees a feature extractor
        m = classifier(arch, config, tokenizer)
        b = classification_batch(m, tokenizer, arch)
    else:
        m = ptune.apply(liven(tiny_base(arch, "causal_lm")), config, head=ptune.HeadConfig("causal_lm"),
                        tokenizer=tokenizer)
        b = lm_batch(m, tokenizer)
    train(m, b, steps=3)
    with torch.no_grad():
        want = m(**b).logits
        hidden = m.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    out = ptune.export_peft(m, tmp_path / "peft")
    cfg = peft.PeftConfig.from_pretrained(str(out))
    assert cfg.peft_type == "LORA" and cfg.r == 4 and cfg.lora_alpha == 16
    if regex:
        assert isinstance(cfg.target_modules, str)
    fresh = liven(tiny_base(arch, "backbone" if arch == "bert" else "causal_lm"))
    ref = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    assert sum("lora_A" in n for n, _ in ref.named_parameters()) == len(m.adapter.names)
    with torch.no_grad():
        got = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    if arch == "bert":
        torch.testing.assert_close(got.last_hidden_state, hidden, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.head(got.last_hidden_state, b), want, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
