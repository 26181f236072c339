"""BitFit and full fine-tuning, the two baselines: what trains, what stays, what saves."""

from __future__ import annotations

import pytest
import torch
from conftest import liven, tiny_base, train_steps

import ptune
from ptune.batching import collate
from ptune.errors import ConfigError

TEXTS = ["the team won the match", "simmer the sauce slowly", "a late goal", "bake the bread"]


def setup(arch, config, tokenizer):
    m = ptune.apply(liven(tiny_base(arch)), config, tokenizer=tokenizer, labels=("a", "b"),
                    head=ptune.HeadConfig("classification", num_labels=2, dropout=0.0))
    enc = ptune.TemplateEncoder(m.template, tokenizer, max_length=24, causal=arch != "bert")
    return m, collate([enc.encode({"text": t}) for t in TEXTS], pad_id=0, targets=[0, 1, 0, 1])


def train(model, batch, steps=5, lr=1e-2):
    return train_steps(model, batch, steps, lr)


def test_bitfit_trains_exactly_the_biases(tokenizer, tmp_path):
    m, b = setup("bert", ptune.BitFitConfig(), tokenizer)
    d, ff, layers = 32, 64, 2
    # per layer: q k v o (4d), attention LayerNorm (d), intermediate (ff), output (d) and its LayerNorm (d);
    # plus the embedding LayerNorm and the pooler; plus the head's d x 2 weights and 2 biases
    assert m.trainable_parameters()[0] == layers * (4 * d + d + ff + d + d) + d + d + (d * 2 + 2)
    assert m.base_dropout  # the base's own weights train, so it trains as usual
    before = {n: p.detach().clone() for n, p in m.base.named_parameters()}
    losses = train(m, b)
    assert losses[-1] < losses[0]
    for n, p in m.base.named_parameters():
        if n.endswith(".bias"):  # (the pooler is off the loss path of a [CLS] head)
            assert torch.equal(p, before[n]) == n.startswith("pooler."), f"bias {n}"
        else:
            assert torch.equal(p, before[n]), f"non-bias weight {n} changed"
    with torch.no_grad():
        want = m(**b).logits
    saved = ptune.save_adapter(m, tmp_path / "bitfit")
    again = ptune.load_adapter(saved, base=liven(tiny_base("bert")), tokenizer=tokenizer)
    assert torch.equal(again.eval()(**b).logits, want)
    with pytest.raises(ConfigError, match="no HF PEFT equivalent"):
        ptune.export_peft(m, tmp_path / "peft")


def test_bitfit_on_gpt2_conv1d_biases(tokenizer):
    m, b = setup("gpt2", ptune.BitFitConfig(), tokenizer)
    names = [n for n, p in m.base.named_parameters() if p.requires_grad]
    assert "h.0.attn.c_attn.bias" in names and all(n.endswith(".bias") for n in names)
    losses = train(m, b)
    assert losses[-1] < losses[0]


def test_bitfit_refuses_models_without_biases(tokenizer):
    with pytest.raises(ConfigError, match=r"bitfit: LlamaModel has no bias terms .*use lora instead"):
        setup("llama", ptune.BitFitConfig(), tokenizer)


def test_full_finetuning_trains_everything(tokenizer, tmp_path):
    m, b = setup("bert", ptune.FullFinetuneConfig(), tokenizer)
    trainable, total = m.trainable_parameters()
    assert trainable == total == sum(p.numel() for p in m.parameters())
    before = {n: p.detach().clone() for n, p in m.base.named_parameters()}
    losses = train(m, b, steps=3, lr=1e-3)
    assert losses[-1] < losses[0]
    moved = sum(not torch.equal(p, before[n]) for n, p in m.base.named_parameters())
    assert moved >= len(before) - 2  # all but the position/token-type rows no batch reaches could move
    with torch.no_grad():
        want = m(**b).logits
    again = ptune.load_adapter(ptune.save_adapter(m, tmp_path / "full"), base=liven(tiny_base("bert")),
                               tokenizer=tokenizer)
    assert torch.equal(again.eval()(**b).logits, want)


@pytest.mark.parametrize("config", [ptune.BitFitConfig(), ptune.FullFinetuneConfig()], ids=lambda c: c.method)
def test_baselines_take_no_prompt_markers(config, tokenizer):
    with pytest.raises(ConfigError, match="trains weights, not prompts"):
        ptune.apply(tiny_base("bert"), config, tokenizer=tokenizer, template="[P:2] {text}")
    assert ptune.make_config(config.method) == config
