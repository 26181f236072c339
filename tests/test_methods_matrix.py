"""The method x architecture x head matrix: shapes, losses, parameter counts, frozen base, training.

Every prompt method runs on every tiny architecture with every head that fits it. Each case checks
what a user relies on: the logits have the head's shape, the loss is finite, exactly the method's
parameters (and the head's) are trainable, a few AdamW steps leave the base bit-identical, move every
adapter tensor and drive the loss down on a fixed tiny batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import ARCH_CASES, ARCHS, HEAD_CASES, TEXTS, VOCAB, method_config, methods
from conftest import liven, tiny_base

import ptune
from ptune.batching import collate
from ptune.models import arch_facts



# the prompt methods (and P-Tuning's encoder variants) x every tiny architecture x its one-row heads (tests/cases.py)
METHODS = methods(lambda c: c.prompts, variants=("p_tuning-mlp-residual-hiddenln", "p_tuning-none-layernorm",
                                                 "p_tuning-lstm-residual-layernorm"))
CASES = [(m, a, h) for a in ARCHS for h in ARCH_CASES[a].heads for m in METHODS
         if not ptune.HEAD_KINDS[h].multi_row]


def build(method: str, arch: str, head: str, tokenizer, *, num_tasks: int = 1):
    """(model, batch) for one matrix case; the batch has 4 rows of different lengths."""
    h, decoder = HEAD_CASES[head], ARCH_CASES[arch].decoder
    base = liven(tiny_base(arch, h.base_kind(decoder)))
    config = method_config(method, field=h.field, tail=h.tail)
    if num_tasks != 1:
        import dataclasses

        config = dataclasses.replace(config, num_tasks=num_tasks)
    model = ptune.apply(base, config, head=h.head_config(), tokenizer=tokenizer, template=h.template(),
                        labels=h.labels)
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=decoder)
    rows, targets = h.examples(enc)
    return model, collate(rows, pad_id=tokenizer.pad_token_id, targets=targets)


def expected_trainable(method: str, model) -> int:
    """The parameter count each method's paper/design implies, written out by hand."""
    f = arch_facts(model.base)
    d, cfg = f.hidden_size, model.method_config
    T = cfg.num_tasks
    head = 0
    if model.head_config.kind in ("classification", "tagging"):
        head = d * model.head_config.num_labels + model.head_config.num_labels
    kv = f.num_layers * 2 * f.num_key_value_heads * f.head_dim  # one prefix position, all layers, K and V
    if method == "prompt_tuning":
        return T * cfg.num_virtual_tokens * d + head
    if method.startswith("p_tuning") and method != "p_tuning_v2":
        n = model.template.num_virtual_tokens
        enc = 0
        if cfg.encoder == "lstm":
            h = cfg.encoder_hidden_size or d // 2
            for layer in range(cfg.encoder_num_layers):
                inp = d if layer == 0 else 2 * h
                enc += 2 * (4 * h * inp + 4 * h * h + 8 * h)  # two directions, W_ih, W_hh, b_ih, b_hh
            enc += (2 * h * 2 * h + 2 * h) + (2 * h * d + d)  # the MLP on top
            enc += 2 * (2 * h) if cfg.hidden_layer_norm else 0  # LayerNorm on its hidden layer
        elif cfg.encoder == "mlp":
            h = cfg.encoder_hidden_size or d
            dims = [d] + [h] * (cfg.encoder_num_layers - 1) + [d]
            enc += sum(a * b + b for a, b in zip(dims, dims[1:]))
            enc += sum(2 * w for w in dims[1:-1]) if cfg.hidden_layer_norm else 0  # LayerNorm per hidden layer
        if cfg.layer_norm:
            enc += 2 * d
        return T * n * d + enc + head
    P = cfg.num_virtual_tokens
    if method == "p_tuning_v2":
        return T * P * kv + head
    e = cfg.encoder_hidden_size
    return T * P * d + (d * e + e) + (e * kv + kv) + head


def expected_shape(head: str, batch) -> tuple[int, ...]:
    return HEAD_CASES[head].shape(*batch["input_ids"].shape)


