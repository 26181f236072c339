"""AdapterSet: separately saved adapters on one frozen base, a mixed-adapter batch in one forward pass.

Every adapter is built on a tiny random base, its trainable tensors perturbed at random (so LoRA's B,
AdaLoRA's lambdas and the prompts are all non-trivial; nothing is trained) and saved. The check that
matters: each row of a mixed batch gets, to 1e-5 in fp32, the head scores its own adapter gives
when run alone (``load_adapter`` on a fresh base, a batch of that adapter's rows only).
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import liven, tiny_base

import ptune
from ptune.adapter_set import AdapterSet, adapter_names, predict_mixed
from ptune.batching import collate
from ptune.data import Task
from ptune.engine.build import make_encoder
from ptune.heads import head_kind
from ptune.methods.lora import LowRankLayer, MultiLowRankLayer

ATOL = 1e-5

TEXTS = ["the match ended in a draw", "stir the sauce gently", "a late goal won the cup in the final minute",
         "bake", "the team", "whisk the eggs and sugar until pale and thick"]
WORDS = [["John", "lives", "in", "Paris"], ["unbelievably", "good", "pasta"], ["Kuala", "Lumpur"],
         ["the", "team", "won", "the", "cup", "in", "Madrid", "yesterday"]]

TOPIC = Task("topic", labels=("sport", "food"), max_length=32)
TOPIC3 = Task("topic3", labels=("sport", "food", "news"), max_length=32)
NER = Task("ner", head="tagging", text_fields=("tokens",), labels=("O", "B-PER", "I-PER", "B-LOC"), max_length=32)
SENT = Task("sent", head="verbalizer", labels=("good", "bad"), max_length=32)

# two variants per method: different virtual-token counts / prefix lengths / targets / ranks
METHODS = {
    "prompt_tuning": (lambda: ptune.PromptTuningConfig(num_virtual_tokens=3),
                      lambda: ptune.PromptTuningConfig(num_virtual_tokens=6)),
    "p_tuning": (lambda: ptune.PTuningConfig(template="[P:2] {text} [P:1] end", encoder="lstm", encoder_hidden_size=8),
                 lambda: ptune.PTuningConfig(num_virtual_tokens=4, encoder="mlp", encoder_hidden_size=16)),
    "p_tuning_v2": (lambda: ptune.PTuningV2Config(num_virtual_tokens=3),
                    lambda: ptune.PTuningV2Config(num_virtual_tokens=5)),
    "prefix_tuning": (lambda: ptune.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
                      lambda: ptune.PrefixTuningConfig(num_virtual_tokens=2, encoder_hidden_size=8)),
    "lora": (lambda: ptune.LoraConfig(r=2), lambda: ptune.LoraConfig(r=4, target_modules="all-linear")),
    "adalora": (lambda: ptune.AdaLoraConfig(init_r=3, target_r=2, total_step=10),
                lambda: ptune.AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=("query", "dense"))),
    "bitfit": (lambda: ptune.BitFitConfig(), lambda: ptune.BitFitConfig()),
}
PAIRS = list(itertools.combinations(METHODS, 2)) + [(m, m) for m in METHODS]


def perturb(model, seed: int):
    """Random non-trivial values for every trainable tensor (LoRA's B and AdaLoRA's lambdas start at zero);
    returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def make_adapter(path, tokenizer, base, config, task, seed, template=None):
    head = ptune.HeadConfig(task.head, num_labels=len(task.labels), dropout=0.0)
    if task.head == "tagging":
        template = template or "{tokens}"
        if getattr(config, "template", None):
            config = ptune.PTuningConfig(**{**config.__dict__, "template": config.template.replace("{text}", "{tokens}")})
    elif task.head == "verbalizer":
        template = template or "{text} {mask}"
        if getattr(config, "template", None):
            config = ptune.PTuningConfig(**{**config.__dict__, "template": config.template + " {mask}"})
    model = ptune.apply(base, config, head=head, tokenizer=tokenizer, template=template, labels=task.labels,
                        task=task, max_length=task.max_length)
    perturb(model, seed)
    ptune.save_adapter(model, path)
    return path


