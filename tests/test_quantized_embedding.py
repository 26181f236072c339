"""The quantized token table (ptune.quantized_embedding): lookups, the chunked LM head and its gradient, the
4-bit load path of a decoder with a tied (Gemma 3) or untied (Llama) head, training, generation, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import liven, train_steps
from torch import nn

import ptune
from ptune.batching import collate
from ptune.models import fingerprint
from ptune.quantize import NF4_CODE, quantize_model
from ptune.quantized_embedding import (NF4_CODE as TABLE_CODE, QuantizedEmbedding, QuantizedLMHead, QuantizedTable,
                                       quantize_embeddings)

bnb = pytest.importorskip("bitsandbytes")

PROMPTS = ["the team won", "bake the bread", "a late goal", "chop onions"]
ANSWERS = [" yes", " no thanks", " a", " b c d"]


def tiny_gemma(seed=0, hidden=64):
    """A tied-embedding causal LM with Gemma 3's scaled embedding (sqrt(d)) and final logit soft-capping."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Gemma3TextConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
                              pad_token_id=0, final_logit_softcapping=30.0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.config._ptune_source = "tiny-gemma3-64"
    return model.eval()


def tiny_llama(seed=0):
    """Untied input embedding and LM head."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.config._ptune_source = "tiny-llama-64"
    return model.eval()


def test_code_book_is_ptunes_nf4():
    assert TABLE_CODE == NF4_CODE


@pytest.mark.parametrize("kind,width", [("nf4", 64), ("nf4", 40), ("int8", 40)])
def test_lookup_is_the_dequantized_tables_rows_within_the_formats_error(kind, width):
    torch.manual_seed(0)
    w = torch.randn(1000, width, dtype=torch.bfloat16) * 0.05
    table = QuantizedTable(w, kind, chunk_rows=300)
    full = table.dequantize()
    assert full.shape == (1000, width) and full.dtype == torch.bfloat16
    ids = torch.tensor([[0, 5, 999], [17, 17, 300]])
    assert torch.equal(table.rows(ids), full[ids])  # only the gathered rows are dequantized, to the same values
    err = (full.float() - w.float()).abs()
    if kind == "nf4":  # half the widest gap between NF4 codes (0.304 / 2) of each 64-block's absmax, + bf16 rounding
        blocks = torch.nn.functional.pad(w.float(), (0, -width % 64)).view(1000, -1, 64).abs().amax(-1)
        bound = blocks.repeat_interleave(64, 1)[:, :width] * 0.152
        assert table.bits_per_weight() == pytest.approx(4.5 * (-(-width // 64) * 64) / width)
    else:  # half an int8 step of each row's absmax
        bound = w.float().abs().amax(1, keepdim=True) / 254
    assert bool((err <= bound * 1.01 + full.float().abs() * 2 ** -8).all())
    # the plain torch path (no bitsandbytes kernel) dequantizes to the same numbers
    import ptune.quantized_embedding as qe

    saved = list(qe._BNB)
    qe._BNB[:] = [None]
    try:
        assert torch.equal(table.dequantize(), full)
    finally:
        qe._BNB[:] = saved


def test_chunked_lm_head_equals_the_dequantized_tables_logits_and_gradient():
    torch.manual_seed(0)
    table = QuantizedTable(torch.randn(1000, 64) * 0.05, "nf4", chunk_rows=128)  # 8 chunks, the last one short
    head = QuantizedLMHead(table)
    full = table.dequantize()  # fp32 here: the table was fp32
    h = torch.randn(3, 5, 64, requires_grad=True)
    logits = head(h)
    assert logits.shape == (3, 5, 1000)
    torch.testing.assert_close(logits, h @ full.T, atol=1e-5, rtol=1e-5)
    g = torch.randn(3, 5, 1000)
    (dense,) = torch.autograd.grad(logits, h, g)  # every column carries gradient: chunk by chunk
    torch.testing.assert_close(dense, g @ full, atol=1e-5, rtol=1e-5)
    (sparse,) = torch.autograd.grad(head(h)[..., [3, 999]].sum(), h)  # a verbalizer's label words: their rows only
    torch.testing.assert_close(sparse, (full[3] + full[999]).expand(3, 5, 64), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # in bf16 under autocast, within bf16 rounding
        low = head(h)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), h @ full.T, atol=0.02, rtol=0.02)


def test_tied_table_is_quantized_once_and_the_model_computes_with_it():
    model = tiny_gemma()
    ids = torch.randint(1, 30522, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    info = quantize_embeddings(model, "nf4")
    assert info["tied"] and info["lm_head"]
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedLMHead) and emb.table is head.table
    assert not [n for n, p in model.named_parameters() if p.numel() >= 30522 * 64]  # no full-precision table left
    full = emb.table.dequantize()
    torch.testing.assert_close(emb(ids), full[ids] * emb.embed_scale, atol=0, rtol=0)  # Gemma's sqrt(d) scale
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape == before.shape
    # NF4's error on a random tiny model moves logits by a fraction of their spread, never to nonsense
    assert float((after - before).abs().mean()) < 0.25 * float(before.std())


def test_load_base_quantizes_a_tied_decoders_table_and_keeps_its_fingerprint(tmp_path, monkeypatch):
    tiny_gemma().save_pretrained(tmp_path / "g")
    base = ptune.load_base(str(tmp_path / "g"), "causal_lm", quantize="nf4")
    assert isinstance(base.get_input_embeddings(), QuantizedEmbedding)
    assert base.get_output_embeddings().table is base.get_input_embeddings().table
    assert base._ptune_quantized_embeddings["tied"]
    # the fingerprint hashes the table as loaded: the same as with the table left in full precision
    import ptune.quantized_embedding as qe

    monkeypatch.setattr(qe, "quantize_embeddings", lambda model, kind, **_: {})
    plain = ptune.load_base(str(tmp_path / "g"), "causal_lm", quantize="nf4")
    assert isinstance(plain.get_input_embeddings(), nn.Embedding)
    assert fingerprint(base) == fingerprint(plain)


def test_untied_decoder_keeps_its_tables_on_load_and_gets_two_when_asked(tmp_path):
    """load_base leaves an untied model's table and head as transformers' 4-bit load has them (what a PEFT client
    reproduces); quantize_model(embeddings=True) quantizes both, as two tables."""
    tiny_llama().save_pretrained(tmp_path / "l")
    base = ptune.load_base(str(tmp_path / "l"), "causal_lm", quantize="nf4")
    assert type(base.get_input_embeddings()) is nn.Embedding and type(base.get_output_embeddings()) is nn.Linear
    model = quantize_model(tiny_llama(), embeddings=True)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedLMHead) and emb.table is not head.table


def causal_batch(model, tok):
    enc = ptune.TemplateEncoder(model.template, tok, causal=True)
    return collate([enc.encode({"text": t}, target=y) for t, y in zip(PROMPTS, ANSWERS)], pad_id=tok.pad_token_id)


@pytest.mark.parametrize("make", [tiny_gemma, tiny_llama], ids=["gemma3-tied", "llama-untied"])
def test_qlora_trains_generates_saves_and_loads_on_a_fully_4bit_base(make, tokenizer, tmp_path):
    base = quantize_model(liven(make()), embeddings=True)
    assert isinstance(base.get_output_embeddings(), QuantizedLMHead)
    m = ptune.apply(base, ptune.QLoraConfig(r=4), head=ptune.HeadConfig("causal_lm", dropout=0.0), tokenizer=tokenizer)
    batch = causal_batch(m, tokenizer)
    losses = train_steps(m, batch, steps=8, lr=1e-2, bf16=True)
    assert sum(losses[-3:]) / 3 < losses[0] * 0.9, losses
    ids = tokenizer(["the team"], return_tensors="pt")["input_ids"]
    out = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 4)
    with torch.no_grad():
        want = m(**batch).logits
    again = ptune.load_adapter(ptune.save_adapter(m, tmp_path / "a"),
                               base=quantize_model(liven(make()), embeddings=True), tokenizer=tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**batch).logits, want)


@pytest.mark.parametrize("config", [ptune.PromptTuningConfig(num_virtual_tokens=4, init="vocab"),
                                    ptune.PTuningV2Config(num_virtual_tokens=4)], ids=lambda c: c.method)
def test_prompts_and_a_verbalizer_train_on_the_quantized_table(config, tokenizer):
    """Prompt tuning initialises from the table's rows; a verbalizer reads the LM head at its label words."""
    base = quantize_model(liven(tiny_gemma()), embeddings=True)
    m = ptune.apply(base, config, head=ptune.HeadConfig("verbalizer"), template="{text} it was {mask}",
                    tokenizer=tokenizer, labels=("good", "bad"), label_words=("good", "bad"))
    enc = ptune.TemplateEncoder(m.template, tokenizer, max_length=24, causal=True)
    batch = collate([enc.encode({"text": t}) for t in PROMPTS], pad_id=0, targets=[0, 1, 0, 1])
    losses = train_steps(m, batch, steps=10, lr=5e-2, bf16=True)
    assert sum(losses[-3:]) / 3 < losses[0], losses
