"""Layer ranges and the work a frozen base skips (ptune.methods.layers, ptune.frozen).

What a user relies on: ``layers`` puts the method in exactly the named layers (the ones below compute
what the base computes, and get no backward pass); the cached path and the pruned last layer give the
same logits and gradients as the plain path; the cache is never used where its inputs could differ.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import liven, tiny_base

import ptune
from ptune.batching import collate
from ptune.errors import ConfigError
from ptune.frozen import FrozenWork
from ptune.methods.layers import check_layers, layer_list, resolve_layers

TEXTS = ["the match ended in a draw", "stir the sauce gently please", "a late goal won the cup", "bake"]


def four_layer_bert(kind: str = "backbone"):
    import transformers as tf
    from conftest import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("bert")
    cfg.num_hidden_layers = 4
    model = (tf.AutoModel if kind == "backbone" else tf.AutoModelForMaskedLM).from_config(cfg)
    model.config._ptune_source = "tiny-bert-4"
    return liven(model.eval())


def build(config, tokenizer, head: str = "classification", pooling: str = "cls", kind: str = "backbone"):
    base = four_layer_bert(kind)
    if head == "verbalizer":
        model = ptune.apply(base, config, head=ptune.HeadConfig("verbalizer", dropout=0.0), tokenizer=tokenizer,
                            labels=["good", "bad"], template="{text} {mask}")
    else:
        model = ptune.apply(base, config, head=ptune.HeadConfig(head, num_labels=3, dropout=0.0, pooling=pooling),
                            tokenizer=tokenizer, template="{text}")
    enc = ptune.TemplateEncoder(model.template, tokenizer)
    batch = collate([enc.encode({"text": t}) for t in TEXTS], pad_id=tokenizer.pad_token_id,
                    targets=[0, 1, 1, 0] if head == "verbalizer" else [0, 1, 2, 1])
    with torch.no_grad():  # a trained-looking adapter: nothing at its zero / random start by accident
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model, batch


def logits_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def assert_same(a, b, atol=1e-5):
    la, ga = a
    lb, gb = b
    torch.testing.assert_close(la, lb, atol=atol, rtol=atol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=atol, msg=n)


# --- the layers option ---------------------------------------------------------------------------------

def test_layer_forms_resolve_to_zero_based_indices():
    assert resolve_layers(None, 12) == tuple(range(12))
    assert resolve_layers("all", 4) == (0, 1, 2, 3)
    assert resolve_layers("top:6", 12) == tuple(range(6, 12))
    assert resolve_layers("bottom:2", 12) == (0, 1)
    assert resolve_layers("7-12", 12) == tuple(range(6, 12))
    assert resolve_layers("1, 3,5-6", 12) == (0, 2, 4, 5)
    assert check_layers(" top:3 ") == "top:3"
    # auto: the upper half, rounded up (P-Tuning v2's default)
    assert [resolve_layers("auto", n) for n in (1, 2, 5, 6, 12)] == [
        (0,), (1,), (2, 3, 4), (3, 4, 5), tuple(range(6, 12))]
    assert check_layers(" auto ") == "auto"


def test_p_tuning_v2_defaults_to_the_upper_half_and_saved_adapters_keep_their_layers(tokenizer):
    from ptune.methods import saved_method_config

    assert ptune.PTuningV2Config().layers == "auto" and ptune.PrefixTuningConfig().layers is None
    model, _ = build(ptune.PTuningV2Config(num_virtual_tokens=3), tokenizer)  # 4 layers
    assert model.adapter.chosen == (2, 3)
    assert FrozenWork(model, prune_last=False).first == 2  # the two lower layers: cached, no backward
    with pytest.raises(ConfigError, match="--layers all"):
        model.adapter.peft_export(None)
    # an adapter saved before the option existed had prompts in every layer, and is read so
    assert saved_method_config("p_tuning_v2", {"num_virtual_tokens": 3}).layers is None
    assert saved_method_config("p_tuning_v2", {"num_virtual_tokens": 3, "layers": "auto"}).layers == "auto"
    assert saved_method_config("lora", {"r": 2}).layers is None


@pytest.mark.parametrize("value,needle", [("top:0", "numbered from 1"), ("5-3", "runs backwards"),
                                          ("middle", "cannot read"), ("1-13", "the model has 12"),
                                          ("top:13", "the model has 12"), (["top:3"], "must be a string")])
def test_bad_layer_forms_are_one_line_errors(value, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        resolve_layers(value, 12)
    assert "\n" not in str(e.value)


def test_method_configs_check_layers_when_built():
    with pytest.raises(ConfigError, match="cannot read"):
        ptune.PTuningV2Config(layers="upper")
    with pytest.raises(ConfigError, match="cannot read"):
        ptune.LoraConfig(layers="6..12")


@pytest.mark.parametrize("method", ["p_tuning_v2", "lora"])
def test_layers_put_the_method_in_those_layers_only(method, tokenizer):
    config = (ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2") if method == "p_tuning_v2"
              else ptune.LoraConfig(r=2, layers="3-4"))
    model, batch = build(config, tokenizer)
    plain = four_layer_bert()
    assert model.adapter.first_layer == 2
    seen: dict[str, list[torch.Tensor]] = {"adapted": [], "plain": []}
    for name, m in (("adapted", model.base), ("plain", plain)):
        for layer in layer_list(m):
            layer.register_forward_hook(lambda _m, _a, out, name=name: seen[name].append(out))
    with torch.no_grad():
        model(**batch)
        plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for i in range(4):
        same = torch.allclose(seen["adapted"][i], seen["plain"][i], atol=1e-6)
        assert same == (i < 2), f"layer {i + 1}: {'unchanged' if same else 'changed'}"
    if method == "lora":
        assert all(".layer.2." in n or ".layer.3." in n for n in model.adapter.names)
        assert len(model.adapter.names) == 4  # query and value of layers 3 and 4
    else:
        assert model.adapter.encoder.embedding.shape[-1] == 2 * 2 * 4 * 8  # 2 layers, K and V, 4 heads x 8 dims


def test_no_backward_below_the_lowest_adapted_layer(tokenizer):
    model, batch = build(ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"), tokenizer)
    model.train()
    outs = []
    for layer in layer_list(model.base):
        layer.register_forward_hook(lambda _m, _a, out: outs.append(out))
    model(**batch).loss.backward()
    assert [o.requires_grad for o in outs] == [False, False, True, True]


def test_a_layer_ranged_prefix_has_no_peft_form(tokenizer):
    model, _ = build(ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"), tokenizer)
    with pytest.raises(ConfigError, match="every layer"):
        model.adapter.peft_export(None)


# --- the cached frozen layers --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["p_tuning_v2", "prefix_tuning", "lora"])
def test_cached_path_gives_the_plain_logits_and_gradients(method, tokenizer):
    config = {"p_tuning_v2": ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"),
              "prefix_tuning": ptune.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16, layers="3-4"),
              "lora": ptune.LoraConfig(r=2, layers="top:2")}[method]
    model, batch = build(config, tokenizer)
    model.eval()  # LoRA keeps the base's dropout on in training; the tiny base has none either way
    plain = logits_and_grads(model, batch)
    model.frozen = FrozenWork(model, prune_last=False)
    first = logits_and_grads(model, batch)  # computes and stores
    second = logits_and_grads(model, batch)  # every row cached: layers 1-2 skipped
    assert model.frozen.stats["computed_batches"] == 1 and model.frozen.stats["cached_batches"] == 1
    assert model.frozen.summary()["cached_rows"] == 4
    assert_same(plain, first)
    assert_same(plain, second)


def test_cached_rows_skip_the_lower_layers(tokenizer):
    model, batch = build(ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"), tokenizer)
    model.frozen = FrozenWork(model, prune_last=False)
    calls = []
    for i, layer in enumerate(layer_list(model.base)):  # a layer that runs projects its queries
        layer.attention.self.query.register_forward_pre_hook(lambda *_a, i=i: calls.append(i))
    with torch.no_grad():
        model(**batch)
        assert calls == [0, 1, 2, 3]
        model(**batch)
    assert calls == [0, 1, 2, 3, 2, 3]
    assert model.frozen.stats["cached_batches"] == 1


def test_bf16_cache_stays_within_bf16_tolerance(tokenizer):
    model, batch = build(ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"), tokenizer)
    plain = logits_and_grads(model, batch)
    model.frozen = FrozenWork(model, prune_last=False, cache_dtype=torch.bfloat16)
    logits_and_grads(model, batch)
    cached = logits_and_grads(model, batch)
    assert model.frozen.stats["cached_batches"] == 1
    assert_same(plain, cached, atol=5e-2)
    assert model.frozen.summary()["cache_mb"] * 2 ** 20 == pytest.approx(
        sum(int(n) for n in batch["attention_mask"].sum(1)) * 32 * 2, abs=1e5)


def test_a_changed_input_is_a_new_key(tokenizer):
    """Template, truncation and max length all change the token ids the lower layers see: no stale hit."""
    model, batch = build(ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"), tokenizer)
    model.frozen = FrozenWork(model, prune_last=False)
    with torch.no_grad():
        model(**batch)
        for changed in (ptune.TemplateEncoder(ptune.Template.parse("Text: {text}"), tokenizer),
                        ptune.TemplateEncoder(model.template, tokenizer, max_length=5)):
            rows = collate([changed.encode({"text": t}) for t in TEXTS], pad_id=tokenizer.pad_token_id)
            assert not torch.equal(rows["input_ids"][:, :3], batch["input_ids"][:, :3]) or \
                rows["input_ids"].shape != batch["input_ids"].shape
            model(**rows)
    assert model.frozen.stats == {"cached_batches": 0, "computed_batches": 3, "pruned_passes": 0}


def test_cache_is_not_used_where_it_could_differ(tokenizer):
    model, batch = build(ptune.LoraConfig(r=2, layers="top:2"), tokenizer)
    frozen = model.frozen = FrozenWork(model, prune_last=False)
    with torch.no_grad():
        model(**batch)
        model(**batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
        left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}  # left padding
        model(**left)
    assert frozen.stats["cached_batches"] == 0
    # dropout in a lower layer while training (--base-dropout on): outputs differ per call, so no cache
    for m in layer_list(model.base)[0].modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    frozen = model.frozen = FrozenWork(model, prune_last=False)
    model.base_dropout = True
    model.train()
    model(**batch)
    model(**batch)
    assert frozen.stats["cached_batches"] == 0 and not frozen.store
    model.eval()
    with torch.no_grad():
        model(**batch)
        model(**batch)
    assert frozen.stats["cached_batches"] == 1


def test_cache_limit_bounds_what_is_kept(tokenizer):
    model, batch = build(ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"), tokenizer)
    row = int(batch["attention_mask"][0].sum()) * 32 * 4
    model.frozen = FrozenWork(model, prune_last=False, cache_limit_mb=(row + 1) / 2 ** 20)
    with torch.no_grad():
        model(**batch)
        model(**batch)
    assert len(model.frozen.store) == 1 and model.frozen.stats["cached_batches"] == 0


def test_full_depth_methods_cache_nothing(tokenizer):
    for config in (ptune.PTuningV2Config(num_virtual_tokens=3, layers="all"), ptune.PromptTuningConfig(num_virtual_tokens=2),
                   ptune.LoraConfig(r=2)):
        model, _ = build(config, tokenizer)
        assert FrozenWork(model, prune_last=False).describe() is None


# --- the pruned last layer -----------------------------------------------------------------------------

PRUNE_CASES = {
    "p_tuning_v2-cls": (lambda: ptune.PTuningV2Config(num_virtual_tokens=3), "classification", "cls"),
    "prefix-pooler": (lambda: ptune.PrefixTuningConfig(num_virtual_tokens=2, encoder_hidden_size=16),
                      "classification", "pooler"),
    "lora-cls": (lambda: ptune.LoraConfig(r=2), "classification", "cls"),
    "prompt_tuning-cls": (lambda: ptune.PromptTuningConfig(num_virtual_tokens=2), "classification", "cls"),
    "p_tuning_v2-verbalizer": (lambda: ptune.PTuningV2Config(num_virtual_tokens=3), "verbalizer", "auto"),
    "lora-verbalizer": (lambda: ptune.LoraConfig(r=2), "verbalizer", "auto"),
}


@pytest.mark.parametrize("case", PRUNE_CASES)
def test_pruned_last_layer_gives_the_plain_logits_and_gradients(case, tokenizer):
    make, head, pooling = PRUNE_CASES[case]
    model, batch = build(make(), tokenizer, head=head, pooling=pooling,
                         kind="masked_lm" if head == "verbalizer" else "backbone")
    plain = logits_and_grads(model, batch)
    model.frozen = FrozenWork(model, cache=False)
    assert model.frozen.prune
    pruned = logits_and_grads(model, batch)
    assert model.frozen.stats["pruned_passes"] == 1
    assert_same(plain, pruned)


def test_heads_that_read_every_position_are_not_pruned(tokenizer):
    model, batch = build(ptune.PTuningV2Config(num_virtual_tokens=3), tokenizer, pooling="mean")
    plain = logits_and_grads(model, batch)
    model.frozen = FrozenWork(model, cache=False)
    assert_same(plain, logits_and_grads(model, batch))
    assert model.frozen.stats["pruned_passes"] == 0


def test_both_levers_together_with_a_layer_range(tokenizer):
    model, batch = build(ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"), tokenizer)
    plain = logits_and_grads(model, batch)
    model.frozen = FrozenWork(model)
    logits_and_grads(model, batch)
    assert_same(plain, logits_and_grads(model, batch))
    assert model.frozen.stats == {"cached_batches": 1, "computed_batches": 1, "pruned_passes": 2}


def test_other_architectures_run_the_full_last_layer(tokenizer):
    base = liven(tiny_base("llama", "backbone"))
    model = ptune.apply(base, ptune.PTuningV2Config(num_virtual_tokens=2),
                        head=ptune.HeadConfig("classification", num_labels=2), tokenizer=tokenizer)
    assert not FrozenWork(model).prune


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_causal_lm_head_scores_only_the_target_tokens(arch, tokenizer):
    from ptune.heads import head_kind

    base = liven(tiny_base(arch, "causal_lm"))
    model = ptune.apply(base, ptune.PTuningV2Config(num_virtual_tokens=2),
                        head=ptune.HeadConfig("causal_lm", dropout=0.0), tokenizer=tokenizer)
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=True)
    rows = [enc.encode({"text": t}, target=y) for t, y in zip(TEXTS, [" yes", " no thanks", " a", " b c d"])]
    batch = collate(rows, pad_id=tokenizer.pad_token_id)
    plain = logits_and_grads(model, batch)
    model.frozen = FrozenWork(model, cache=False)
    assert model.frozen.targets_only
    packed = logits_and_grads(model, batch)
    scored = batch["labels"][:, 1:] != -100
    assert packed[0].shape == (int(scored.sum()), plain[0].shape[-1])
    torch.testing.assert_close(packed[0], plain[0][:, :-1][scored], atol=1e-5, rtol=1e-5)
    assert_same((plain[1], plain[1]), (packed[1], packed[1]))  # gradients (and the loss through them)
    kind = head_kind("causal_lm")
    lengths = [len(r.input_ids) for r in rows]
    for a, b in zip(kind.rows(plain[0], batch["labels"], lengths), kind.rows(packed[0], batch["labels"], lengths)):
        assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_on_disk_gives_the_same_rows(dtype, tokenizer, tmp_path):
    model, batch = build(ptune.PTuningV2Config(num_virtual_tokens=3, layers="top:2"), tokenizer)
    model.frozen = FrozenWork(model, prune_last=False, cache_dtype=dtype)
    logits_and_grads(model, batch)
    in_memory = logits_and_grads(model, batch)
    model.frozen = FrozenWork(model, prune_last=False, cache_dtype=dtype, cache_dir=str(tmp_path / "cache"),
                              cache_limit_mb=1)
    logits_and_grads(model, batch)
    on_disk = logits_and_grads(model, batch)
    assert model.frozen.stats["cached_batches"] == 1 and model.frozen.disk is not None
    assert list((tmp_path / "cache").iterdir()) == []  # the file is the process's own: unlinked once mapped
    assert_same(in_memory, on_disk, atol=0)


def test_engine_run_with_a_layer_range_matches_with_and_without_the_levers(tiny_model_dir, toy_task, tmp_path):
    """Three epochs of a top-layer P-Tuning v2 run: cached and pruned, or the plain path, the same numbers."""
    from ptune.engine import TrainConfig, train

    def run(name, **levers):
        cfg = TrainConfig(model=tiny_model_dir, **toy_task, method="p_tuning_v2", epochs=3, batch_size=8, lr=3e-2,
                          method_options={"num_virtual_tokens": 3, "layers": "top:1"}, head_dropout=0.0,
                          output_dir=str(tmp_path / name), progress=False, log_every=1, **levers)
        return train(cfg)

    fast = run("fast")
    plain = run("plain", cache_frozen_layers=False, prune_last_layer=False)
    work = fast["frozen_work"]
    assert work["cached_batches"] > work["computed_batches"] > 0 and work["pruned_passes"] > 0
    assert "frozen_work" not in plain
    assert fast["best_validation_accuracy"] == plain["best_validation_accuracy"]
    assert fast["test"] == pytest.approx(plain["test"], abs=1e-6)
    logs = [[json.loads(line) for line in open(tmp_path / n / "metrics.jsonl")] for n in ("fast", "plain")]
    losses = [[r["loss"] for r in log if "loss" in r and "split" not in r] for log in logs]
    assert len(losses[0]) == 15 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert len(set(losses[0])) > 1


@pytest.mark.parametrize("method,option,want", [("lora", "auto", False), ("p_tuning_v2", "auto", False),
                                                ("bitfit", "auto", True), ("full", "auto", True),
                                                ("lora", "on", True), ("bitfit", "off", False)])
def test_base_dropout_follows_the_method_unless_told(method, option, want, tiny_model_dir, toy_task, tokenizer):
    """A frozen base (prompts, LoRA) trains without its own dropout; BitFit / full fine-tuning keep it."""
    from ptune.engine import TrainConfig
    from ptune.engine.build import build_model, load_task

    cfg = TrainConfig(model=tiny_model_dir, **toy_task, method=method, base_dropout=option)
    task, _ = load_task(cfg, tokenizer)
    model = build_model(cfg, task, tokenizer).train()
    dropouts = [m for m in model.base.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training is want for m in dropouts)
    with pytest.raises(ConfigError, match="base_dropout='sometimes' is invalid"):
        TrainConfig(base_dropout="sometimes")


def test_a_lora_run_answers_merged_and_switches_off_exactly(tiny_model_dir, toy_task, tmp_path):
    """Run merges a single LoRA adapter into its base for inference: the same answers, and
    disable_adapter() still computes exactly the frozen base (the original weights are restored)."""
    from ptune.engine import Run, TrainConfig, train
    from ptune.methods.lora import LowRankLayer

    cfg = TrainConfig(model=tiny_model_dir, **toy_task, method="lora", epochs=1, batch_size=8, lr=5e-2,
                      output_dir=str(tmp_path / "run"), progress=False)
    train(cfg)
    run = Run(tmp_path / "run")
    layers = [m for m in run.model.modules() if isinstance(m, LowRankLayer)]
    assert layers and all(m.merged for m in layers)
    unmerged = ptune.load_adapter(tmp_path / "run" / "best").eval()
    enc = run.encoder
    batch = collate([enc.encode({"text": t}) for t in TEXTS], pad_id=run.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(run.model(**batch).logits, unmerged(**batch).logits, atol=1e-5, rtol=1e-5)
        with unmerged.disable_adapter():
            base = unmerged(**batch).logits
        weights = [m.base_layer.weight.clone() for m in layers]
        with run.model.disable_adapter():
            assert torch.equal(run.model(**batch).logits, base)
        assert all(m.merged for m in layers)
        assert all(torch.equal(m.base_layer.weight, w) for m, w in zip(layers, weights))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert run.evaluate("validation")["accuracy"] == summary["best_validation_accuracy"]