def rows_for(name: str, task: Task, n: int, offset: int = 0) -> list[dict]:
    if task.head == "tagging":
        return [{"adapter": name, "tokens": WORDS[(offset + i) % len(WORDS)]} for i in range(n)]
    return [{"adapter": name, "text": TEXTS[(offset + i) % len(TEXTS)]} for i in range(n)]


def alone(path, rows: list[dict], fresh_base, tokenizer) -> list[torch.Tensor]:
    """Each row's head scores from the adapter loaded on its own base, in a batch of its rows only."""
    model = ptune.load_adapter(path, base=fresh_base(), tokenizer=tokenizer).eval()
    task, kind = model.spec.task, head_kind(model.head_config.kind)
    encoder = make_encoder(model, tokenizer)
    recs = [{k: v for k, v in r.items() if k != "adapter"} for r in rows]
    examples = [kind.encode(task, encoder, rec, False) for rec in recs]
    batch = collate([e.encoded for e in examples], pad_id=encoder.placeholder_id)
    with torch.no_grad():
        logits = model(**batch).logits
    return kind.rows(logits, None, [len(e.encoded.input_ids) for e in examples])


def check_mixed(s: AdapterSet, expected: dict[str, list[torch.Tensor]], rows_by: dict[str, list[dict]],
                batch_size: int = 64) -> None:
    order = [(n, i) for i in range(max(len(r) for r in rows_by.values())) for n in rows_by if i < len(rows_by[n])]
    mixed = [rows_by[n][i] for n, i in order]  # interleaved: every batch mixes adapters
    got = s.logits(mixed, batch_size=batch_size)
    for (n, i), row in zip(order, got):
        torch.testing.assert_close(row, expected[n][i], atol=ATOL, rtol=0, msg=lambda m: f"{n} row {i}: {m}")


