"""QLoRA: the NF4 base (block 64, double quantization) stays within NF4 error; every method trains on it."""

from __future__ import annotations

import pytest
import torch

import ptune
from conftest import liven
from ptune.batching import collate
from ptune.quantize import NF4_CODE, dequantize, describe_quantization, quantize_model

pytest.importorskip("bitsandbytes")


def tiny_llama(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    return tf.AutoModel.from_config(cfg).eval()


def test_nf4_code_book_and_settings():
    import bitsandbytes.functional as F

    assert torch.allclose(F.get_4bit_type("nf4", device="cpu"), torch.tensor(NF4_CODE))
    model = quantize_model(tiny_llama())
    info = describe_quantization(model)
    assert info == {"quantized_layers": 14, "layer_type": "Linear4bit", "quant_type": "nf4", "blocksize": 64,
                    "double_quant": True, "double_quant_blocksize": 256, "compute_dtype": "torch.bfloat16"}


def test_dequantized_weights_within_nf4_error():
    original = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)}
    model = quantize_model(original)
    code = torch.tensor(NF4_CODE)
    half_gap = float((code[1:] - code[:-1]).max()) / 2  # worst rounding, in units of the block's absmax
    checked = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        w = weights[name].view(-1, 64)
        err = (dequantize(module).view(-1, 64) - w).abs().max(1).values
        absmax = w.abs().max(1).values
        # + 1% for the 8-bit double-quantized absmax constants
        assert bool((err <= absmax * (half_gap + 0.01)).all()), name
        checked += 1
    assert checked == 14


@pytest.mark.parametrize("config", [ptune.QLoraConfig(r=4), ptune.PromptTuningConfig(num_virtual_tokens=4),
                                    ptune.PTuningV2Config(num_virtual_tokens=4)], ids=lambda c: c.method)
def test_methods_train_on_a_4bit_base(config, tokenizer):
    base = quantize_model(liven(tiny_llama()))
    m = ptune.apply(base, config, tokenizer=tokenizer, labels=("a", "b"))
    enc = ptune.TemplateEncoder(m.template, tokenizer, max_length=24, causal=True)
    b = collate([enc.encode({"text": t}) for t in ["the team won", "bake the bread", "a late goal", "chop onions"]],
                pad_id=0, targets=[0, 1, 0, 1])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < losses[0] * 0.8, losses


def test_qlora_needs_a_quantized_base(tokenizer):
    with pytest.raises(ptune.ConfigError, match="qlora expects a quantized base: pass --quantize nf4"):
        ptune.apply(tiny_llama(), ptune.QLoraConfig(), tokenizer=tokenizer, labels=("a", "b"))
