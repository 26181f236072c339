"""`ptune export`: the files its real clients load reproduce ptune's outputs, or the export says why not and by how much.

PEFT exports are loaded with ``peft.PeftModel.from_pretrained`` on the base the export names; merged exports
with ``AutoModelFor...from_pretrained`` in a fresh process that cannot import ptune. Each is fed the probe
texts' real tokens, as a client would tokenize them, and compared with ptune's logits for the same tokens.
Where the client cannot compute what ptune computes (PEFT prepends prompts before [CLS], feeds prefixes as a
KV cache; a head transformers has no counterpart for), the export warns, and the difference it reports is the
one the real client shows.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import liven, tiny_base

import ptune
from ptune.batching import collate
from ptune.errors import ConfigError
from ptune.export import PROBE_TEXTS, REPORT_NAME, ExportWarning, export

peft = pytest.importorskip("peft")

LABELS = ("sport", "food", "news")
N = 4  # virtual tokens


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """Tiny random models saved as folders (the clients load the base by its path), weights scaled up so
    that every input position visibly matters."""
    import transformers as tf

    made = {}
    for arch, kind in (("bert", "backbone"), ("bert", "masked_lm"), ("llama", "causal_lm"), ("llama", "backbone"),
                       ("gpt2", "causal_lm"), ("roberta", "backbone")):
        path = tmp_path_factory.mktemp(f"{arch}-{kind}")
        liven(tiny_base(arch, kind)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        made[arch, kind] = str(path)
    torch.manual_seed(0)  # whole NF4 blocks wide, for QLoRA
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    path = tmp_path_factory.mktemp("llama64")
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    made["llama64", "causal_lm"] = str(path)
    return made


def make(model_dirs, tokenizer, arch, kind, config, head, quantize=None):
    """A ptune model on a saved base, its adapter and head moved away from their initialisation."""
    labels = () if head.kind == "causal_lm" else LABELS
    model = ptune.apply(ptune.load_base(model_dirs[arch, kind], kind, quantize=quantize), config,
                        tokenizer=tokenizer, labels=labels, head=head).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.3)
    if hasattr(model.adapter, "after_load"):  # AdaLoRA: its rank pattern from the tensors
        model.adapter.after_load()
    return model


def probe(model, tokenizer):
    """ptune's batch of the probe texts, and what a client is fed: each row's real tokens, right-padded,
    with the positions they have in ptune's batch."""
    enc = ptune.TemplateEncoder(model.template, tokenizer, max_length=64, causal=model.spec.causal)
    batch = collate([enc.encode({"text": t}) for t in PROBE_TEXTS], pad_id=0)
    positions = [((v < 0) & (m > 0)).nonzero().flatten()
                 for v, m in zip(batch["virtual_index"], batch["attention_mask"])]
    T = max(len(p) for p in positions)
    ids = torch.zeros(len(positions), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(positions):
        ids[i, :len(p)] = batch["input_ids"][i, p]
        mask[i, :len(p)] = 1
    return batch, ids, mask, positions


def gap(model, ours, theirs, batch, positions, front=0):
    """Largest |difference| between ptune's logits and the client's for the same tokens. ``front``: the
    virtual positions PEFT puts before the real ones in its output."""
    theirs = theirs[:, front:] if theirs.dim() == 3 else theirs
    if ours.dim() == 2 and theirs.dim() == 3:  # a verbalizer: the client's vocabulary logits at the label slot
        slot = [int((p == lp).nonzero()) for p, lp in zip(positions, batch["label_position"])]
        theirs = theirs[torch.arange(len(slot)), slot][:, list(model.head_config.label_word_ids)]
    if ours.dim() == 2:
        return float((ours - theirs).abs().max())
    return max(float((ours[i, p] - theirs[i, :len(p)]).abs().max()) for i, p in enumerate(positions))


def peft_client(out):
    import transformers as tf

    report = json.loads((out / REPORT_NAME).read_text())
    cfg = peft.PeftConfig.from_pretrained(str(out))
    extra = {"num_labels": report["head"]["num_labels"]} if cfg.modules_to_save else {}
    base = getattr(tf, report["auto_class"]).from_pretrained(cfg.base_model_name_or_path, **extra)
    return peft.PeftModel.from_pretrained(base, str(out)).eval(), cfg, report


def quiet_export(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # an exact export never warns
        return export(*args, **kwargs)


# ------------------------------------------------------------------------------- PEFT: exact cases

EXACT = [  # (arch, kind, method config, head, PEFT task type, the client's head module)
    ("bert", "backbone", ptune.LoraConfig(r=4), ptune.HeadConfig("classification", num_labels=3, pooling="pooler"),
     "SEQ_CLS", "classifier"),
    ("bert", "backbone", ptune.AdaLoraConfig(init_r=4, target_r=2, total_step=6, tfinal=1),
     ptune.HeadConfig("tagging", num_labels=3), "TOKEN_CLS", "classifier"),
    # RobertaForSequenceClassification's head is dense + tanh + out_proj on <s>: ptune's pooler and classifier
    ("roberta", "backbone", ptune.LoraConfig(r=4), ptune.HeadConfig("classification", num_labels=3, pooling="pooler"),
     "SEQ_CLS", "classifier"),
    ("llama", "backbone", ptune.LoraConfig(r=4), ptune.HeadConfig("tagging", num_labels=3), "TOKEN_CLS", "score"),
    ("llama", "causal_lm", ptune.LoraConfig(r=4, target_modules="all-linear"), ptune.HeadConfig("causal_lm"),
     "CAUSAL_LM", None),
    ("bert", "masked_lm", ptune.LoraConfig(r=4), ptune.HeadConfig("verbalizer"), "FEATURE_EXTRACTION", None),
]


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # PEFT warns on its own AdaLoRA files too
@pytest.mark.parametrize("arch, kind, config, head, task_type, module", EXACT,
                         ids=[f"{a}-{c.method}-{h.kind}" for a, _, c, h, _, _ in EXACT])
def test_peft_export_is_reproduced_by_peft(arch, kind, config, head, task_type, module, model_dirs, tokenizer,
                                           tmp_path):
    model = make(model_dirs, tokenizer, arch, kind, config, head)
    result = quiet_export(model, tmp_path / "peft", "peft")
    assert result.exact and result.differences == []
    client, cfg, report = peft_client(tmp_path / "peft")
    assert cfg.task_type == task_type and report["exact"] is True
    assert cfg.base_model_name_or_path == model_dirs[arch, kind]  # a folder PEFT can load, not a ptune alias
    assert cfg.modules_to_save == ([module] if module else None)
    assert not (tmp_path / "peft" / "ptune_head.safetensors").exists()  # the head is the client's own
    batch, ids, mask, positions = probe(model, tokenizer)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = client(input_ids=ids, attention_mask=mask).logits
        assert gap(model, ours, theirs, batch, positions) <= 1e-5
        with client.disable_adapter():  # the comparison has teeth: without the adapter the client is far off
            assert gap(model, ours, client(input_ids=ids, attention_mask=mask).logits, batch, positions) > 1e-2


def test_prompt_tuning_is_exact_when_the_template_already_puts_the_prompt_first(model_dirs, tokenizer, tmp_path):
    """A tokenizer that adds no special tokens (GPT-2's) puts ``[P:n] {text}`` exactly where PEFT does."""
    from tokenizers import processors

    plain = copy.deepcopy(tokenizer)
    plain.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    for config in (ptune.PromptTuningConfig(num_virtual_tokens=N),
                   ptune.PTuningConfig(num_virtual_tokens=N, encoder="mlp", encoder_hidden_size=16)):
        model = make(model_dirs, plain, "gpt2", "causal_lm", config, ptune.HeadConfig("causal_lm"))
        out = tmp_path / config.method
        result = quiet_export(model, out, "peft", tokenizer=plain)
        assert result.exact and result.max_abs_diff <= 1e-5
        client, cfg, _ = peft_client(out)
        batch, ids, mask, positions = probe(model, plain)
        with torch.no_grad():
            ours = model(**batch).logits
            theirs = client(input_ids=ids, attention_mask=mask).logits
        assert gap(model, ours, theirs, batch, positions, front=N) <= 1e-5


# ------------------------------------------------------------------ PEFT: warned, with the real difference

INEXACT = [  # (arch, kind, method config, head, what the warning names)
    ("bert", "backbone", ptune.PromptTuningConfig(num_virtual_tokens=N),
     ptune.HeadConfig("classification", num_labels=3, pooling="pooler"),
     r"positions 1\.\.4 \(after \[CLS\]\).*train with --prompt-layout peft.*--pooling pooler"),
    ("bert", "backbone", ptune.PTuningV2Config(num_virtual_tokens=N, layers="all"),  # PEFT: every layer
     ptune.HeadConfig("classification", num_labels=3, pooling="pooler"), "prefix vectors as a KV cache"),
    ("bert", "backbone", ptune.PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=16),
     ptune.HeadConfig("tagging", num_labels=3), "PEFT prepends all 4 before the first token"),
    ("bert", "masked_lm", ptune.PromptTuningConfig(num_virtual_tokens=N), ptune.HeadConfig("verbalizer"),
     "prompt position"),
    ("llama", "causal_lm", ptune.PromptTuningConfig(num_virtual_tokens=N), ptune.HeadConfig("causal_lm"),
     "prompt position"),
    ("llama", "causal_lm", ptune.PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16),
     ptune.HeadConfig("causal_lm"), "real tokens take positions 4..4\\+T-1.*position_ids=torch.arange\\(T\\)-4"),
]


