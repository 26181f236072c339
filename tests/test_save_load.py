"""Saving and loading adapters: round trip, file format, resume, fingerprint checks, PEFT export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from cases import method_config, methods
from conftest import liven, tiny_base, tiny_config
from safetensors.torch import load_file

import ptune
from ptune.batching import collate



# the prompt methods, and P-Tuning with a layer-normed LSTM and with a residual MLP (tests/cases.py); the
# weight-side methods' round trip runs in test_shared_checks.py
METHODS = methods(lambda c: c.prompts, variants=("p_tuning-lstm-layernorm", "p_tuning-mlp"))
TEXTS = ["the match ended in a draw", "stir the sauce gently", "a late goal won the cup"]




def make(method: str, arch: str, tokenizer, seed: int = 0):
    model = ptune.apply(liven(tiny_base(arch, seed=seed)), method_config(method), tokenizer=tokenizer,
                        head=ptune.HeadConfig("classification", num_labels=2, dropout=0.0), labels=["sport", "food"])
    return model


def batch_for(model, tokenizer, arch: str):
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=arch != "bert")
    return collate([enc.encode({"text": t}) for t in TEXTS], pad_id=0, targets=[0, 1, 0])


def train(model, batch, steps: int, opt=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    return opt


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip(method, arch, tokenizer, tmp_path):
    model = make(method, arch, tokenizer)
    batch = batch_for(model, tokenizer, arch)
    train(model, batch, 2)  # trained weights, not the seeded init a fresh apply() would recreate
    with torch.no_grad():
        before = model(**batch).logits
    ptune.save_adapter(model, tmp_path / "a")

    fresh_base = liven(tiny_base(arch))
    with torch.no_grad():
        untrained = make(method, arch, tokenizer)(**batch).logits
    loaded = ptune.load_adapter(tmp_path / "a", base=fresh_base, tokenizer=tokenizer).eval()
    assert loaded.method == model.method and loaded.template.source == model.template.source
    assert loaded.labels == ("sport", "food")
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert not torch.allclose(untrained, before, atol=1e-5)  # the file, not the seed, made them equal


def test_folder_holds_safetensors_and_json_only(tokenizer, tmp_path):
    model = make("p_tuning-lstm-layernorm", "bert", tokenizer)
    path = ptune.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in Path(path).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["method"] == "p_tuning"
    assert cfg["method_config"]["encoder"] == "lstm" and cfg["template"] == "[P:2] {text} [P:1] end"
    assert cfg["base_model"]["model_type"] == "bert" and cfg["base_model"]["weights_sha256"]
    raw = (path / "adapter_model.safetensors").read_bytes()
    assert raw[:2] != b"\x80\x04" and b"pickle" not in raw[:200]
    tensors = load_file(str(path / "adapter_model.safetensors"))
    # only trainable tensors: adapter and head, nothing of the frozen base
    assert set(tensors) == set(model.trainable_state_dict())
    assert not any(k.startswith("base.") for k in tensors)


def test_prompt_encoder_weights_are_saved_not_only_its_output(tokenizer, tmp_path):
    model = make("p_tuning-lstm-layernorm", "bert", tokenizer)
    ptune.save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    lstm = model.adapter.encoder.lstm_head
    for name, p in lstm.named_parameters():
        torch.testing.assert_close(tensors[f"adapter.encoder.lstm_head.{name}"], p.detach(), atol=0, rtol=0)
    assert {"adapter.embedding", "adapter.encoder.mlp_head.0.weight", "adapter.encoder.mlp_head.2.weight",
            "adapter.encoder.norm.weight", "head.classifier.weight"} <= set(tensors)
    assert tensors["adapter.embedding"].shape == (1, 3, 32)  # the encoder's inputs, for resuming


@pytest.mark.parametrize("method", ["p_tuning-lstm-layernorm", "prefix_tuning"])
def test_resume_gives_the_same_next_step(method, tokenizer, tmp_path):
    model = make(method, "bert", tokenizer)
    batch = batch_for(model, tokenizer, "bert")
    opt = train(model, batch, 3)
    ptune.save_adapter(model, tmp_path / "ckpt")
    opt_state = copy.deepcopy(opt.state_dict())

    # the run that was not interrupted
    train(model, batch, 1, opt)
    with torch.no_grad():
        expected = model(**batch).loss

    # the resumed run: adapter from disk, a fresh optimizer with the saved state
    resumed = ptune.load_adapter(tmp_path / "ckpt", base=liven(tiny_base("bert")), tokenizer=tokenizer)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    assert names == [k for k, p in resumed.named_parameters() if p.requires_grad]  # same optimizer order
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(opt_state)
    train(resumed, batch, 1, opt2)
    with torch.no_grad():
        got = resumed(**batch).loss
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_fingerprint_mismatch_other_weights(tokenizer, tmp_path):
    model = make("prompt_tuning", "bert", tokenizer)
    ptune.save_adapter(model, tmp_path / "a")
    other = liven(tiny_base("bert", seed=1))
    with pytest.raises(ptune.AdapterMismatchError) as info:
        ptune.load_adapter(tmp_path / "a", base=other, tokenizer=tokenizer)
    msg = str(info.value)
    from ptune.models import fingerprint

    saved, actual = model.fingerprint["weights_sha256"], fingerprint(other)["weights_sha256"]
    assert saved != actual and saved in msg and actual in msg  # names both models
    assert "weights_sha256" in msg


@pytest.mark.parametrize("change, field", [({"hidden_size": 48}, "hidden_size"),
                                           ({"num_hidden_layers": 3}, "num_layers")])
def test_fingerprint_mismatch_other_shape(change, field, tokenizer, tmp_path):
    import transformers as tf

    model = make("p_tuning_v2", "bert", tokenizer)
    ptune.save_adapter(model, tmp_path / "a")
    cfg = tiny_config("bert")
    for k, v in change.items():
        setattr(cfg, k, v)
    other = tf.BertModel(cfg).eval()
    other.config._ptune_source = "tiny-bert-variant"
    with pytest.raises(ptune.AdapterMismatchError) as info:
        ptune.load_adapter(tmp_path / "a", base=other, tokenizer=tokenizer)
    msg = str(info.value)
    assert field in msg and "tiny-bert" in msg and "tiny-bert-variant" in msg


def test_newer_format_version_is_refused(tokenizer, tmp_path):
    model = make("prompt_tuning", "bert", tokenizer)
    path = ptune.save_adapter(model, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["format_version"] = 99
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ptune.PtuneError, match="upgrade"):
        ptune.load_adapter(path, base=liven(tiny_base("bert")), tokenizer=tokenizer)
    with pytest.raises(ptune.PtuneError, match="99"):
        ptune.read_adapter_config(path)


def test_missing_or_damaged_config(tmp_path):
    with pytest.raises(ptune.PtuneError, match="adapter_config.json"):
        ptune.read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ptune.PtuneError, match="not valid JSON"):
        ptune.read_adapter_config(tmp_path)


# ---------------------------------------------------------------- export to HF PEFT


def _causal_lm(arch: str):
    return liven(tiny_base(arch, "causal_lm"))


@pytest.mark.parametrize("arch, method", [("gpt2", "prompt_tuning"), ("llama", "prompt_tuning"),
                                          ("gpt2", "p_tuning-mlp"), ("llama", "p_tuning_v2"),
                                          ("llama", "prefix_tuning")])
def test_export_peft_loads_in_peft_with_same_logits(arch, method, tokenizer, tmp_path):
    """PeftModel.from_pretrained on the exported folder reproduces ptune's logits.

    Input prompts: the virtual tokens go first, as PEFT puts them. Prefixes: PEFT feeds them as a
    KV cache, so its real tokens sit at positions P..P+T-1 while ptune keeps 0..T-1; the export
    carries the same keys/values, and the logits agree once ptune is given PEFT's positions. (Under
    ptune's own positions they differ, even with rotary embeddings: the prefix keys carry no rotation,
    so query-to-prefix scores depend on the query's absolute position.)
    """
    peft = pytest.importorskip("peft")
    model = ptune.apply(_causal_lm(arch), method_config(method), head=ptune.HeadConfig("causal_lm"),
                        tokenizer=tokenizer).eval()
    with torch.no_grad():  # trained-looking weights
        for p in model.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out = ptune.export_peft(model, tmp_path / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}

    hf_base = _causal_lm(arch)
    peft_model = peft.PeftModel.from_pretrained(hf_base, str(out)).eval()

    t = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = t["input_ids"], t["attention_mask"]
    real = mask.bool()
    n = model.template.num_virtual_tokens
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        if n:
            B = ids.shape[0]
            ours = model(torch.cat([torch.zeros(B, n, dtype=torch.long), ids], 1),
                         attention_mask=torch.cat([torch.ones(B, n, dtype=torch.long), mask], 1),
                         virtual_index=torch.cat([torch.arange(n).expand(B, n), torch.full_like(ids, -1)], 1)).logits
            ours, theirs = ours[:, n:], theirs[:, n:]
        else:
            P, T = model.method_config.num_virtual_tokens, ids.shape[1]
            ours = model(ids, attention_mask=mask, position_ids=torch.arange(P, P + T)[None]).logits
            own_positions = model(ids, attention_mask=mask).logits
            assert not torch.allclose(own_positions[real], theirs[real], atol=1e-3)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    with torch.no_grad():
        base_logits = _causal_lm(arch)(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(base_logits[real], theirs[real], atol=1e-3)  # the adapter is really applied


# ---------------------------------------------------------------- format 1 (before the resolved run spec)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name, arch, kind", [("format1_p_tuning", "bert", "backbone"),
                                              ("format1_lora_verbalizer", "gpt2", "causal_lm")])
def test_format1_adapters_still_load_and_compute_what_they_did(name, arch, kind, tokenizer):
    """Adapters saved by ptune before format 2 (kept as fixtures, with the logits they gave then)."""
    from conftest import liven, tiny_base

    path = FIXTURES / name
    expected = json.loads((path / "expected_logits.json").read_text())
    spec = ptune.read_spec(path)
    assert spec.base.quantize is None and spec.base.kind == kind and spec.task is None
    model = ptune.load_adapter(path, base=liven(tiny_base(arch, kind)), tokenizer=tokenizer).eval()
    assert model.template.source == json.loads((path / "adapter_config.json").read_text())["template"]
    enc = ptune.TemplateEncoder(model.template, tokenizer, max_length=32, causal=arch == "gpt2")
    batch = collate([enc.encode({"text": t}) for t in expected["texts"]], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, torch.tensor(expected["logits"]), atol=1e-5, rtol=1e-4)


def test_spec_round_trips_and_records_how_the_base_was_loaded(tokenizer, tmp_path, tiny_model_dir):
    base = ptune.load_base(tiny_model_dir)
    model = ptune.apply(base, ptune.PTuningV2Config(num_virtual_tokens=2), tokenizer=tokenizer,
                        labels=["a", "b"], max_length=48)
    path = ptune.save_adapter(model, tmp_path / "a")
    spec = ptune.read_spec(path)
    assert spec == model.spec  # everything needed to rebuild the model, unchanged through the file
    assert spec.base.name == tiny_model_dir and spec.base.kind == "backbone" and spec.max_length == 48
    again = ptune.load_adapter(path)  # no base given: loaded from the spec, the way it was loaded
    assert again.spec == spec


def test_a_saved_consent_never_switches_itself_on(tokenizer, tmp_path, tiny_model_dir):
    """An adapter whose base needed remote code reloads only when the caller consents again."""
    model = ptune.apply(ptune.load_base(tiny_model_dir), ptune.PromptTuningConfig(num_virtual_tokens=2),
                        tokenizer=tokenizer, labels=["a", "b"])
    path = ptune.save_adapter(model, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base"]["trust_remote_code"] = True
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ptune.ConfigError, match="pass --trust-remote-code"):
        ptune.load_adapter(path)
    assert ptune.load_adapter(path, trust_remote_code=True).spec.base.trust_remote_code
