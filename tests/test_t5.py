"""Encoder-decoder models (T5 family): every method that fits, text-to-text training, generate(), PEFT
parity, save/load, the CLI, and clear refusals, on tiny random T5s built from a config.

The tokenizer is the packaged MiniLM WordPiece one (no sentencepiece), with ``[SEP]`` (102) as its
end-of-sequence token; the models use pad 0 as decoder start (as T5 does) and 102 as end token.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import transformers as tf
from cases import METHOD_CASES, method_config, methods
from cli_batch import run_batch
from conftest import liven, train_steps

import ptune
from ptune.batching import collate
from ptune.data import Task
from ptune.engine.build import make_encoder
from ptune.errors import ConfigError, UnsupportedModelError

EOS = 102
TASK = Task(name="say", head="seq2seq", text_fields=("input",), max_length=16)
PAIRS = [("say red", "red"), ("say the green one", "green"), ("say blue now", "blue"), ("say dog", "dog")]


def t5_config(layers: int = 2) -> tf.T5Config:
    return tf.T5Config(vocab_size=30522, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=layers,
                       dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)


def t5_base(layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = liven(tf.AutoModelForSeq2SeqLM.from_config(t5_config(layers)), 4.0)
    model.config._ptune_source = f"tiny-t5-{layers}"
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    from ptune.models import load_tokenizer

    t = load_tokenizer("minilm")
    t.eos_token = "[SEP]"
    return t


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tok):
    """A tiny random T5 saved as a model folder with its tokenizer (the CLI reads it like any model)."""
    path = tmp_path_factory.mktemp("tiny-t5")
    t5_base().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


CONFIGS = methods(lambda c: c.on_t5)  # tests/cases.py: every method that fits an encoder-decoder


def build(method: str, tok, base=None, config=None):
    if config is None:
        config = method_config(method, field="input")
        config = dataclasses.replace(config, alpha=4.0) if method == "lora" else config
    model = ptune.apply(base if base is not None else t5_base(), config,
                        head=ptune.HeadConfig("seq2seq"), template="{input}", tokenizer=tok, task=TASK, max_length=16)
    if method == "lora":  # B starts at zero (the base): give the update something to say
        with torch.no_grad():
            for layer in model.adapter.layers().values():
                layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def batch(model, tok, left: bool = False, labelled: bool = True):
    enc = make_encoder(model, tok, 16)
    rows = [TASK.kind.encode(TASK, enc, {"input": a, "target": b}, labelled).encoded for a, b in PAIRS]
    return collate(rows, pad_id=enc.placeholder_id, left=left)


def stepwise(model, b, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: one full forward pass per new token (no KV cache), argmax of the last position."""
    dec = torch.zeros(b["input_ids"].shape[0], 1, dtype=torch.long)  # the decoder start token
    with torch.no_grad():
        for _ in range(steps):
            logits = model(b["input_ids"], b["attention_mask"], b["virtual_index"], decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return dec[:, 1:]


# 1. the methods ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", CONFIGS)
def test_method_trains_on_t5_and_switches_off_to_the_base(method, tok):
    model = build(method, tok)
    frozen = {k: v.clone() for k, v in model.base.state_dict().items()}
    b = batch(model, tok)
    out = model(**b)
    assert out.logits.shape == (len(PAIRS), b["labels"].shape[1], 30522) and torch.isfinite(out.loss)
    out.loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    if not METHOD_CASES[method].keeps_base:
        return  # full fine-tuning keeps no copy of the base to switch back to (refused by design)
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in frozen.items() if "lora_" not in k)
    with model.disable_adapter():
        off = model(**b).logits
    bare = model.base  # the base's own forward on the same ids (virtual tokens are pad ids to it)
    with model.disable_adapter():
        theirs = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).logits
    assert torch.allclose(off, theirs, atol=1e-5)
    assert not torch.allclose(out.logits, off, atol=1e-3)  # and the method, switched on, changes the output


