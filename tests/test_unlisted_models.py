"""Architectures beyond the tiny zoo of conftest: every method trains a step or refuses in one line.

Tiny random DistilBERT, ALBERT, ELECTRA, DeBERTa-v2, Falcon, Phi and Qwen2 models (hidden 32, 2
layers) built from configs. LoRA's default targets come from ptune's table (DistilBERT, ELECTRA) or
are found from the model's own attention modules (the rest): the expected layers are written out by
hand. P-Tuning v2 / prefix tuning need attention through transformers' AttentionInterface with one
module per layer; where a family lacks it (DeBERTa-v2, Falcon: no interface; ALBERT: one module shared
across layers) they refuse in one line naming the methods that work.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from cases import METHOD_CASES, TARGETS, TEXTS, VOCAB, method_config, methods
from conftest import liven
from torch import nn

import ptune
from ptune.batching import collate
from ptune.methods.lora import find_targets, resolve_targets

COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def family_config(family: str, hidden: int = 32):
    c = dict(COMMON, hidden_size=hidden)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=hidden, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0,
                                   attention_dropout=0.0)
    if family == "albert":
        return tf.AlbertConfig(**c, embedding_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "electra":
        return tf.ElectraConfig(**c, embedding_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "deberta-v2":
        return tf.DebertaV2Config(**c, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "falcon":
        return tf.FalconConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                               bos_token_id=101, eos_token_id=102, pad_token_id=0)
    if family == "phi":
        return tf.PhiConfig(**c, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    if family == "qwen2":
        return tf.Qwen2Config(**c, num_key_value_heads=2, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    raise ValueError(family)


ENCODERS = ("distilbert", "albert", "electra", "deberta-v2")
DECODERS = ("falcon", "phi", "qwen2")
FAMILIES = ENCODERS + DECODERS
# prefix methods refused: no AttentionInterface (DeBERTa-v2, Falcon), one attention module for all layers (ALBERT)
NO_PREFIX = {"albert", "deberta-v2", "falcon"}
ALTERNATIVES = ("lora", "prompt_tuning", "p_tuning", "bitfit")

# LoRA's default targets per family, by hand: (full names in the backbone, found by ptune rather than its table)
EXPECTED_TARGETS = {
    "distilbert": ([f"transformer.layer.{i}.attention.{n}" for i in (0, 1) for n in ("q_lin", "v_lin")], False),
    "albert": (["encoder.albert_layer_groups.0.albert_layers.0.attention.query",
                "encoder.albert_layer_groups.0.albert_layers.0.attention.value"], True),
    "electra": ([f"encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")], False),
    "deberta-v2": ([f"encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query_proj", "value_proj")],
                   True),
    "falcon": ([f"h.{i}.self_attention.query_key_value" for i in (0, 1)], True),
    "phi": ([f"layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")], True),
    "qwen2": ([f"layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")], True),
}


def family_base(family: str, kind: str = "backbone", hidden: int = 32):
    torch.manual_seed(0)
    auto = {"backbone": tf.AutoModel, "causal_lm": tf.AutoModelForCausalLM, "masked_lm": tf.AutoModelForMaskedLM}
    model = auto[kind].from_config(family_config(family, hidden))
    model.config._ptune_source = f"tiny-{family}"
    return liven(model.eval())


def make(method: str, family: str, head: str, tokenizer):
    """(model, batch) for one case: 4 rows of different lengths."""
    quant = METHOD_CASES[method].base_4bit == "only"
    kind = {"classification": "backbone", "causal_lm": "causal_lm",
            "verbalizer": "masked_lm" if family in ENCODERS else "causal_lm"}[head]
    base = family_base(family, kind, hidden=64 if quant else 32)  # NF4 quantizes layers 64 inputs wide
    if quant:
        from ptune.quantize import quantize_model

        base = quantize_model(base, "nf4")
    template = "{text}" + (" {mask}" if head == "verbalizer" else "")
    config = method_config(method, tail=template[len("{text}"):])
    model = ptune.apply(base, config, head=ptune.HeadConfig(head, num_labels=2, dropout=0.0), tokenizer=tokenizer,
                        template=template, labels=["good", "bad"] if head == "verbalizer" else ())
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=family in DECODERS)
    if head == "causal_lm":
        return model, collate([enc.encode({"text": t}, target=y) for t, y in zip(TEXTS, TARGETS)],
                              pad_id=tokenizer.pad_token_id)
    return model, collate([enc.encode({"text": t}) for t in TEXTS], pad_id=tokenizer.pad_token_id,
                          targets=[0, 1, 0, 1])


def refused(method: str, family: str) -> bool:
    return METHOD_CASES[method].deep_prompts and family in NO_PREFIX


# QLoRA on a 4-bit base (as the shared matrix has it), one head per family; Falcon's FalconLinear layers are
# not nn.Linear, so quantize_model leaves them unquantized and QLoRA refuses that base (its own check)
TRAINED = methods(lambda c: c.base_4bit != "only")
ON_4BIT = methods(lambda c: c.base_4bit == "only")
CASES = ([(m, f, "classification") for f in FAMILIES for m in TRAINED]
         + [(m, f, "causal_lm") for f in DECODERS for m in TRAINED]
         + [(m, f, "classification") for f in FAMILIES if f != "falcon" for m in ON_4BIT])


@pytest.mark.parametrize("method, family, head", CASES, ids=[f"{m}-{f}-{h}" for m, f, h in CASES])
def test_trains_a_step_or_refuses(method, family, head, tokenizer):
    if refused(method, family):
        with pytest.raises(ptune.PtuneError) as err:
            make(method, family, head, tokenizer)
        message = str(err.value)
        assert "\n" not in message and method in message
        assert all(alt in message for alt in ALTERNATIVES), message
        return
    model, batch = make(method, family, head, tokenizer)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    trained, total = model.trainable_parameters()
    assert 0 < trained and (trained == total) == (method == "full")
    trainable = {p.data_ptr() for p in params.values()}
    frozen = {k: v.clone() for k, v in model.base.state_dict().items() if v.data_ptr() not in trainable}
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(2):  # two steps: LoRA's A (and AdaLoRA's P, Q) get gradients once B (lambda) left zero
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    changed = [k for k, p in params.items() if not torch.equal(p.detach(), before[k])]
    # every tensor of the method moved (ptune's head reads the hidden states, so a BERT-style pooler gets no gradient)
    adapter = [k for k in params if not k.startswith("head.") and ".pooler." not in k]
    assert adapter, "the method put no trainable tensor on the model"
    assert set(adapter) <= set(changed), f"did not move: {sorted(set(adapter) - set(changed))[:5]}"
    moved = [k for k, v in model.base.state_dict().items() if k in frozen and not torch.equal(v, frozen[k])]
    assert not moved, f"frozen base tensors changed: {moved[:3]}"


# the hand-written prompt needs a verbalizer, which scores through the base's LM head; DistilBERT's and ELECTRA's
# masked-LM heads are several sibling modules that ptune's verbalizer does not assemble (it refuses them)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("distilbert", "electra")])
def test_manual_prompt_trains_nothing(family, tokenizer):
    model, batch = make("manual", family, "verbalizer", tokenizer)
    assert model.trainable_parameters()[0] == 0
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_targets(family):
    expected, discovered = EXPECTED_TARGETS[family]
    base = family_base(family)
    names, note = resolve_targets(base, None, "lora")
    assert names == expected
    assert (note is not None) == discovered
    if discovered:  # the line says what was chosen and why
        leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in expected))
        assert note.startswith(f"lora targets {', '.join(leaves)} ({len(expected)} layers): {type(base).__name__}")
        assert ("fused" in note) == (family == "falcon") and "table" in note
    # the same layers under a task model's prefix, and the note in the model's own description
    lm = family_base(family, "causal_lm" if family in DECODERS else "masked_lm")
    prefix = lm.base_model_prefix + "."
    assert find_targets(lm, None, "lora") == [prefix + n for n in expected]
    model = ptune.apply(base, ptune.LoraConfig(r=2), head=ptune.HeadConfig("classification", num_labels=2))
    assert model.adapter.names == expected
    assert (note in model.describe()) if discovered else ("targets" not in model.describe())


def test_user_targets_win_and_a_miss_is_one_line_naming_the_candidates():
    base = family_base("deberta-v2")
    assert find_targets(base, ("key_proj",), "lora") == [f"encoder.layer.{i}.attention.self.key_proj" for i in (0, 1)]
    assert resolve_targets(base, ("key_proj",), "lora")[1] is None
    with pytest.raises(ptune.ConfigError) as err:
        ptune.apply(base, ptune.LoraConfig(r=2, target_modules=("q_proj",)))
    message = str(err.value)
    assert "\n" not in message and "['q_proj']" in message
    assert all(n in message for n in ("query_proj", "value_proj", "key_proj", "dense")), message


class Toy(nn.Module):
    """A bare 'transformer' whose names ptune has never seen: one attention block, one MLP."""

    def __init__(self, attn: dict[str, tuple[int, int]], mlp: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                      vocab_size=10)
        block = nn.Module()
        block.attention = nn.ModuleDict({k: nn.Linear(*s) for k, s in attn.items()})
        block.mlp = nn.ModuleDict({k: nn.Linear(*s) for k, s in mlp.items()})
        self.layers = nn.ModuleList([block])


def test_discovery_checks_shapes_and_falls_back_to_the_attention_block():
    # q / v inside attention with the right widths; a 'q' in the MLP is no attention projection
    toy = Toy({"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32)}, {"q": (32, 32)})
    assert resolve_targets(toy, None, "lora")[0] == ["layers.0.attention.q", "layers.0.attention.v"]
    # names that look right but widths that do not: not taken for projections, so the whole attention block
    toy = Toy({"q": (32, 7), "v": (32, 32), "proj_out": (32, 32)}, {"fc": (32, 64)})
    names, note = resolve_targets(toy, None, "lora")
    assert names == ["layers.0.attention.q", "layers.0.attention.v", "layers.0.attention.proj_out"]
    assert "all linear layers of its attention blocks" in note
    # a fused projection: heads x head_dim plus a key and a value of whole heads (multi-query: one head each)
    toy = Toy({"query_key_value": (32, 48), "dense": (32, 32)}, {})
    assert resolve_targets(toy, None, "lora")[0] == ["layers.0.attention.query_key_value"]
    # no attention block at all: one line asking for target_modules
    with pytest.raises(ptune.ConfigError, match="no linear layer inside an attention block.*target_modules"):
        resolve_targets(Toy({}, {"fc": (32, 64)}), None, "lora")


def test_p_tuning_v2_on_distilbert_uses_a_prefix_per_layer(tokenizer):
    """DistilBERT's attention modules carry no layer number; ptune numbers them, so each layer reads its own."""
    model, batch = make("p_tuning_v2", "distilbert", "classification", tokenizer)
    model.eval()
    emb = model.adapter.encoder.embedding  # (tasks, P, L*2*H*D), layer-major
    with torch.no_grad():
        base_logits = model(**batch).logits
        for layer in (0, 1):
            saved = emb.detach().clone()
            width = emb.shape[-1] // 2
            emb[..., layer * width:(layer + 1) * width] += 1.0  # this layer's keys and values only
            assert not torch.allclose(model(**batch).logits, base_logits, atol=1e-4), f"layer {layer} prefix unused"
            emb.copy_(saved)
        # padding: a row alone scores as it does in the padded batch
        rows = [ptune.TemplateEncoder(model.template, tokenizer).encode({"text": t}) for t in TEXTS]
        for j, row in enumerate(rows):
            alone = model(**collate([row], pad_id=tokenizer.pad_token_id)).logits[0]
            torch.testing.assert_close(alone, base_logits[j], atol=1e-4, rtol=1e-4)
