"""QLoRA: an NF4 base (block 64, double quantization) within NF4 error, LoRA and prompts training on it."""

from __future__ import annotations

import pytest
import torch
from conftest import liven, train_steps

import ptune
from ptune.batching import collate
from ptune.methods.lora import LoraLinear
from ptune.quantize import NF4_CODE, bnb_config, dequantize, describe_quantization, make_optimizer, quantize_model

bnb = pytest.importorskip("bitsandbytes")

TEXTS = ["the team won", "bake the bread", "a late goal", "chop onions"]


def tiny_llama(seed=0, kind="backbone"):
    """hidden 64 / intermediate 128: every linear layer is a whole number of 64-weight blocks wide."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    model = tf.AutoModel.from_config(cfg) if kind == "backbone" else tf.AutoModelForCausalLM.from_config(cfg)
    model.config._ptune_source = "tiny-llama-64"
    return model.eval()


def batch_for(model, tok):
    enc = ptune.TemplateEncoder(model.template, tok, max_length=24, causal=True)
    return collate([enc.encode({"text": t}) for t in TEXTS], pad_id=0, targets=[0, 1, 0, 1])


def test_nf4_code_book_is_the_papers():
    import bitsandbytes.functional as F

    code = torch.tensor(NF4_CODE)
    assert torch.equal(F.get_4bit_type("nf4", device="cpu"), code)  # bitsandbytes' own table
    # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1), plus an exact 0, scaled to [-1, 1]
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    built = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    torch.testing.assert_close(built / built.max(), code.double(), atol=1e-6, rtol=0)


def test_quantized_model_reports_nf4_block_64_double_quant():
    model = quantize_model(tiny_llama())
    info = describe_quantization(model)
    assert info["code"] == pytest.approx(list(NF4_CODE), abs=1e-7)
    assert {k: v for k, v in info.items() if k != "code"} == {
        "quantized_layers": 14, "unquantized_linear_layers": 0, "layer_type": "Linear4bit", "quant_type": "nf4",
        "blocksize": 64, "double_quant": True, "double_quant_blocksize": 256, "bits_per_weight": 4.127,
        "compute_dtype": "torch.bfloat16"}
    assert describe_quantization(tiny_llama()) == {"quantized_layers": 0, "unquantized_linear_layers": 14}
    cfg = bnb_config("nf4")
    assert (cfg.load_in_4bit, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant,
            cfg.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    assert bnb_config("int8").load_in_8bit
    with pytest.raises(ptune.ConfigError, match="'fp8' is not one of nf4, int8"):
        bnb_config("fp8")


def test_dequantized_weights_within_nf4_error():
    import bitsandbytes.functional as F

    original = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)}
    model = quantize_model(original)
    code = torch.tensor(NF4_CODE)
    half_gap = float((code[1:] - code[:-1]).max()) / 2  # worst rounding, in units of the block's absmax
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        w = weights[name].view(-1, 64)  # (blocks, 64)
        got = dequantize(module).view(-1, 64)
        absmax = w.abs().max(1).values
        # the 8-bit double-quantized block constants add well under 1% of the absmax
        assert bool(((got - w).abs().max(1).values <= absmax * (half_gap + 0.01)).all()), name
        # and every weight is exactly a code value times its block's (dequantized) constant
        state = module.weight.quant_state
        scale = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).view(-1, 1)
        torch.testing.assert_close(scale.view(-1), absmax, rtol=0.01, atol=0)
        dist = ((got / scale).unsqueeze(-1) - code).abs().min(-1).values
        assert float(dist.max()) < 1e-5, name
        checked += 1
    assert checked == 14


def test_int8_quantization():
    original = tiny_llama()
    w = original.layers[0].self_attn.q_proj.weight.detach().clone()
    model = quantize_model(original, "int8")
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    step = w.abs().max(1, keepdim=True).values / 127  # one int8 step per row
    # round to nearest is half a step; bitsandbytes' CPU kernel rounds a few near-ties the other way
    assert bool(((dequantize(layer) - w).abs() <= 0.55 * step).all())
    assert describe_quantization(model)["quantized_layers"] == 14
    with pytest.raises(ptune.ConfigError, match="not one of nf4, int8"):
        quantize_model(tiny_llama(), "int3")


def train(model, batch, steps=20, lr=1e-2):
    return train_steps(model, batch, steps, lr, bf16=True)


@pytest.mark.parametrize("config", [ptune.QLoraConfig(r=4), ptune.PromptTuningConfig(num_virtual_tokens=4),
                                    ptune.PTuningV2Config(num_virtual_tokens=4)], ids=lambda c: c.method)
def test_methods_train_on_a_4bit_base(config, tokenizer):
    base = quantize_model(liven(tiny_llama()))
    frozen = {n: dequantize(m) for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    m = ptune.apply(base, config, tokenizer=tokenizer, labels=("a", "b"))
    if config.method == "qlora":  # all-linear: every Linear4bit is wrapped, none is replaced
        layers = m.adapter.layers()
        assert len(layers) == 14 and all(isinstance(lay.base_layer, bnb.nn.Linear4bit) for lay in layers.values())
    losses = train(m, batch_for(m, tokenizer))
    assert sum(losses[-3:]) / 3 < losses[0] * 0.8, losses
    for n, module in m.base.named_modules():  # the 4-bit weights never move
        if isinstance(module, bnb.nn.Linear4bit):
            # (as values, not bytes: bitsandbytes repacks a layer for its CPU kernel when it runs in eval
            # mode without input gradients, as layer 0 does under deep prompts, and rounds the block
            # constants to bf16 on the way: equal up to that rounding)
            torch.testing.assert_close(dequantize(module), frozen[n.replace(".base_layer", "")], rtol=2 ** -8, atol=0)


def test_qlora_saves_loads_and_refuses_to_merge(tokenizer, tmp_path):
    m = ptune.apply(quantize_model(liven(tiny_llama())), ptune.QLoraConfig(r=4, target_modules=("q_proj", "v_proj")),
                    tokenizer=tokenizer, labels=("a", "b"))
    assert isinstance(m.adapter.layers()["layers.0.self_attn.q_proj"], LoraLinear)
    b = batch_for(m, tokenizer)
    train(m, b, steps=3)
    with torch.no_grad():
        want = m(**b).logits
    again = ptune.load_adapter(ptune.save_adapter(m, tmp_path / "q"), base=quantize_model(liven(tiny_llama())),
                               tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.equal(again.eval()(**b).logits, want)
    with pytest.raises(ptune.ConfigError, match="cannot merge a low-rank update into a quantized layer"):
        m.adapter.merge()


def test_load_base_quantizes_a_model_folder(tokenizer, tmp_path):
    tiny_llama(kind="causal_lm").save_pretrained(tmp_path / "m")
    base = ptune.load_base(str(tmp_path / "m"), "causal_lm", quantize="nf4")
    info = describe_quantization(base)
    assert (info["layer_type"], info["blocksize"], info["double_quant"], info["double_quant_blocksize"]) == (
        "Linear4bit", 64, True, 256)
    m = ptune.apply(base, ptune.QLoraConfig(r=2), tokenizer=tokenizer, head=ptune.HeadConfig("causal_lm"))
    assert "lm_head" not in " ".join(m.adapter.names) and len(m.adapter.names) == 14


def test_4bit_base_computes_in_the_runs_dtype(tokenizer, tmp_path):
    """A run that computes in fp32 (--precision fp32, or auto on a CPU without bf16 arithmetic) loads its 4-bit
    base with fp32 compute: in bf16 there, bitsandbytes' backward matmuls fell to PyTorch's reference CPU gemm
    (minutes per Gemma step). --precision bf16 keeps QLoRA's bf16."""
    from ptune.engine import TrainConfig
    from ptune.engine.build import weight_dtype

    assert weight_dtype(TrainConfig(quantize="nf4", precision="fp32")) is torch.float32
    assert weight_dtype(TrainConfig(quantize="nf4", precision="bf16")) is None  # QLoRA's own: bf16
    tiny_llama(kind="causal_lm").save_pretrained(tmp_path / "m")
    for dtype, want in ((torch.float32, "torch.float32"), (None, "torch.bfloat16")):
        base = ptune.load_base(str(tmp_path / "m"), "causal_lm", quantize="nf4", dtype=dtype)
        assert describe_quantization(base)["compute_dtype"] == want
    m = ptune.apply(base, ptune.QLoraConfig(r=2), tokenizer=tokenizer, head=ptune.HeadConfig("causal_lm"))
    ids = torch.tensor([[101, 2023, 2003, 102]])
    m.train()
    m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()


def test_qlora_needs_a_4bit_base(tokenizer):
    with pytest.raises(ptune.ConfigError, match="qlora expects a 4-bit quantized base .* pass --quantize nf4"):
        ptune.apply(tiny_llama(), ptune.QLoraConfig(), tokenizer=tokenizer, labels=("a", "b"))
    with pytest.raises(ptune.ConfigError, match="full fine-tuning cannot train quantized weights"):
        ptune.apply(quantize_model(tiny_llama()), ptune.FullFinetuneConfig(), tokenizer=tokenizer, labels=("a", "b"))


def test_make_optimizer():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert type(make_optimizer(p, 1e-3, paged=False)) is torch.optim.AdamW
    opt = make_optimizer(p, 1e-3, 0.01)
    if torch.cuda.is_available():
        assert type(opt).__name__ == "PagedAdamW32bit"
    else:  # nothing to page on CPU
        assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.01