@pytest.mark.parametrize("method", CONFIGS)
def test_a_row_scores_the_same_alone_and_in_a_padded_batch(method, tok):
    """Padding invariance (the shared matrix's check, which builds no encoder-decoder): inputs and targets
    padded to the batch's longest change nothing at the row's real target positions."""
    model = build(method, tok)
    b = batch(model, tok)
    with torch.no_grad():
        together = model(**b).logits
        for i in range(len(PAIRS)):
            real_in = int(b["attention_mask"][i].sum())
            real_out = int((b["labels"][i] != -100).sum())
            alone = {k: v[i:i + 1, :real_in] for k, v in b.items() if k in ("input_ids", "attention_mask", "virtual_index")}
            alone["labels"] = b["labels"][i:i + 1, :real_out]
            # float rounding of other batch shapes only (a padding leak moves logits by O(1))
            scale = float(together.abs().max())
            torch.testing.assert_close(model(**alone).logits[0], together[i, :real_out], atol=1e-5 * scale, rtol=1e-4)


def test_bitfit_is_refused_naming_lora(tok):
    with pytest.raises(ConfigError, match="no bias terms.*lora"):
        build("bitfit", tok, config=ptune.BitFitConfig())


@pytest.mark.parametrize("part", ["encoder", "decoder", "cross"])
def test_each_prefix_part_reaches_its_attention(part, tok):
    """Prefix slots: encoder self-attention (layers 0-1), decoder self-attention (2-3), cross-attention (4-5);
    perturbing one part's slots changes the logits, and a model without that part ignores it."""
    model = build("p_tuning_v2", tok)
    b = batch(model, tok)
    first = {"encoder": 0, "decoder": 2, "cross": 4}[part]
    with torch.no_grad():
        before = model(**b).logits
        table = model.adapter.encoder.embedding.view(1, 3, 6, 2, 4, 8)  # (tables, P, slots, k/v, heads, head_dim)
        table[:, :, first:first + 2] += torch.randn(1, 3, 2, 2, 4, 8, generator=torch.Generator().manual_seed(0))
        after = model(**b).logits
    assert not torch.allclose(before, after, atol=1e-4)
    others = tuple(p for p in ("encoder", "decoder", "cross") if p != part)
    without = build("p_tuning_v2", tok, config=ptune.PTuningV2Config(num_virtual_tokens=3, encoder_decoder_parts=others))
    assert without.adapter.encoder.embedding.shape[-1] == 4 * 2 * 4 * 8  # two parts of two layers
    attention = {"encoder": without.base.encoder.block[0].layer[0].SelfAttention,
                 "decoder": without.base.decoder.block[0].layer[0].SelfAttention,
                 "cross": without.base.decoder.block[0].layer[1].EncDecAttention}[part]
    assert attention.ptune_prefix_slot is None


def test_prefix_parts_option_is_checked():
    assert ptune.PTuningV2Config(encoder_decoder_parts="cross, decoder").encoder_decoder_parts == ("decoder", "cross")
    with pytest.raises(ConfigError, match="encoder_decoder_parts"):
        ptune.PTuningV2Config(encoder_decoder_parts=("decoder", "self"))


# 2. text-to-text training ------------------------------------------------------------------------------------

def test_targets_are_padded_on_their_own_and_the_loss_is_on_them_only(tok):
    model = build("prompt_tuning", tok)
    b = batch(model, tok)
    targets = [tok(t, add_special_tokens=False)["input_ids"] + [EOS] for _, t in PAIRS]
    assert b["labels"].shape == (len(PAIRS), max(map(len, targets)))  # not the inputs' length
    for row, t in zip(b["labels"].tolist(), targets):
        assert row == t + [-100] * (len(row) - len(t))
    with model.disable_adapter():  # T5's own loss on the same targets: mean over the target tokens
        ours = model(**b).loss
        theirs = model.base(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-5)
    changed = {**b, "labels": b["labels"].clone()}
    changed["labels"][0, 0] = 2000  # the loss moves with the target tokens
    assert not torch.allclose(model(**changed).loss, model(**b).loss)


