"""LoRA, AdaLoRA, QLoRA, BitFit and full fine-tuning: behaviour users rely on, and parity with HF PEFT."""

from __future__ import annotations

import pytest
import torch

import ptune
from conftest import tiny_base
from ptune.batching import collate
from ptune.errors import ConfigError
from ptune.methods.lora import LoraLinear, merge_and_unload

TEXTS = ["the team won the match", "simmer the sauce slowly", "a late goal", "bake the bread"]


def batch(model, tok, causal):
    enc = ptune.TemplateEncoder(model.template, tok, max_length=24, causal=causal)
    return collate([enc.encode({"text": t}) for t in TEXTS], pad_id=0, targets=[0, 1, 0, 1])


def steps(model, b, n=5, lr=2e-2, hook=True):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(n):
        loss = model(**b).loss
        extra = getattr(model.adapter, "extra_loss", None)
        (loss + extra() if extra and hook else loss).backward()
        opt.step()
        if hook and hasattr(model.adapter, "after_optimizer_step"):
            model.adapter.after_optimizer_step(i)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_lora_starts_at_base_merges_and_unloads(arch, tokenizer):
    causal = arch != "bert"
    m = ptune.apply(tiny_base(arch), ptune.LoraConfig(r=4, alpha=8), tokenizer=tokenizer, labels=("a", "b"))
    b = batch(m, tokenizer, causal)
    m.eval()
    before = m(**b).logits
    for layer in m.adapter.layers().values():
        layer.merged = True  # the base path alone
    assert torch.allclose(m(**b).logits, before, atol=0)  # B = 0: LoRA starts as the base
    for layer in m.adapter.layers().values():
        layer.merged = False
    frozen = {k: v.clone() for k, v in m.base.state_dict().items() if "lora_" not in k}
    m.train()
    losses = steps(m, b)
    assert losses[-1] < losses[0]
    for k, v in m.base.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k
    m.eval()
    unmerged = m(**b).logits
    assert not torch.allclose(unmerged, before)
    m.adapter.merge()
    assert torch.allclose(m(**b).logits, unmerged, atol=1e-5)
    m.adapter.unmerge()
    assert torch.allclose(m(**b).logits, unmerged, atol=1e-5)
    merge_and_unload(m.base)
    assert not any(isinstance(x, LoraLinear) for x in m.base.modules())
    assert torch.allclose(m(**b).logits, unmerged, atol=1e-5)


