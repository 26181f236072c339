"""bench/memory_model.py on tiny configs: meta-device counts equal the real model's, the analytic trainable
counts equal what ptune.apply trains, saved activations grow with length, and the prediction adds up."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import ptune

SPEC = importlib.util.spec_from_file_location("memory_model", Path(__file__).resolve().parents[1] / "bench" / "memory_model.py")
mm = importlib.util.module_from_spec(SPEC)
sys.modules.setdefault("memory_model", mm)  # its dataclass looks its module up
SPEC.loader.exec_module(mm)


def tiny_llama_config(tied=False):
    import transformers as tf

    return tf.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                          tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_meta_counts_equal_the_real_models(tied):
    import transformers as tf

    cfg = tiny_llama_config(tied)
    c = mm.count(cfg)
    real = tf.AutoModelForCausalLM.from_config(cfg)
    assert c["total"] == sum(p.numel() for p in real.parameters())
    assert c["tied"] == tied and c["lm_head"] == (0 if tied else 1000 * 64)
    assert c["embedding"] + c["lm_head"] + c["linear_quantizable"] + c["linear_other"] + c["other"] == c["total"]
    assert mm.weight_bytes(c, "bf16") == 2 * c["total"] and mm.weight_bytes(c, "nf4") < mm.weight_bytes(c, "bf16") / 3


@pytest.mark.parametrize("method,config", [("lora", ptune.LoraConfig(r=4)), ("qlora", ptune.LoraConfig(r=4, target_modules=("all-linear",))),
                                           ("p_tuning_v2", ptune.PTuningV2Config(num_virtual_tokens=5, layers="all"))])  # the model counts every layer
def test_trainable_counts_equal_ptunes(method, config, tokenizer):
    import transformers as tf

    cfg = tiny_llama_config()
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(cfg)
    model = ptune.apply(base, config, head=ptune.HeadConfig("causal_lm"), tokenizer=tokenizer)
    run = mm.Run(method, "bf16", 1, 8, r=4, virtual_tokens=5, lora_targets="all-linear" if method == "qlora" else "qv")
    assert mm.trainable(cfg, mm.count(cfg), run) == model.trainable_parameters()[0]


def test_activations_grow_with_length_and_the_prediction_adds_up():
    cfg = tiny_llama_config()
    assert mm.saved_per_layer(cfg, 64) > 1.5 * mm.saved_per_layer(cfg, 32) > 0
    a, b = mm.activation_fit(cfg)
    assert a > 0 and b > 0
    run = mm.Run("lora", "bf16", 2, 32)
    p = mm.predict(cfg, run, process_mb=100.0, tokenizer_mb=10.0, fit=(a, b))
    assert p["total_mb"] == pytest.approx(sum(v for k, v in p.items() if k.endswith("_mb") and k not in ("total_mb", "device_mb")), abs=0.2)
    ckpt = mm.predict(cfg, mm.Run("lora", "bf16", 2, 32, checkpointing=True), process_mb=100.0, tokenizer_mb=10.0, fit=(a, b))
    assert ckpt["activations_mb"] < p["activations_mb"]