def test_every_exportable_method_has_an_export_case():
    """tests/cases.py's PEFT-exportable methods (plain bases; QLoRA's 4-bit cases are below) are each exported
    here, exactly or with the warning naming PEFT's layout: a new exportable method fails until it has a case."""
    from cases import methods

    exported = {c.method for _, _, c, *_ in EXACT + INEXACT}
    assert set(methods(lambda c: c.peft_exportable and c.base_4bit != "only")) <= exported


@pytest.mark.parametrize("arch, kind, config, head, named", INEXACT,
                         ids=[f"{a}-{c.method}-{h.kind}" for a, _, c, h, _ in INEXACT])
def test_peft_layout_differences_warn_with_the_difference_peft_shows(arch, kind, config, head, named, model_dirs,
                                                                     tokenizer, tmp_path):
    model = make(model_dirs, tokenizer, arch, kind, config, head)
    with pytest.warns(ExportWarning, match=named):
        result = export(model, tmp_path / "peft", "peft")
    assert not result.exact and result.max_abs_diff > 1e-3
    client, cfg, report = peft_client(tmp_path / "peft")
    assert report["exact"] is False and report["max_abs_diff"] == result.max_abs_diff
    batch, ids, mask, positions = probe(model, tokenizer)
    front = 0 if cfg.peft_type == "PREFIX_TUNING" else N
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = client(input_ids=ids, attention_mask=mask).logits
    # the difference the report states is the one PEFT's own model shows on the probe texts
    assert gap(model, ours, theirs, batch, positions, front) == pytest.approx(result.max_abs_diff, rel=1e-4, abs=1e-5)
    if cfg.peft_type == "PREFIX_TUNING":  # the remedy the warning names: ptune's positions, PEFT adding N back
        shifted = (torch.arange(ids.shape[1]) - N).expand_as(ids)
        with torch.no_grad():
            fixed = client(input_ids=ids, attention_mask=mask, position_ids=shifted).logits
        assert gap(model, ours, fixed, batch, positions) <= 1e-5