def test_a_short_engine_run_lowers_the_loss_and_reloads_the_same(t5_dir, tmp_path):
    from ptune.engine import Run, TrainConfig
    from ptune.engine.loop import train

    rows = [{"input": f"copy {w}", "target": w} for w in ("red", "green", "blue", "dog", "cat", "sun")]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text("name: copy\nhead: seq2seq\ntext_fields: [input]\nmax_length: 16\n")
    data = str(tmp_path / "data.jsonl")
    train(TrainConfig(model=t5_dir, task=str(tmp_path / "task.yaml"), train_file=data, validation_file=data,
                      method="lora", method_options={"r": 4}, lr=2e-2, max_steps=20, batch_size=6, eval_every=20,
                      precision="fp32", progress=False, output_dir=str(tmp_path / "run")))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    run = Run(tmp_path / "run")
    metrics = run.evaluate("validation")
    # same logits after reload, up to fp32 rounding: Run merges the LoRA pair into the base weights
    assert metrics["loss"] == pytest.approx(summary["best_validation_loss"], rel=1e-6)
    with run.model.disable_adapter():  # LoRA off: the untrained base
        untrained = run.evaluate("validation")
    assert metrics["loss"] < untrained["loss"] - 1.0, (metrics, untrained)
    assert set(metrics) == {"loss", "perplexity", "token_accuracy", "exact_match"}
    answers = run.predict(["copy red", "copy dog"])
    assert [a["generated"] for a in answers] == run.generate(["copy red", "copy dog"], max_new_tokens=16)


# 3. generate() -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,parts", [("prompt_tuning", None), ("p_tuning", None), ("p_tuning_v2", None),
                                          ("prefix_tuning", None), ("lora", None), ("p_tuning_v2", ("cross",)),
                                          ("p_tuning_v2", ("decoder",))])
def test_greedy_generate_equals_decoding_by_hand(method, parts, tok):
    """generate() runs the encoder once and the decoder with a KV cache (self- and cross-attention); decoding
    by hand runs the whole model per token. Equal tokens: prompts, prefixes (cross-attention's too) and
    LoRA reach every cached step as they reach a full pass."""
    config = ptune.PTuningV2Config(num_virtual_tokens=3, encoder_decoder_parts=parts) if parts else None
    model = build(method, tok, config=config)
    b = batch(model, tok, left=True, labelled=False)
    out = model.generate(b["input_ids"], b["attention_mask"], b["virtual_index"], max_new_tokens=6, do_sample=False,
                         min_new_tokens=6)
    assert torch.equal(out, stepwise(model, b, 6))
    with model.disable_adapter():
        base_out = model.generate(b["input_ids"], b["attention_mask"], b["virtual_index"], max_new_tokens=6,
                                  do_sample=False, min_new_tokens=6)
    assert not torch.equal(out, base_out)  # the adapter is active during generation
    beams = model.generate(b["input_ids"], b["attention_mask"], b["virtual_index"], max_new_tokens=4, num_beams=2)
    no_cache = model.generate(b["input_ids"], b["attention_mask"], b["virtual_index"], max_new_tokens=4, num_beams=2,
                              use_cache=False)
    assert torch.equal(beams, no_cache)  # prefixes expand with the beams


# 4. PEFT parity ------------------------------------------------------------------------------------------------

def _peft():
    return pytest.importorskip("peft")


def _peft_logits(peft_model, b, dec):
    with torch.no_grad():
        return peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=dec).logits


