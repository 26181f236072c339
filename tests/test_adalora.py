"""AdaLoRA: PEFT's forward and training trajectory, the cubic rank budget, ranks that save and reload."""

from __future__ import annotations

import pytest
import torch
from conftest import liven, tiny_base, tiny_config

import ptune
from ptune.batching import collate
from ptune.errors import ConfigError

TEXTS = ["the team won the match", "simmer the sauce slowly", "a late goal", "bake the bread"]


def batch_for(model, tok):
    enc = ptune.TemplateEncoder(model.template, tok, max_length=24)
    return collate([enc.encode({"text": t}) for t in TEXTS], pad_id=0, targets=[0, 1, 0, 1])


def run(model, batch, steps, lr=1e-2, watch=None):
    """A generic loop, as ptune's engine does it: loss + extra_loss, step, after_optimizer_step, zero_grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batch).loss + model.adapter.extra_loss()
        loss.backward()
        opt.step()
        model.adapter.after_optimizer_step(step)
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if watch is not None:
            watch(step)
    model.eval()
    return losses


def nonzero_lambdas(model) -> int:
    return sum(int((layer.lora_E != 0).sum()) for layer in model.adapter.layers().values())


def peft_pair(tokenizer, **schedule):
    """ptune on BERT with a pooler head vs PEFT's AdaLoRA sequence classifier: same weights everywhere."""
    import peft
    import transformers as tf

    torch.manual_seed(0)
    full = liven(tf.BertForSequenceClassification(tiny_config("bert"))).eval()
    weights = {k: v.clone() for k, v in full.state_dict().items()}
    cfg = dict(init_r=4, target_r=2, **schedule)
    ours = ptune.apply(full.bert, ptune.AdaLoraConfig(alpha=8, **cfg), tokenizer=tokenizer, labels=("a", "b"),
                       head=ptune.HeadConfig("classification", num_labels=2, pooling="pooler", dropout=0.0))
    ours.head.classifier.load_state_dict(full.classifier.state_dict())
    ref_base = tf.BertForSequenceClassification(tiny_config("bert"))
    ref_base.load_state_dict(weights)
    ref = peft.get_peft_model(ref_base, peft.AdaLoraConfig(task_type="SEQ_CLS", lora_alpha=8, target_modules=[
        "query", "value"], **cfg))
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, layer in ours.adapter.layers().items():
            for part in ("A", "E", "B"):
                p = params[f"base_model.model.bert.{name}.lora_{part}.default"]
                if part == "E":
                    p.normal_()  # PEFT and ptune start lambda at 0; make the forward check non-trivial
                getattr(layer, f"lora_{part}").copy_(p)
    return ours, ref


def test_forward_matches_peft(tokenizer):
    ours, ref = peft_pair(tokenizer, total_step=10)
    b = batch_for(ours, tokenizer)
    ours.eval(), ref.eval()
    with torch.no_grad():
        got = ours(**b).logits
        torch.testing.assert_close(got, ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   atol=1e-5, rtol=0)
        ours.adapter.merge()
        torch.testing.assert_close(ours(**b).logits, got, atol=1e-5, rtol=0)


def test_training_matches_peft_step_for_step(tokenizer):
    """Loss with the orthogonality penalty, importance, cubic budget, masking and the fixed final pattern."""
    schedule = dict(total_step=12, tinit=2, tfinal=3, deltaT=2, orth_reg_weight=0.3)
    ours, ref = peft_pair(tokenizer, **schedule)
    with torch.no_grad():  # start from PEFT's own init (lambda = 0) on both sides
        for layer in ours.adapter.layers().values():
            layer.lora_E.zero_()
        for n, p in ref.named_parameters():
            if "lora_E" in n:
                p.zero_()
    b = batch_for(ours, tokenizer)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ref.train()
    want = []
    for step in range(12):
        loss = ref(**inputs).loss  # PEFT adds the orthogonality penalty to the model's loss
        loss.backward()
        opt.step()
        ref.base_model.update_and_allocate(step)
        opt.zero_grad()
        want.append(float(loss.detach()))
    got = run(ours, b, 12)
    assert got == pytest.approx(want, abs=1e-5)
    params = dict(ref.named_parameters())
    for name, layer in ours.adapter.layers().items():
        theirs = params[f"base_model.model.bert.{name}.lora_E.default"].detach()
        assert torch.equal(layer.lora_E != 0, theirs != 0), name  # the same ranks pruned
        torch.testing.assert_close(layer.lora_E.detach(), theirs, atol=1e-5, rtol=0)
    pattern = ref.peft_config["default"].rank_pattern
    assert ours.adapter.rank_pattern() == {n: pattern[f"bert.{n}.lora_E.default"] for n in ours.adapter.names}