@pytest.mark.parametrize("method, arch, head", CASES, ids=[f"{m}-{a}-{h}" for m, a, h in CASES])
def test_matrix(method, arch, head, tokenizer):
    torch.manual_seed(0)
    model, batch = build(method, arch, head, tokenizer)

    # shapes and a finite loss
    out = model(**batch)
    assert tuple(out.logits.shape) == expected_shape(head, batch)
    assert out.loss is not None and torch.isfinite(out.loss)

    # exactly the method's parameters (plus the head's) are trainable, none of the base
    trainable, total = model.trainable_parameters()
    assert trainable == expected_trainable(method, model)
    assert not any(p.requires_grad for p in model.base.parameters())
    assert total > trainable

    # the virtual tokens / prefixes matter: without them the output is different
    if model.template.num_virtual_tokens:
        plain = model(**{**batch, "virtual_index": torch.full_like(batch["virtual_index"], -1)})
        assert not torch.allclose(plain.logits, out.logits, atol=1e-4)

    # training: base bit-identical, every adapter tensor moves, the loss goes down
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    adapter_before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)  # no decay: only gradients move weights
    model.train()
    losses = []
    for step in range(20):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            no_grad = [k for k, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not no_grad, f"no gradient reaches {no_grad}"
        opt.step()
        losses.append(loss.item())
    model.eval()
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base tensor {k} changed"
    unchanged = [k for k, p in params.items() if torch.equal(p.detach(), adapter_before[k])]
    assert not unchanged, f"adapter tensors did not move: {unchanged}"
    assert all(math.isfinite(x) for x in losses)
    with torch.no_grad():
        final = model(**batch).loss.item()
    # a 30522-way LM loss moves slowly with a handful of prompt vectors; the other heads overfit 4 rows
    if head == "causal_lm":
        assert final < losses[0] - 0.25, f"loss {losses[0]:.4f} -> {final:.4f}: no learning"
    else:
        assert final < 0.75 * losses[0], f"loss {losses[0]:.4f} -> {final:.4f}: no learning"


@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_count_scales_with_num_tasks(method, tokenizer):
    one, _ = build(method, "llama", "classification", tokenizer)
    three, _ = build(method, "llama", "classification", tokenizer, num_tasks=3)
    assert one.trainable_parameters()[0] == expected_trainable(method, one)
    assert three.trainable_parameters()[0] == expected_trainable(method, three)
    # only the per-task table grows; encoders and the head are shared by all tasks
    grown = three.trainable_parameters()[0] - one.trainable_parameters()[0]
    table = {"prompt_tuning": "weight", "p_tuning_v2": "encoder.embedding",
             "prefix_tuning": "encoder.embedding"}.get(method, "embedding")
    assert grown == 2 * getattr_path(one.adapter, table)[0].numel()


def getattr_path(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def test_verbalizer_label_words_are_resolved_and_checked(tokenizer):
    base = tiny_base("bert", "masked_lm")
    model = ptune.apply(base, ptune.PromptTuningConfig(num_virtual_tokens=2), head=ptune.HeadConfig("verbalizer"),
                        tokenizer=tokenizer, labels=["positive", "negative"], label_words=["good", "bad"])
    good, bad = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("good", "bad"))
    assert model.head_config.label_word_ids == (good, bad)
    assert model.labels == ("positive", "negative") and model.label_words == ("good", "bad")
    with pytest.raises(ptune.ConfigError, match="differ"):
        ptune.HeadConfig("verbalizer", label_word_ids=(good, good))
    with pytest.raises(ptune.ConfigError, match="label words"):
        ptune.apply(tiny_base("bert", "masked_lm"), ptune.PromptTuningConfig(num_virtual_tokens=2),
                    head=ptune.HeadConfig("verbalizer"), tokenizer=tokenizer)
    with pytest.raises(ptune.ConfigError, match="mask"):
        ptune.apply(tiny_base("bert", "masked_lm"), ptune.PromptTuningConfig(num_virtual_tokens=2),
                    head=ptune.HeadConfig("verbalizer"), tokenizer=tokenizer, labels=["a", "b"],
                    template="{text}")


# ---------------------------------------------------------------- gradient checkpointing


def _loss_and_grads(method: str, arch: str, tokenizer, checkpointing: bool):
    model, batch = build(method, arch, "classification", tokenizer)
    calls = []
    # a module inside the checkpointed layer runs again when the backward pass recomputes the layer
    attn = model.backbone.layers[0].self_attn if arch == "llama" else model.backbone.encoder.layer[0].attention
    attn.register_forward_hook(lambda *a: calls.append(1))
    if checkpointing:
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert not attn.training  # the frozen base keeps its (attention) dropout off either way
    out = model(**batch)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, len(calls)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", ["p_tuning_v2", "prefix_tuning"])
def test_gradient_checkpointing_gives_same_loss_and_grads(method, arch, tokenizer):
    loss, grads, calls = _loss_and_grads(method, arch, tokenizer, False)
    loss_ck, grads_ck, calls_ck = _loss_and_grads(method, arch, tokenizer, True)
    assert calls == 1 and calls_ck == 2  # the layer really was recomputed in the backward pass
    torch.testing.assert_close(loss_ck, loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_ck.keys()
    for k in grads:
        assert grads[k].abs().sum() > 0
        torch.testing.assert_close(grads_ck[k], grads[k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- models outside AttentionInterface


def _unsupported(name: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)
    if name == "mpnet":
        return tf.MPNetModel(tf.MPNetConfig(**common)).eval()
    return tf.DebertaV2Model(tf.DebertaV2Config(**common, max_position_embeddings=128)).eval()


@pytest.mark.parametrize("name", ["mpnet", "deberta-v2"])
@pytest.mark.parametrize("method", ["p_tuning_v2", "prefix_tuning"])
def test_deep_prompts_refuse_models_outside_attention_interface(name, method, tokenizer):
    base = _unsupported(name)
    cfg = ptune.make_config(method, num_virtual_tokens=3)
    with pytest.raises(ptune.UnsupportedModelError) as info:
        ptune.apply(base, cfg, head=ptune.HeadConfig("classification", num_labels=2), tokenizer=tokenizer)
    msg = str(info.value)
    assert type(base).__name__ in msg
    for alternative in ("prompt_tuning", "p_tuning", "lora"):
        assert alternative in msg


@pytest.mark.parametrize("name", ["mpnet", "deberta-v2"])
def test_input_prompts_still_work_on_models_outside_attention_interface(name, tokenizer):
    base = _unsupported(name)
    model = ptune.apply(base, ptune.PromptTuningConfig(num_virtual_tokens=3),
                        head=ptune.HeadConfig("classification", num_labels=2), tokenizer=tokenizer)
    assert arch_facts(base).is_encoder and model.head.pooling == "cls"  # an encoder, even outside the interface
    enc = ptune.TemplateEncoder(model.template, tokenizer)
    batch = collate([enc.encode({"text": t}) for t in TEXTS], pad_id=0, targets=[0, 1, 0, 1])
    out = model(**batch)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.adapter.weight.grad.abs().sum() > 0