def bert():
    return liven(tiny_base("bert"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Both variants of every method on the tiny BERT, classification heads with 2 or 3 labels."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for k, (method, variants) in enumerate(METHODS.items()):
        for v, make in enumerate(variants):
            task = TOPIC if v == 0 else TOPIC3
            out[(method, v)] = make_adapter(root / f"{method}-{v}", tokenizer, bert(), make(), task, seed=10 * k + v)
    return out


@pytest.mark.parametrize("m1, m2", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_mixed_pair_equals_each_alone(m1, m2, saved, tokenizer):
    a, b = saved[(m1, 0)], saved[(m2, 1)]
    rows = {"a": rows_for("a", TOPIC, 5), "b": rows_for("b", TOPIC3, 4, offset=2)}
    expected = {"a": alone(a, rows["a"], bert, tokenizer), "b": alone(b, rows["b"], bert, tokenizer)}
    base = bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    s = AdapterSet(base, tokenizer)
    s.add("a", a)
    s.add("b", b)
    check_mixed(s, expected, rows)
    check_mixed(s, expected, rows, batch_size=3)  # several smaller mixed batches
    # the base is wrapped once at most, and its own tensors are untouched
    assert not any(isinstance(m, LowRankLayer) for m in base.modules())
    plain = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items()}
    assert set(plain) == set(before) and all(torch.equal(plain[k], before[k]) for k in before)


def test_every_method_in_one_batch(saved, tokenizer):
    """All fourteen adapters (seven methods x two variants) in one batch of 28 rows."""
    s = AdapterSet(bert(), tokenizer)
    rows, expected = {}, {}
    for (method, v), path in saved.items():
        name = f"{method}-{v}"
        s.add(name, path)
        rows[name] = rows_for(name, TOPIC if v == 0 else TOPIC3, 2, offset=v)
        expected[name] = alone(path, rows[name], bert, tokenizer)
    wrappers = [m for m in s.base.modules() if isinstance(m, MultiLowRankLayer)]
    assert wrappers and all(len(w.branches) >= 1 for w in wrappers)
    check_mixed(s, expected, rows)


def mixed_head_adapters(root, tokenizer, fresh_base, arch):
    """Classification, tagging and verbalizer adapters of every method on one LM base."""
    plan = [("p_tuning", 0, TOPIC), ("prefix_tuning", 0, NER), ("lora", 0, SENT), ("prompt_tuning", 1, NER),
            ("p_tuning_v2", 1, SENT), ("adalora", 0, TOPIC3), ("p_tuning_v2", 0, TOPIC), ("bitfit", 0, SENT),
            ("lora", 1, NER), ("p_tuning", 1, SENT), ("lora", 1, SENT)]
    if arch == "bert":
        plan = [p for p in plan if not (p[0] == "adalora")] + [("adalora", 1, TOPIC3)]
    out = {}
    for k, (method, v, task) in enumerate(plan):
        name = f"{method}-{v}-{task.name}"
        out[name] = (make_adapter(root / name, tokenizer, fresh_base(), METHODS[method][v](), task, seed=100 + k), task)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_mixed_head_kinds(arch, tmp_path, tokenizer):
    kind = "causal_lm" if arch == "gpt2" else "masked_lm"
    fresh = lambda: liven(tiny_base(arch, kind))  # noqa: E731
    adapters = mixed_head_adapters(tmp_path, tokenizer, fresh, arch)
    s = AdapterSet(fresh(), tokenizer)
    rows, expected = {}, {}
    for k, (name, (path, task)) in enumerate(adapters.items()):
        s.add(name, path)
        rows[name] = rows_for(name, task, 3, offset=k)
        expected[name] = alone(path, rows[name], fresh, tokenizer)
    assert {s.info(n)["head"] for n in s.names} == {"classification", "tagging", "verbalizer"}
    check_mixed(s, expected, rows)
    check_mixed(s, expected, rows, batch_size=4)


def test_predict_equals_run_predict(tmp_path, tokenizer, tiny_model_dir):
    """Through the front door: results (labels, probabilities, tags) equal each adapter's Run.predict."""
    from ptune.engine import Run

    base = lambda: ptune.load_base(tiny_model_dir)  # noqa: E731
    plan = {"topic": (ptune.PTuningConfig(num_virtual_tokens=3, encoder="mlp"), TOPIC),
            "ner": (ptune.PTuningV2Config(num_virtual_tokens=4), NER),
            "news": (ptune.LoraConfig(r=2), TOPIC3)}
    paths = {n: make_adapter(tmp_path / n, tokenizer, base(), cfg, task, seed=i)
             for i, (n, (cfg, task)) in enumerate(plan.items())}
    texts = {"topic": TEXTS[:4], "ner": [" ".join(w) for w in WORDS], "news": TEXTS[2:]}
    s = AdapterSet.load(paths)  # the base loaded once, from the first spec
    rows = [{"adapter": n, "text": t} for i in range(4) for n in texts if i < len(texts[n]) for t in [texts[n][i]]]
    got = s.predict(rows, batch_size=5)
    want = {n: iter(Run(p).predict(texts[n])) for n, p in paths.items()}
    for row, res in zip(rows, got):
        ref = next(want[row["adapter"]])
        if "tags" in ref:
            assert res == ref
        else:
            assert res["label"] == ref["label"]
            assert res["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-6)
    assert s.info("ner")["method"] == "p_tuning_v2" and s.info("ner")["task"] == "ner"
    assert s.info("ner")["trainable_params"] > 0 and s.info("news")["labels"] == list(TOPIC3.labels)


def test_fingerprint_mismatch_refused(saved, tokenizer, tmp_path):
    other = make_adapter(tmp_path / "other", tokenizer, liven(tiny_base("bert", seed=1)), ptune.LoraConfig(r=2),
                         TOPIC, seed=0)
    s = AdapterSet(bert(), tokenizer)
    s.add("ok", saved[("lora", 0)])
    with pytest.raises(ptune.AdapterMismatchError) as e:
        s.add("other", other)
    msg = str(e.value)
    assert "\n" not in msg and "'other'" in msg and "trained on tiny-bert" in msg and "but the base is tiny-bert" in msg
    assert s.names == ["ok"]  # the refused adapter left nothing behind
    assert sum(isinstance(m, MultiLowRankLayer) for m in s.base.modules()) == 4  # query, value of 2 layers

def test_unknown_adapter_and_bad_rows(saved, tokenizer):
    s = AdapterSet(bert(), tokenizer)
    s.add("a", saved[("prompt_tuning", 0)])
    with pytest.raises(ptune.DataError, match=r"row 2: unknown adapter 'nope'; this set holds \['a'\]"):
        s.predict([{"adapter": "a", "text": "fine"}, {"adapter": "nope", "text": "x"}])
    with pytest.raises(ptune.DataError, match=r"row 1 \(adapter 'a'\): text field 'text' is empty"):
        s.predict([{"adapter": "a", "text": "  "}])
    with pytest.raises(ptune.DataError, match="row 1: expected an object"):
        s.predict(["just text"])
    # the server path: bad rows are reported in place, the good ones scored
    out = s.predict_batch([{"adapter": "a", "text": "fine"}, {"adapter": "nope", "text": "x"}, "bad",
                           {"adapter": "a", "text": "the match"}])
    assert "unknown adapter" in out[1]["error"] and "row 3" in out[2]["error"]
    assert out[0] == s.predict([{"adapter": "a", "text": "fine"}])[0] and "label" in out[3]


def test_remove(saved, tokenizer):
    base = bert()
    s = AdapterSet(base, tokenizer)
    for name, key in {"lora": ("lora", 0), "lora-all": ("lora", 1), "bitfit": ("bitfit", 0),
                      "v2": ("p_tuning_v2", 0)}.items():
        s.add(name, saved[key])
    rows = {"v2": rows_for("v2", TOPIC, 3), "lora": rows_for("lora", TOPIC, 2), "bitfit": rows_for("bitfit", TOPIC, 3)}
    before = s.logits(rows["v2"])
    s.remove("lora-all")  # its wrappers go; BitFit's per-row biases on the same layers stay
    check_mixed(s, {"bitfit": alone(saved[("bitfit", 0)], rows["bitfit"], bert, tokenizer), "v2": before},
                {"bitfit": rows["bitfit"], "v2": rows["v2"]})
    s.remove("bitfit")
    rows.pop("bitfit")
    assert s.names == ["lora", "v2"]
    assert {n for n, m in base.named_modules() if isinstance(m, MultiLowRankLayer)} == {
        f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")}
    assert not base.encoder.layer[0].output.dense._forward_hooks  # bitfit's bias hooks are gone
    expected = {"v2": before, "lora": alone(saved[("lora", 0)], rows["lora"], bert, tokenizer)}
    check_mixed(s, expected, rows)
    s.remove("lora")
    assert not any(isinstance(m, MultiLowRankLayer) for m in base.modules())
    with pytest.raises(ptune.DataError, match="unknown adapter 'lora'"):
        s.predict(rows["lora"])
    with pytest.raises(ptune.ConfigError, match="holds no adapter 'lora'"):
        s.remove("lora")
    s.add("lora", saved[("lora", 0)])  # back again
    check_mixed(s, expected, rows)


def test_refused_methods_and_bases(tmp_path, tokenizer, saved):
    full = make_adapter(tmp_path / "full", tokenizer, bert(), ptune.FullFinetuneConfig(), TOPIC, seed=0)
    base = bert()
    s = AdapterSet(base, tokenizer)
    with pytest.raises(ptune.ConfigError, match="full changes the base's own weights"):
        s.add("full", full)
    assert not any(p.requires_grad for p in base.parameters()) and s.names == []
    verb = make_adapter(tmp_path / "verb", tokenizer, liven(tiny_base("gpt2", "causal_lm")), ptune.LoraConfig(r=2),
                        SENT, seed=0)
    s2 = AdapterSet(liven(tiny_base("gpt2")), tokenizer)  # a bare body: no LM head for the verbalizer
    with pytest.raises(ptune.ConfigError, match="needs the base loaded as a causal lm"):
        s2.add("verb", verb)
    gen = make_adapter(tmp_path / "gen", tokenizer, liven(tiny_base("gpt2", "causal_lm")),
                       ptune.PTuningV2Config(num_virtual_tokens=2), Task("gen", head="causal_lm"), seed=0)
    s3 = AdapterSet(liven(tiny_base("gpt2", "causal_lm")), tokenizer)
    s3.add("gen", gen)  # held to generate (aset.generation), not to label
    with pytest.raises(ptune.DataError, match="row 1 \\(adapter 'gen'\\): a causal_lm adapter answers by generating"):
        s3.predict([{"adapter": "gen", "text": "hello"}])
    with pytest.raises(ptune.ConfigError, match="already holds an adapter named 'a'"):
        s.add("a", saved[("lora", 0)])
        s.add("a", saved[("lora", 1)])


def test_predict_mixed_file(tmp_path, tokenizer, tiny_model_dir):
    base = lambda: ptune.load_base(tiny_model_dir)  # noqa: E731
    a = make_adapter(tmp_path / "runs" / "a", tokenizer, base(), ptune.PromptTuningConfig(num_virtual_tokens=2),
                     TOPIC, seed=1)
    b = make_adapter(tmp_path / "runs" / "b", tokenizer, base(), ptune.PrefixTuningConfig(num_virtual_tokens=3),
                     NER, seed=2)
    lines = [{"adapter": "a", "text": "the match"}, {"adapter": "b", "text": "John lives in Paris"},
             {"adapter": str(b), "tokens": ["Kuala", "Lumpur"]}, {"adapter": "a", "text": "bake the bread"}]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert adapter_names([str(a), f"ner={b}"]) == {"a": str(a), "ner": str(b)}
    out = predict_mixed([str(a), str(b)], tmp_path / "mixed.jsonl", batch_size=2)
    assert [r["adapter"] for r in out] == ["a", "b", "b", "a"]
    assert out[1]["tokens"] == ["John", "lives", "in", "Paris"] and len(out[2]["tags"]) == 2
    assert set(out[0]["probabilities"]) == {"sport", "food"}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"adapter": "zzz", "text": "x"}) + "\n" + json.dumps(lines[0]))
    with pytest.raises(ptune.DataError, match="row 1: unknown adapter 'zzz'"):
        predict_mixed([str(a)], tmp_path / "bad.jsonl")
    out = predict_mixed([str(a)], tmp_path / "bad.jsonl", on_error="report")
    assert "error" in out[0] and out[1]["label"] in ("sport", "food")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_prefix_lengths_masked_without_padding(arch, tmp_path, tokenizer):
    """Rows of one length (no padding mask at all): prefixes of 3 and 2 positions and none, side by side."""
    fresh = lambda: liven(tiny_base(arch))  # noqa: E731
    plan = {"v2": METHODS["p_tuning_v2"][0](), "prefix": METHODS["prefix_tuning"][1](), "lora": METHODS["lora"][0](),
            "pt": METHODS["prompt_tuning"][0]()}
    paths = {n: make_adapter(tmp_path / n, tokenizer, fresh(), cfg, TOPIC, seed=i) for i, (n, cfg) in enumerate(plan.items())}
    s = AdapterSet(fresh(), tokenizer)
    rows, expected = {}, {}
    for n, p in paths.items():
        s.add(n, p)
        rows[n] = [{"adapter": n, "text": "the team won the cup"}] * 2
        expected[n] = alone(p, rows[n], fresh, tokenizer)
    for n in ("v2", "prefix", "lora"):  # every row is one length, unless it carries prompt tokens
        check_mixed(s, {k: expected[k] for k in ("v2", "prefix", n)}, {k: rows[k] for k in ("v2", "prefix", n)})
    check_mixed(s, expected, rows)


def test_qlora_on_one_4bit_base(tmp_path, tokenizer):
    """QLoRA adapters (LoRA on the same NF4 base) side by side with a deep prompt; bf16 compute, so the
    shared checks' 4-bit tolerance."""
    pytest.importorskip("bitsandbytes")
    from test_shared_checks import make_base

    fresh = lambda: make_base("llama64", "backbone", "nf4")  # noqa: E731
    plan = {"q2": ptune.QLoraConfig(r=2), "q4": ptune.QLoraConfig(r=4, target_modules=("q_proj", "v_proj")),
            "v2": ptune.PTuningV2Config(num_virtual_tokens=3)}
    paths = {n: make_adapter(tmp_path / n, tokenizer, fresh(), cfg, TOPIC, seed=i) for i, (n, cfg) in enumerate(plan.items())}
    s = AdapterSet(fresh(), tokenizer)
    rows, expected = {}, {}
    for n, p in paths.items():
        s.add(n, p)
        rows[n] = rows_for(n, TOPIC, 3, offset=len(rows))
        expected[n] = alone(p, rows[n], fresh, tokenizer)
    mixed = [r for i in range(3) for n in rows for r in [rows[n][i]]]
    for r, got in zip(mixed, s.logits(mixed)):
        torch.testing.assert_close(got, expected[r["adapter"]][rows[r["adapter"]].index(r)], atol=5e-2, rtol=5e-2)
    # the adapters of one set agree on how the base is quantized, as their specs record it
    plain = make_adapter(tmp_path / "plain", tokenizer, make_base("llama64", "backbone", None), ptune.LoraConfig(r=2),
                         TOPIC, seed=0)
    base4 = fresh()
    ptune.models.LOAD_OPTIONS[base4] = {"kind": "backbone", "quantize": "nf4"}  # as load_base(quantize="nf4")
    q = make_adapter(tmp_path / "q", tokenizer, base4, ptune.QLoraConfig(r=2), TOPIC, seed=0)
    set4 = AdapterSet(fresh(), tokenizer)
    ptune.models.LOAD_OPTIONS[set4.base] = {"kind": "backbone", "quantize": "nf4"}
    set4.add("q", q)
    with pytest.raises(ptune.ConfigError, match="trained on an unquantized base but this set's base is nf4"):
        set4.add("plain", plain)
    with pytest.raises(ptune.ConfigError, match="trained on a nf4 base but this set's base is unquantized"):
        AdapterSet(make_base("llama64", "backbone", None), tokenizer).add("q", q)


def test_failed_add_leaves_the_set_as_it_was(saved, tokenizer, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved[("lora", 0)], broken)  # r=2's config with r=4's all-linear tensors
    shutil.copy(saved[("lora", 1)] / "adapter_model.safetensors", broken / "adapter_model.safetensors")
    base = bert()
    s = AdapterSet(base, tokenizer)
    s.add("v2", saved[("p_tuning_v2", 0)])
    s.add("bitfit", saved[("bitfit", 0)])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ptune.AdapterMismatchError, match="does not fit this lora adapter"):
        s.add("broken", broken)
    assert s.names == ["v2", "bitfit"] and not any(isinstance(m, (LowRankLayer, MultiLowRankLayer))
                                                   for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    rows = {"v2": rows_for("v2", TOPIC, 2), "bitfit": rows_for("bitfit", TOPIC, 2)}
    check_mixed(s, {n: alone(saved[k], rows[n], bert, tokenizer) for n, k in
                    {"v2": ("p_tuning_v2", 0), "bitfit": ("bitfit", 0)}.items()}, rows)


def test_precision(saved, tokenizer):
    rows = {"lora": rows_for("lora", TOPIC, 3), "pt": rows_for("pt", TOPIC, 3)}
    keys = {"lora": ("lora", 0), "pt": ("prompt_tuning", 0)}
    expected = {n: alone(saved[k], rows[n], bert, tokenizer) for n, k in keys.items()}
    s = AdapterSet(bert(), tokenizer)  # bare adapter folders: no bf16 run among them, so fp32
    for n, k in keys.items():
        s.add(n, saved[k])
    assert not s.bf16
    s16 = AdapterSet(bert(), tokenizer, precision="bf16")
    for n, k in keys.items():
        s16.add(n, saved[k])
    assert s16.bf16
    mixed = rows["lora"] + rows["pt"]
    for r, got in zip(mixed, s16.logits(mixed)):
        want = expected[r["adapter"]][rows[r["adapter"]].index(r)]
        assert got.dtype == torch.float32 and not torch.equal(got, want)
        torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    with pytest.raises(ptune.ConfigError, match="precision='fp16'"):
        AdapterSet(precision="fp16")


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_prefix_attention_row_mask(mask_kind):
    """prefix_attention with a per-row prefix mask: each row equals that row computed with only its own
    prefix positions (none: plain attention), for no mask, a boolean mask and an additive float mask."""
    from torch import nn

    from ptune.methods.prefix_tuning import prefix_attention

    torch.manual_seed(0)
    module = nn.Module()
    module.layer_idx, module.is_causal, module.training = 0, False, False
    B, H, T, D, P = 3, 2, 5, 4, 3
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    prefix = torch.randn(B, 1, 2, H, P, D)
    keep = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, 3:] = False  # row 1 has two padded keys
    if mask_kind == "none":
        pad[:] = True
        mask = None
    elif mask_kind == "bool":
        mask = pad[:, None, None, :].expand(B, 1, T, T)
    else:
        mask = torch.zeros(B, 1, T, T).masked_fill(~pad[:, None, None, :], torch.finfo(torch.float32).min)
    out, _ = prefix_attention(module, q, k, v, mask, ptune_prefix=prefix, ptune_prefix_mask=keep, scaling=D ** -0.5)
    for b in range(B):
        n = int(keep[b].sum())
        kk = torch.cat([prefix[b:b + 1, 0, 0, :, :n], k[b:b + 1]], dim=2)
        vv = torch.cat([prefix[b:b + 1, 0, 1, :, :n], v[b:b + 1]], dim=2)
        visible = torch.cat([torch.ones(n, dtype=torch.bool), pad[b]])
        want = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1], kk, vv, attn_mask=visible[None, None, None, :])
        torch.testing.assert_close(out[b], want[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_length_chunks_keep_short_rows_apart_from_long_ones():
    from ptune.scoring import PADDING_WASTE, length_chunks

    sizes = [20, 22, 25, 30, 240, 250, 256, 256]  # ascending, as the scorer sorts them: tweets, then articles
    assert length_chunks(list(range(8)), sizes, batch_size=32) == [list(range(8))]  # no bound: batch_size only
    chunks = length_chunks(list(range(8)), sizes, batch_size=32, waste=PADDING_WASTE)  # the set's bound
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for chunk in chunks:  # padded positions within 1.3x the real ones
        assert max(sizes[i] for i in chunk) * len(chunk) <= 1.3 * sum(sizes[i] for i in chunk)
    assert length_chunks(list(range(8)), [50] * 8, batch_size=3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert length_chunks([], [], batch_size=4) == []


MC = Task("mc", head="multiple_choice", text_fields=("question",), max_length=32)
QA = Task("qa", head="span_qa", text_fields=("question", "context"), label_field="answers", allow_no_answer=True,
          max_length=24)  # 24 tokens: the context below is cut into several windows
CONTEXT = ("Paris is the capital of France. Berlin is the capital of Germany, and Zurich is a city in Switzerland. "
           "Sao Paulo is the largest city of Brazil.")
MULTI_ROW = {  # several model rows per record (choices, a long context's windows), beside one-row rows
    "mc": (MC, "{question} {choice}", [{"question": q, "choices": c} for q, c in [
        ("the capital of france is", ["paris", "rome"]), ("water boils at", ["one hundred", "zero", "ten", "five"]),
        ("a cat says", ["meow", "woof", "moo"])]]),
    "qa": (QA, "{question} [SEP] {context}", [{"question": q, "context": CONTEXT} for q in
                                               ("capital of germany?", "where is zurich?", "largest city of brazil?")]),
}


@pytest.mark.parametrize("method", ["p_tuning_v2", "lora", "prompt_tuning"])
def test_heads_with_several_rows_per_record_are_served_beside_others(method, tmp_path, tokenizer):
    """A set holds multiple-choice and span-QA adapters (refused before the set scored through the one
    path) beside a classifier: each record's scores equal the adapter's own model scoring it alone."""
    from ptune.scoring import score_rows

    paths = {"topic": make_adapter(tmp_path / "topic", tokenizer, bert(), METHODS[method][0](), TOPIC, seed=1)}
    for k, (name, (task, template, _)) in enumerate(MULTI_ROW.items()):
        paths[name] = make_adapter(tmp_path / name, tokenizer, bert(), METHODS[method][1](), task, seed=2 + k,
                                   template=template)
    rows = {"topic": rows_for("topic", TOPIC, 3)}
    rows.update({name: [{"adapter": name, **r} for r in recs] for name, (_, _, recs) in MULTI_ROW.items()})
    expected = {}
    for name, path in paths.items():
        model = ptune.load_adapter(path, base=bert(), tokenizer=tokenizer).eval()
        kind, encoder = head_kind(model.head_config.kind), make_encoder(model, tokenizer)
        examples = [kind.encode(model.spec.task, encoder, {k: v for k, v in r.items() if k != "adapter"}, False)
                    for r in rows[name]]
        got = score_rows(model, examples, batch_size=1, pad_id=encoder.placeholder_id)  # one record at a time
        expected[name] = [got[i] for i in range(len(examples))]
    s = AdapterSet(bert(), tokenizer)
    for name, path in paths.items():
        s.add(name, path)
    assert any(len(e.encoded.choices) > 1 for e in s.validate(rows["qa"])[0:1] for e in [e.example]), \
        "the QA context should span several windows"
    order = [(n, i) for i in range(3) for n in rows]  # interleaved: every batch mixes adapters
    got = s.logits([rows[n][i] for n, i in order], batch_size=64)
    for (n, i), row in zip(order, got):
        want = expected[n][i]
        if n == "mc":  # a record's scores padded to the batch's most choices with -inf (as Run batches them)
            choices = len(rows[n][i]["choices"])
            assert torch.isinf(row[choices:]).all() and torch.isinf(want[choices:]).all()
            row, want = row[:choices], want[:choices]
        torch.testing.assert_close(row, want, atol=ATOL, rtol=0, msg=lambda m: f"{n} row {i}: {m}")
    results = s.predict([r for name in paths for r in rows[name]])
    for r, rec in zip(results[3:6], rows["mc"]):  # the choice picked, as Run.predict gives it
        assert r["label"] == rec["choices"][r["index"]] and set(r["probabilities"]) == set(rec["choices"])
    assert all(isinstance(r["answer"], str) for r in results[6:]), results[6:]