def test_lora_config_errors(tokenizer):
    with pytest.raises(ConfigError, match=r"match no module of BertModel; its layers are named like"):
        ptune.apply(tiny_base("bert"), ptune.LoraConfig(target_modules=("nope",)), tokenizer=tokenizer, labels=("a", "b"))
    with pytest.raises(ConfigError, match=r"r=64 exceeds the width of .*query \(32 -> 32\)"):
        ptune.apply(tiny_base("bert"), ptune.LoraConfig(r=64), tokenizer=tokenizer, labels=("a", "b"))
    with pytest.raises(ConfigError, match="r=0 must be a positive integer"):
        ptune.LoraConfig(r=0)
    m = ptune.apply(tiny_base("bert"), ptune.LoraConfig(target_modules=("re:.*layer\\.1\\..*dense",)),
                    tokenizer=tokenizer, labels=("a", "b"))
    assert m.adapter.names and all(".layer.1." in n for n in m.adapter.names)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_lora_parity_with_peft(arch, tokenizer):
    import peft

    base = tiny_base(arch)
    ref = peft.get_peft_model(tiny_base(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=(
        ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"])))
    ours = ptune.apply(base, ptune.LoraConfig(r=4, alpha=8), tokenizer=tokenizer, labels=("a", "b"))
    sd = ref.state_dict()
    with torch.no_grad():
        for name, layer in ours.adapter.layers().items():
            layer.lora_A.copy_(sd[f"base_model.model.{name}.lora_A.default.weight"])
            layer.lora_B.copy_(torch.randn_like(layer.lora_B))
            sd_b = dict(ref.named_parameters())[f"base_model.model.{name}.lora_B.default.weight"]
            sd_b.copy_(layer.lora_B)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    ours.eval(), ref.eval()
    want = ref(input_ids=ids).last_hidden_state
    got = ours.backbone(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_lora_save_load_and_peft_export(tokenizer, tmp_path):
    import peft

    m = ptune.apply(tiny_base("gpt2", "causal_lm"), ptune.LoraConfig(r=4), head=ptune.HeadConfig("causal_lm"),
                    tokenizer=tokenizer)
    m.train()
    enc = ptune.TemplateEncoder(m.template, tokenizer, max_length=24, causal=True)
    b = collate([enc.encode({"text": "the cat sat"}, target="on the mat")], pad_id=0)
    steps(m, b, n=3)
    m.eval()
    want = m(**b).logits
    ptune.save_adapter(m, tmp_path / "ad")
    again = ptune.load_adapter(tmp_path / "ad", base=tiny_base("gpt2", "causal_lm"), tokenizer=tokenizer)
    assert torch.equal(again(**b).logits, want)
    ptune.export_peft(m, tmp_path / "peft")
    ref = peft.PeftModel.from_pretrained(tiny_base("gpt2", "causal_lm"), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, want,
                               atol=1e-5, rtol=0)


def test_adalora_budget_follows_schedule_and_ranks_reload(tokenizer, tmp_path):
    cfg = ptune.AdaLoraConfig(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=12)
    m = ptune.apply(tiny_base("bert"), cfg, tokenizer=tokenizer, labels=("a", "b"))
    m.adapter.set_total_steps(12)
    m.train()
    b = batch(m, tokenizer, False)
    steps(m, b, n=12, lr=1e-2)
    n = len(m.adapter.names)
    history = dict(m.adapter.budget_history)
    budgets = [history[s] for s in sorted(history)]
    assert budgets[0] == 6 * n and budgets[-1] == 2 * n
    assert all(x >= y for x, y in zip(budgets, budgets[1:]))  # the cubic schedule only goes down
    assert history[5] == m.adapter.budget(5) == int(2 * n + 4 * n * (1 - 3 / 8) ** 3)
    ranks = m.adapter.ranks()
    assert sum(ranks.values()) <= 2 * n
    ptune.save_adapter(m, tmp_path / "ada")
    again = ptune.load_adapter(tmp_path / "ada", base=tiny_base("bert"), tokenizer=tokenizer)
    assert again.adapter.ranks() == ranks
    m.eval(), again.eval()
    assert torch.equal(again(**b).logits, m(**b).logits)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_adalora_forward_matches_peft(arch, tokenizer):
    import peft

    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"]
    ref = peft.get_peft_model(tiny_base(arch), peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8,
                              target_modules=targets, total_step=10))
    ours = ptune.apply(tiny_base(arch), ptune.AdaLoraConfig(init_r=4, target_r=2, alpha=8), tokenizer=tokenizer,
                       labels=("a", "b"))
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, layer in ours.adapter.layers().items():
            for part in ("A", "B", "E"):
                theirs = params[f"base_model.model.{name}.lora_{part}.default"]
                theirs.copy_(torch.randn_like(theirs))
                getattr(layer, f"lora_{part}").copy_(theirs)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours.backbone(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                               atol=1e-5, rtol=0)


def test_bitfit_and_full(tokenizer):
    m = ptune.apply(tiny_base("bert"), ptune.BitFitConfig(), tokenizer=tokenizer, labels=("a", "b"))
    biases = sum(p.numel() for n, p in m.base.named_parameters() if n.endswith("bias"))
    assert m.trainable_parameters()[0] == biases + 32 * 2 + 2
    weights = {n: p.clone() for n, p in m.base.named_parameters() if not n.endswith("bias")}
    m.train()
    assert steps(m, batch(m, tokenizer, False))[-1] < 10
    for n, p in m.base.named_parameters():
        if not n.endswith("bias"):
            assert torch.equal(p, weights[n]), n
    with pytest.raises(ConfigError, match="no bias terms.*use lora"):
        ptune.apply(tiny_base("llama"), ptune.BitFitConfig(), tokenizer=tokenizer, labels=("a", "b"))
    full = ptune.apply(tiny_base("bert"), ptune.FullFinetuneConfig(), tokenizer=tokenizer, labels=("a", "b"))
    t, total = full.trainable_parameters()
    assert t == total