@pytest.mark.parametrize("arch, head, named", [
    ("bert", ptune.HeadConfig("classification", num_labels=3), "pooling='cls'"),
    ("llama", ptune.HeadConfig("classification", num_labels=3), "score layer has no bias"),
])
def test_a_head_transformers_lacks_is_exported_beside_the_body(arch, head, named, model_dirs, tokenizer, tmp_path):
    """ptune's [CLS] head (BertForSequenceClassification adds its pooler's dense + tanh) and a decoder's
    classifier (transformers' score layer has no bias): PEFT gets the body, the head goes beside it."""
    from safetensors.torch import load_file

    model = make(model_dirs, tokenizer, arch, "backbone", ptune.LoraConfig(r=4), head)
    with pytest.warns(ExportWarning, match=named):
        result = export(model, tmp_path / "peft", "peft")
    client, cfg, _ = peft_client(tmp_path / "peft")
    assert cfg.task_type == "FEATURE_EXTRACTION" and not result.exact
    head_file = load_file(str(tmp_path / "peft" / "ptune_head.safetensors"))
    assert set(head_file) == {"classifier.weight", "classifier.bias"}
    batch, ids, mask, positions = probe(model, tokenizer)
    with torch.no_grad():
        ours = model(**batch).logits
        hidden = client(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = model.head(hidden, {"attention_mask": mask})  # the head file, applied as the report says
    assert torch.equal(head_file["classifier.weight"], model.head.classifier.weight.detach())
    assert gap(model, ours, theirs, batch, positions) <= 1e-5


def test_export_peft_keeps_its_name_and_refuses_methods_peft_lacks(model_dirs, tokenizer, tmp_path):
    model = make(model_dirs, tokenizer, "bert", "backbone", ptune.BitFitConfig(),
                 ptune.HeadConfig("classification", num_labels=3))
    with pytest.raises(ConfigError, match="no HF PEFT equivalent.*--format merged"):
        ptune.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    lora = make(model_dirs, tokenizer, "bert", "backbone", ptune.LoraConfig(r=4),
                ptune.HeadConfig("classification", num_labels=3, pooling="pooler"))
    assert ptune.export_peft(lora, tmp_path / "peft") == tmp_path / "peft"


# -------------------------------------------------------------------------------------------- merged

CLIENT = r"""
import json, sys
sys.path = [p for p in sys.path if not p.endswith("/src")]  # the editable install's ptune
class NoPtune:
    def find_spec(self, name, path=None, target=None):
        if name == "ptune" or name.startswith("ptune."):
            raise ImportError("ptune is not importable here")
sys.meta_path.insert(0, NoPtune())
import torch, transformers
for case in json.loads(sys.argv[1]):
    report = json.load(open(case["folder"] + "/ptune_export.json"))
    model = getattr(transformers, report["auto_class"]).from_pretrained(case["folder"]).eval()
    inputs = torch.load(case["inputs"])
    with torch.no_grad():
        out = model(**inputs)
    torch.save(out.logits if hasattr(out, "logits") else out.last_hidden_state, case["result"])
try:
    import ptune
except ImportError:
    pass
else:
    raise SystemExit("ptune was importable")
assert not any(m == "ptune" or m.startswith("ptune.") for m in sys.modules), "ptune was imported"
print("clean")
"""

MERGED = [  # (arch, kind, method config, head, the transformers class of the folder)
    ("bert", "backbone", ptune.LoraConfig(r=4), ptune.HeadConfig("classification", num_labels=3, pooling="pooler"),
     "AutoModelForSequenceClassification"),
    ("bert", "backbone", ptune.BitFitConfig(), ptune.HeadConfig("tagging", num_labels=3),
     "AutoModelForTokenClassification"),
    ("bert", "masked_lm", ptune.AdaLoraConfig(init_r=4, target_r=2, total_step=6, tfinal=1),
     ptune.HeadConfig("verbalizer"), "AutoModelForMaskedLM"),
    ("llama", "causal_lm", ptune.LoraConfig(r=4), ptune.HeadConfig("causal_lm"), "AutoModelForCausalLM"),
    ("gpt2", "causal_lm", ptune.FullFinetuneConfig(), ptune.HeadConfig("verbalizer"), "AutoModelForCausalLM"),
    ("bert", "backbone", ptune.LoraConfig(r=4), ptune.HeadConfig("classification", num_labels=3), "AutoModel"),
]


def test_merged_exports_load_in_transformers_without_ptune(model_dirs, tokenizer, tmp_path):
    """One fresh process that cannot import ptune loads every folder with its AutoModelFor... class."""
    cases, expected = [], []
    for i, (arch, kind, config, head, auto) in enumerate(MERGED):
        model = make(model_dirs, tokenizer, arch, kind, config, head)
        folder = tmp_path / f"merged{i}"
        if auto == "AutoModel":  # ptune's [CLS] head: the body, and the head beside it
            with pytest.warns(ExportWarning, match="pooling='cls'"):
                result = export(model, folder, "merged")
        else:
            result = quiet_export(model, folder, "merged")
            assert result.exact and result.max_abs_diff <= 1e-5
        assert result.auto_class == auto
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer_config.json", REPORT_NAME} <= files
        config_json = json.loads((folder / "config.json").read_text())
        assert "_ptune_source" not in config_json
        if "Classification" in auto:
            assert config_json["id2label"] == {str(i): x for i, x in enumerate(LABELS)}
        batch, ids, mask, positions = probe(model, tokenizer)
        torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / f"in{i}.pt")
        with torch.no_grad():
            expected.append((model, model(**batch).logits, batch, positions))
        cases.append({"folder": str(folder), "inputs": str(tmp_path / f"in{i}.pt"),
                      "result": str(tmp_path / f"out{i}.pt")})
    proc = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(cases)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("clean"), proc.stderr[-3000:]
    for (model, ours, batch, positions), case in zip(expected, cases):
        theirs = torch.load(case["result"])
        if theirs.shape[-1] == model.base.config.hidden_size and ours.shape[-1] != theirs.shape[-1]:
            with torch.no_grad():  # the body: ptune's head on its hidden states
                theirs = model.head(theirs, {"attention_mask": batch["attention_mask"]})
        scale = max(1.0, float(ours.abs().max()))
        assert gap(model, ours, theirs, batch, positions) <= 1e-5 * scale, case["folder"]