def test_rank_budget_follows_the_cubic_schedule(tokenizer):
    cfg = ptune.AdaLoraConfig(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2)
    m = ptune.apply(liven(tiny_base("bert")), cfg, tokenizer=tokenizer, labels=("a", "b"))
    n = len(m.adapter.names)
    assert n == 4 and m.adapter.ranks() == {name: 6 for name in m.adapter.names}
    with pytest.raises(ConfigError, match="needs total_step"):
        m.adapter.after_optimizer_step(0)
    m.adapter.set_total_steps(16)  # what the engine does; budgeting runs over steps 3..12
    # init 24, target 8: int(16 * (1 - (s - 2) / 11) ** 3 + 8), masked at even steps, fixed at step 13
    expected = {4: int(16 * (9 / 11) ** 3 + 8), 6: int(16 * (7 / 11) ** 3 + 8), 8: int(16 * (5 / 11) ** 3 + 8),
                10: int(16 * (3 / 11) ** 3 + 8), 12: int(16 * (1 / 11) ** 3 + 8), 13: 8}
    assert [m.adapter.budget(s)[0] for s in (0, 2, 3, 13, 15)] == [24, 24, int(16 * (10 / 11) ** 3 + 8), 8, 8]
    seen = {}
    run(m, batch_for(m, tokenizer), 16, watch=lambda s: seen.update({s: (sum(m.adapter.ranks().values()),
                                                                           nonzero_lambdas(m))}))
    assert dict(m.adapter.budget_history) == expected
    for step, budget in expected.items():
        assert seen[step] == (budget, budget), step  # right after masking: exactly the budget survives
    for step in (14, 15):  # final phase: the fixed pattern is re-applied after every optimizer step
        assert seen[step] == (8, 8)
    assert seen[5][0] == expected[4] and seen[5][1] > expected[4]  # between maskings pruned lambdas may revive
    assert sum(m.adapter.ranks().values()) == cfg.target_r * n


def test_final_ranks_save_and_reload(tokenizer, tmp_path):
    cfg = ptune.AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=2, total_step=8)
    m = ptune.apply(liven(tiny_base("bert")), cfg, tokenizer=tokenizer, labels=("a", "b"))
    b = batch_for(m, tokenizer)
    untrained = ptune.save_adapter(m, tmp_path / "untrained")
    run(m, b, 8)
    ranks, pattern = m.adapter.ranks(), m.adapter.rank_pattern()
    assert sum(ranks.values()) == 8 and len(set(ranks.values())) > 1  # the budget went where it mattered
    with torch.no_grad():
        want = m(**b).logits
    again = ptune.load_adapter(ptune.save_adapter(m, tmp_path / "ada"), base=liven(tiny_base("bert")),
                               tokenizer=tokenizer)
    assert again.adapter.ranks() == ranks and again.adapter.rank_pattern() == pattern
    assert torch.equal(again.eval()(**b).logits, want)
    # resuming in the final phase keeps the loaded pattern although the optimizer moves pruned lambdas
    again.adapter.set_total_steps(8)
    opt = torch.optim.AdamW([p for p in again.parameters() if p.requires_grad], lr=0.1)
    (again(**b).loss + again.adapter.extra_loss()).backward()
    opt.step()
    assert nonzero_lambdas(again) > 8
    again.adapter.after_optimizer_step(9)
    assert nonzero_lambdas(again) == 8 and again.adapter.rank_pattern() == pattern
    fresh = ptune.load_adapter(untrained, base=liven(tiny_base("bert")), tokenizer=tokenizer)
    assert fresh.adapter.ranks() == {n: 6 for n in fresh.adapter.names}  # all-zero lambdas: untrained, full rank


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # PEFT warns on its own AdaLoRA files too
def test_export_peft_is_read_back_with_its_rank_pattern(tokenizer, tmp_path):
    import peft

    cfg = ptune.AdaLoraConfig(init_r=4, target_r=2, total_step=6, tfinal=1)
    m = ptune.apply(liven(tiny_base("bert")), cfg, tokenizer=tokenizer, labels=("a", "b"))
    b = batch_for(m, tokenizer)
    run(m, b, 6)
    out = ptune.export_peft(m, tmp_path / "peft")
    ref = peft.PeftModel.from_pretrained(liven(tiny_base("bert")), str(out)).eval()
    assert ref.peft_config["default"].peft_type == "ADALORA"
    params = dict(ref.named_parameters())
    for name, r in m.adapter.ranks().items():  # PEFT cut its matrices to the kept ranks
        assert params[f"base_model.model.{name}.lora_A.default"].shape[0] == r
    with torch.no_grad():
        want = m.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        got = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_engine_drives_adalora(tiny_model_dir, toy_task, tmp_path):
    """The training loop calls the hooks by itself: the last checkpoint holds target_r ranks per layer."""
    from ptune.engine import TrainConfig, train
    from ptune.engine.checkpoint import latest_checkpoint

    cfg = TrainConfig(model=tiny_model_dir, method="adalora", method_options={"init_r": 4, "target_r": 2, "tfinal": 2},
                      epochs=2, batch_size=8, lr=1e-2, eval_every=0, progress=False, output_dir=str(tmp_path / "run"),
                      precision="fp32", **toy_task)
    summary = train(cfg)
    assert summary["steps"] == 10
    saved = ptune.load_adapter(latest_checkpoint(tmp_path / "run"), tokenizer=None, base_name=tiny_model_dir)
    assert sum(saved.adapter.ranks().values()) == 2 * len(saved.adapter.names)


def test_config_errors(tokenizer):
    for bad, match in [(dict(init_r=4, target_r=6), "need 1 <= target_r <= init_r"),
                       (dict(beta1=1.0), r"beta1=1.0 must be in \(0, 1\)"),
                       (dict(deltaT=0), "deltaT >= 1"),
                       (dict(total_step=5, tinit=3, tfinal=2), "no budgeting phase"),
                       (dict(orth_reg_weight=-1), "orth_reg_weight >= 0")]:
        with pytest.raises(ConfigError, match=match):
            ptune.AdaLoraConfig(**bad)
    with pytest.raises(ConfigError, match=r"init_r=40 exceeds the width of .*query \(32 -> 32\)"):
        ptune.apply(tiny_base("bert"), ptune.AdaLoraConfig(init_r=40, target_r=2), tokenizer=tokenizer)
    m = ptune.apply(tiny_base("bert"), ptune.AdaLoraConfig(tinit=5, tfinal=5), tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="total_step=8 leaves no budgeting phase"):
        m.adapter.set_total_steps(8)