def test_prompt_tuning_matches_peft(tok):
    peft = _peft()
    model = build("prompt_tuning", tok, config=ptune.PromptTuningConfig(num_virtual_tokens=4))
    plain = dict(tok([a for a, _ in PAIRS], padding=True, return_tensors="pt"))  # [CLS] input [SEP], padded
    B = plain["input_ids"].shape[0]
    b = {"input_ids": torch.cat([torch.zeros(B, 4, dtype=torch.long), plain["input_ids"]], 1),  # PEFT's layout:
         "attention_mask": torch.cat([torch.ones(B, 4, dtype=torch.long), plain["attention_mask"]], 1),  # prompt
         "virtual_index": torch.cat([torch.arange(4).expand(B, 4), torch.full_like(plain["input_ids"], -1)], 1)}
    theirs = peft.get_peft_model(t5_base(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    with torch.no_grad():
        # PEFT sizes the table for two stacks (2N rows) but prompts the encoder only, with the first N
        theirs.prompt_encoder["default"].embedding.weight[:4].copy_(model.adapter.weight[0])
    dec = torch.tensor([[0, 7592, 2088], [0, 2417, 102]]).repeat(2, 1)
    with torch.no_grad():
        ours = model(**b, decoder_input_ids=dec).logits
    assert torch.allclose(ours, _peft_logits(theirs.eval(), plain, dec), atol=1e-5)
    with model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(ours, model(**b, decoder_input_ids=dec).logits, atol=1e-3)


def test_lora_matches_peft(tok):
    peft = _peft()
    model = build("lora", tok)
    assert sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in model.adapter.names}) == \
        ["EncDecAttention.q", "EncDecAttention.v", "SelfAttention.q", "SelfAttention.v"]
    theirs = peft.get_peft_model(t5_base(), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=4.0,
                                                            target_modules=["q", "v"], lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in model.adapter.layers().items():
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    b = batch(model, tok, labelled=False)
    dec = torch.tensor([[0, 7592, 2088]]).repeat(4, 1)
    with torch.no_grad():
        ours = model(**b, decoder_input_ids=dec).logits
    assert torch.allclose(ours, _peft_logits(theirs.eval(), b, dec), atol=1e-5)


def test_decoder_prefix_matches_peft_prefix_tuning(tok):
    """PEFT 0.21's prefix on T5 reaches the decoder's self-attention only: the encoder gets no cache and PEFT
    empties the cross-attention cache. Its table (P, 2L entries of H*D) is cut into the cache in chunks of
    four entries (self key, self value, cross key, cross value) across a doubled copy, so decoder layer i
    reads entries 4i mod 2L (key) and 4i+1 mod 2L (value): a one-to-one map when L is odd (L=3 here). ptune
    with encoder_decoder_parts=('decoder',) computes the same, relative-position bias of the prefix included."""
    peft = _peft()
    L, P = 3, 3
    model = build("p_tuning_v2", tok, base=t5_base(L),
                  config=ptune.PTuningV2Config(num_virtual_tokens=P, encoder_decoder_parts=("decoder",)))
    theirs = peft.get_peft_model(t5_base(L), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    ours = model.adapter.encoder.embedding.detach().view(P, L, 2, 32)  # (P, decoder layer, k/v, H*D)
    table = torch.zeros(P, 2 * L, 32)
    for i in range(L):
        table[:, (4 * i) % (2 * L)] = ours[:, i, 0]
        table[:, (4 * i + 1) % (2 * L)] = ours[:, i, 1]
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(table.view(P, -1))
    b = batch(model, tok, labelled=False)
    dec = torch.tensor([[0, 7592, 2088, 2417]]).repeat(4, 1)
    with torch.no_grad():
        mine = model(**b, decoder_input_ids=dec).logits
    assert torch.allclose(mine, _peft_logits(theirs.eval(), b, dec), atol=1e-5)


# 5. save / load ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_v2", "prefix_tuning", "lora"])
def test_saved_adapter_reloads_with_the_same_logits_and_generations(method, tok, tmp_path):
    model = build(method, tok)
    b = batch(model, tok)
    train_steps(model, b, steps=3, lr=1e-2)
    ptune.save_adapter(model, tmp_path / "a")
    loaded = ptune.load_adapter(tmp_path / "a", base=t5_base(), tokenizer=tok).eval()
    assert loaded.spec.base.kind == "seq2seq_lm" and loaded.head_config.kind == "seq2seq"
    with torch.no_grad():
        assert torch.equal(model(**b).logits, loaded(**b).logits)
    g = batch(model, tok, left=True, labelled=False)
    args = (g["input_ids"], g["attention_mask"], g["virtual_index"])
    assert torch.equal(model.generate(*args, max_new_tokens=5), loaded.generate(*args, max_new_tokens=5))


# 6. refusals ---------------------------------------------------------------------------------------------------

def test_heads_that_do_not_fit_t5_are_refused_naming_the_seq2seq_head(tok, t5_dir):
    with pytest.raises(UnsupportedModelError, match="seq2seq head"):
        ptune.apply(t5_base(), ptune.LoraConfig(), head=ptune.HeadConfig("classification", num_labels=2),
                    tokenizer=tok)
    with pytest.raises(UnsupportedModelError, match="seq2seq head"):
        ptune.load_base(t5_dir, "causal_lm")
    from conftest import tiny_base

    with pytest.raises(UnsupportedModelError, match="causal_lm head"):
        ptune.apply(tiny_base("gpt2", "causal_lm"), ptune.LoraConfig(), head=ptune.HeadConfig("seq2seq"), tokenizer=tok)
    bart = tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                                         encoder_attention_heads=2, decoder_attention_heads=2,
                                                         encoder_ffn_dim=32, decoder_ffn_dim=32))
    with pytest.raises(UnsupportedModelError, match="T5 family"):
        ptune.apply(bart, ptune.LoraConfig(), head=ptune.HeadConfig("seq2seq"), tokenizer=tok)