def test_merged_qlora_is_dequantized_to_its_compute_dtype(model_dirs, tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers as tf

    model = make(model_dirs, tokenizer, "llama64", "causal_lm", ptune.QLoraConfig(r=4),
                 ptune.HeadConfig("causal_lm"), quantize="nf4")
    with pytest.warns(ExportWarning, match="dequantized to bfloat16"):
        result = export(model, tmp_path / "merged", "merged")
    config_json = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config_json["dtype"] == "bfloat16" and "quantization_config" not in config_json
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    batch, ids, mask, positions = probe(model, tokenizer)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = merged(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            unadapted = model(**batch).logits
    assert gap(model, ours, theirs, batch, positions) == pytest.approx(result.max_abs_diff, rel=1e-3)
    # bf16 arithmetic (ptune's 4-bit layers compute in bf16 too), not a lost update: the LoRA update moves the
    # logits several times further than the merged model is from ptune's
    assert result.max_abs_diff < 0.25 * float((ours - unadapted).abs().max())


def test_peft_qlora_is_reproduced_on_the_same_4bit_base(model_dirs, tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers as tf

    from ptune.quantize import bnb_config, hold_quantized_weights

    model = make(model_dirs, tokenizer, "llama64", "causal_lm", ptune.QLoraConfig(r=4),
                 ptune.HeadConfig("causal_lm"), quantize="nf4")
    result = quiet_export(model, tmp_path / "peft", "peft")
    assert result.exact and any("quantize='nf4'" in n for n in result.notes)
    base = tf.AutoModelForCausalLM.from_pretrained(model_dirs["llama64", "causal_lm"],
                                                   quantization_config=bnb_config("nf4"))
    # the same 4-bit weights on both sides: on an AVX512-BF16 CPU bitsandbytes would repack the client's
    # weights on its first no-grad pass with the block constants rounded to bf16 (a 5e-3 logit gap here),
    # which ptune's bases never do (ptune.quantize.hold_quantized_weights)
    hold_quantized_weights(base)
    client = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    batch, ids, mask, positions = probe(model, tokenizer)
    with torch.no_grad():
        ours = model(**batch).logits
        assert gap(model, ours, client(input_ids=ids, attention_mask=mask).logits, batch, positions) <= 1e-5


def test_merged_export_refuses_prompt_methods(model_dirs, tokenizer, tmp_path):
    model = make(model_dirs, tokenizer, "bert", "backbone", ptune.PTuningV2Config(num_virtual_tokens=N),
                 ptune.HeadConfig("classification", num_labels=3))
    with pytest.raises(ConfigError, match="cannot be merged into weights.*use --format peft"):
        export(model, tmp_path / "merged", "merged")
    assert not (tmp_path / "merged").exists()


def test_peft_export_refuses_p_tuning_v2_in_the_upper_layers_only(model_dirs, tokenizer, tmp_path):
    # P-Tuning v2's default (--layers auto: the upper half) has no PEFT form: PEFT puts a prefix in every layer
    model = make(model_dirs, tokenizer, "bert", "backbone", ptune.PTuningV2Config(num_virtual_tokens=N),
                 ptune.HeadConfig("classification", num_labels=3))
    assert model.adapter.config.layers == "auto" and len(model.adapter.chosen) < model.adapter.num_layers
    with pytest.raises(ConfigError, match="no PEFT form.*train with --layers all"):
        export(model, tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists()


def test_merged_export_leaves_the_model_as_it_was(model_dirs, tokenizer, tmp_path):
    model = make(model_dirs, tokenizer, "bert", "backbone", ptune.LoraConfig(r=4),
                 ptune.HeadConfig("classification", num_labels=3, pooling="pooler"))
    model.train()
    batch, *_ = probe(model, tokenizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quiet_export(model, tmp_path / "merged", "merged")
    assert model.training and model.adapter.layers()  # still training, LoRA layers still in place
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ------------------------------------------------------------------------------------ the real MiniLM

def test_minilm_lora_export_is_reproduced_by_peft(tokenizer, tmp_path):
    base = ptune.load_base("minilm")
    model = ptune.apply(base, ptune.LoraConfig(r=4), tokenizer=tokenizer, labels=LABELS,
                        head=ptune.HeadConfig("classification", num_labels=3, pooling="pooler")).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    result = quiet_export(model, tmp_path / "peft", "peft")
    from ptune.models import resolve_model_path

    client, cfg, _ = peft_client(tmp_path / "peft")
    assert cfg.base_model_name_or_path == resolve_model_path("minilm") and cfg.task_type == "SEQ_CLS"
    assert result.exact
    batch, ids, mask, positions = probe(model, tokenizer)
    with torch.no_grad():
        assert gap(model, model(**batch).logits, client(input_ids=ids, attention_mask=mask).logits,
                   batch, positions) <= 1e-5


# ------------------------------------------------------------------------------------- CLI and errors

@pytest.fixture()
def lora_run(tiny_model_dir, toy_task, tmp_path):
    from ptune.engine import TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(model=tiny_model_dir, method="lora", method_options={"r": 4}, pooling="pooler", max_steps=2,
                      batch_size=8, eval_every=0, progress=False, precision="fp32", output_dir=str(out), **toy_task))
    return out


def test_cli_exports_a_run_directory(lora_run, capsys):
    from ptune.cli import main
    from ptune.engine import Run

    assert main(["export", str(lora_run), "--format", "peft"]) == 0
    text = capsys.readouterr().out
    out = lora_run / "export-peft"
    assert f"exported peft to {out}" in text and "reproduces ptune's outputs" in text
    client, cfg, _ = peft_client(out)
    assert cfg.task_type == "SEQ_CLS"
    run = Run(lora_run)
    rows = [run.encoder.encode({"text": t}) for t in PROBE_TEXTS]
    batch = collate(rows, pad_id=run.encoder.placeholder_id)
    with torch.no_grad():
        ours = run.model(**batch).logits
        theirs = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert main(["export", str(lora_run / "best"), "--format", "merged", "--output", str(lora_run / "m")]) == 0
    assert (lora_run / "m" / "model.safetensors").is_file()


def test_cli_errors_are_one_line(lora_run, tmp_path, capsys):
    from ptune.cli import main

    def error(*args):
        assert main(list(args)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ptune: error: "), err
        return err[0]

    assert "unknown export format 'onnx'; choose one of peft, merged" in error("export", str(lora_run), "--format", "onnx")
    assert "is not a finished ptune run" in error("export", str(tmp_path / "nothing"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    msg = error("export", str(lora_run), "--output", str(tmp_path / "taken"))
    assert "already exists and is not empty; pass --overwrite" in msg
    msg = error("export", str(lora_run), "--output", str(tmp_path / "taken"), "--overwrite")
    assert "is not a ptune export" in msg and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert main(["export", str(lora_run)]) == 0  # RUN/export-peft
    first = (lora_run / "export-peft" / "adapter_model.safetensors").stat().st_mtime_ns
    assert "already exists" in error("export", str(lora_run))
    assert main(["export", str(lora_run), "--overwrite"]) == 0  # a previous export is replaced
    assert (lora_run / "export-peft" / "adapter_model.safetensors").stat().st_mtime_ns != first
    capsys.readouterr()


def test_cli_refuses_to_merge_a_prompt_method_and_strict_refuses_inexact(tiny_model_dir, toy_task, tmp_path, capsys):
    from ptune.cli import main
    from ptune.engine import TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(model=tiny_model_dir, method="prompt_tuning", method_options={"num_virtual_tokens": 2},
                      max_steps=1, batch_size=8, eval_every=0, progress=False, precision="fp32", output_dir=str(out),
                      **toy_task))
    assert main(["export", str(out), "--format", "merged"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt_tuning cannot be merged into weights" in err[0] and "--format peft" in err[0]
    assert main(["export", str(out), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not exact" in err[0] and "largest logit difference" in err[0]
    assert not (out / "export-peft").exists()
    assert main(["export", str(out)]) == 0  # without --strict: written, with the warning on stderr
    captured = capsys.readouterr()
    assert "ptune: warning:" in captured.err and "prompt position" in captured.err
    report = json.loads((out / "export-peft" / REPORT_NAME).read_text())
    assert report["exact"] is False and report["differences"]