def test_unsupported_options_and_data_are_refused(tok):
    with pytest.raises(ConfigError, match="layers"):
        build("lora", tok, config=ptune.LoraConfig(layers="top:1"))
    with pytest.raises(ConfigError, match="target_field"):
        Task(name="t", head="seq2seq", target_field="").validate_record({"text": "x"}, "row 1")
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    model = build("prompt_tuning", tok)
    with pytest.raises(ConfigError, match="end-of-sequence"):
        TASK.kind.encode(TASK, make_encoder(model, no_eos, 16), {"input": "a", "target": "b"}, True)
    with pytest.raises(ConfigError, match="decoder's inputs|labels"):
        model(**batch(model, tok, labelled=False))


# the CLI -------------------------------------------------------------------------------------------------------

def test_cli_train_then_generate_and_predict(t5_dir, tmp_path):
    """Train in one fresh process; generate, predict and eval in another, which rebuilds the run from its files
    (tests/cli_batch.py: each command through the `ptune` script's main, its own stdout and exit code)."""
    rows = [{"input": f"say {w}", "target": w} for w in ("red", "green", "blue", "dog")]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text("name: say\nhead: seq2seq\ntext_fields: [input]\nmax_length: 16\n")
    run = str(tmp_path / "run")
    [train] = run_batch([["train", "--model", t5_dir, "--task", str(tmp_path / "task.yaml"), "--train-file",
                          str(tmp_path / "data.jsonl"), "--validation-file", str(tmp_path / "data.jsonl"), "--method",
                          "prompt_tuning", "--num-virtual-tokens", "4", "--max-steps", "2", "--batch-size", "4",
                          "--precision", "fp32", "--no-progress", "--output-dir", run]])
    train.check()
    spec = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert spec["base"]["kind"] == "seq2seq_lm" and spec["head"]["kind"] == "seq2seq"
    generate, predict, evaluate = (r.check().stdout for r in run_batch([
        ["generate", run, "say red", "say dog", "--max-new-tokens", "16"],
        ["predict", run, "say red", "say dog", "--json"],
        ["eval", run, "--split", "validation"]]))
    generated = generate.splitlines()
    predicted = [json.loads(line)["generated"] for line in predict.splitlines()]
    assert len(generated) == 2 and predicted == generated  # predict answers by greedy generation
    metrics = json.loads(evaluate)
    assert metrics["loss"] == pytest.approx(json.loads((tmp_path / "run" / "summary.json").read_text())[
        "best_validation_loss"], abs=1e-6)
