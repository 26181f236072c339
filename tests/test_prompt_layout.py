"""``prompt_layout="peft"`` (``--prompt-layout peft``): prompt tuning's / P-Tuning's virtual tokens before the
tokenizer's start tokens, where HF PEFT prepends them, so that a run's ``ptune export --format peft`` is exact
in PEFT (``AutoPeftModelForSequenceClassification`` with ``--pooling pooler`` on BERT-family bases).

The template carries the layout (``[P:n]{start} {text}``: ``{start}`` is where the tokenizer's own start
tokens go), so every encoder built from a saved spec (eval, predict, serve, export) lays rows out as training
did. The default layout (``ptune``: ``[CLS] [P:n] text [SEP]``) is unchanged.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from cases import method_config, methods
from conftest import liven, tiny_base

import ptune
from ptune.batching import collate
from ptune.errors import ConfigError, TemplateError
from ptune.export import PROBE_TEXTS, REPORT_NAME, ExportWarning, export
from ptune.templates import Template, TemplateEncoder

peft = pytest.importorskip("peft")

LABELS = ("sport", "food", "news")
POOLER = ptune.HeadConfig("classification", num_labels=3, pooling="pooler")
# the input-prompt methods PEFT has, each with its own prompt in front (P-Tuning's infix case moved to "[P:3] {text}")
PROMPT_CASES = methods(lambda c: c.input_prompts and c.peft_exportable, variants=("p_tuning-mlp",))


def peft_layout(case_id: str, **options):
    config = method_config(case_id)
    if getattr(config, "template", None):
        options.setdefault("template", "[P:3] {text}")
    return method_config(case_id, prompt_layout="peft", **options)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT folder (weights scaled up: every position visibly matters) the client loads by path."""
    path = tmp_path_factory.mktemp("bert-layout")
    liven(tiny_base("bert")).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make(path, tokenizer, config, head=POOLER):
    model = ptune.apply(ptune.load_base(path), config, tokenizer=tokenizer, labels=LABELS, head=head).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def ours_and_client_inputs(model, tokenizer, encoder=None):
    """ptune's batch of the probe texts and what a PEFT user feeds the client: ``tokenizer(texts)``."""
    encoder = encoder or TemplateEncoder(model.template, tokenizer, max_length=64)
    batch = collate([encoder.encode({"text": t}) for t in PROBE_TEXTS], pad_id=encoder.placeholder_id)
    return batch, tokenizer(list(PROBE_TEXTS), padding=True, return_tensors="pt")


# ------------------------------------------------------------------------------------------- templates

def test_the_peft_layout_puts_the_virtual_tokens_before_cls(tokenizer):
    ptune_tpl = ptune.PromptTuningConfig(num_virtual_tokens=3).template_for(Template.parse("{text}"))
    peft_tpl = ptune.PromptTuningConfig(num_virtual_tokens=3, prompt_layout="peft").template_for(Template.parse("{text}"))
    assert ptune_tpl.source == "[P:3] {text}" and peft_tpl.source == "[P:3]{start} {text}"
    assert peft_tpl.prompts_first and not ptune_tpl.prompts_first
    rec = {"text": "the team won the match"}
    a = TemplateEncoder(ptune_tpl, tokenizer, max_length=32).encode(rec)
    b = TemplateEncoder(peft_tpl, tokenizer, max_length=32).encode(rec)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert a.input_ids[0] == cls and a.virtual_index[:4] == [-1, 0, 1, 2]  # the default: unchanged
    assert b.virtual_index[:4] == [0, 1, 2, -1] and b.input_ids[3] == cls and b.input_ids[-1] == sep
    real = tokenizer(rec["text"])["input_ids"]  # [CLS] ... [SEP], as PEFT's user tokenizes
    assert [t for t, v in zip(b.input_ids, b.virtual_index) if v < 0] == real
    assert [t for t, v in zip(a.input_ids, a.virtual_index) if v < 0] == real
    # truncation counts the start tokens once, wherever they stand
    short = TemplateEncoder(peft_tpl, tokenizer, max_length=8).encode({"text": "a b c d e f g h i j"})
    assert len(short.input_ids) == 8 and short.virtual_index[:3] == [0, 1, 2] and short.input_ids[3] == cls


def test_start_slot_rules(tokenizer):
    with pytest.raises(TemplateError, match="more than one {start}"):
        Template.parse("{start} [P:2]{start} {text}")
    # a tokenizer without start tokens: {start} is nowhere, the layouts coincide
    enc = TemplateEncoder(Template.parse("[P:2]{start} {text}"), tokenizer, max_length=16)
    enc._prefix_ids = []
    plain = TemplateEncoder(Template.parse("[P:2] {text}"), tokenizer, max_length=16)
    plain._prefix_ids = []
    rec = {"text": "stir gently"}
    assert enc.encode(rec).input_ids == plain.encode(rec).input_ids


def test_the_peft_layout_refuses_virtual_tokens_elsewhere():
    with pytest.raises(ConfigError, match="--prompt-layout peft.*places virtual tokens elsewhere"):
        method_config("p_tuning", prompt_layout="peft")  # tests/cases.py's infix template "[P:2] {text} [P:1] end"
    with pytest.raises(ConfigError, match="--prompt-layout peft"):
        ptune.PromptTuningConfig(num_virtual_tokens=2, prompt_layout="peft").template_for(Template.parse("{text} [P:2]"))
    with pytest.raises(ConfigError, match="prompt_layout='sideways' is not one of"):
        ptune.PTuningConfig(prompt_layout="sideways")
    # a task template that already opens with its prompt, or one already in PEFT's layout, is kept
    config = ptune.PromptTuningConfig(num_virtual_tokens=2, prompt_layout="peft")
    assert config.template_for(Template.parse("[P:2] {text} topic")).source == "[P:2]{start} {text} topic"
    again = config.template_for(Template.parse("[P:2]{start} {text}"))  # multi-task specs re-resolve their templates
    assert again.source == "[P:2]{start} {text}"
    assert ptune.PTuningConfig(template="[P:4] {text}", prompt_layout="peft").template_for(
        Template.parse("{text}")).source == "[P:4]{start} {text}"


# -------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("case_id", PROMPT_CASES)
def test_a_peft_layout_export_is_exact_in_peft(case_id, bert_dir, tokenizer, tmp_path):
    model = make(bert_dir, tokenizer, peft_layout(case_id))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # an exact export never warns
        result = export(model, tmp_path / "peft", "peft")
    assert result.exact and result.differences == [] and result.max_abs_diff <= 1e-5
    report = json.loads((tmp_path / "peft" / REPORT_NAME).read_text())
    assert report["exact"] is True and report["template"].startswith("[P:")
    client = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "peft"), num_labels=3).eval()
    assert client.peft_config["default"].task_type == "SEQ_CLS"
    batch, plain = ours_and_client_inputs(model, tokenizer)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = client(**plain).logits  # input_ids, token_type_ids, attention_mask: what a PEFT user passes
        assert float((ours - theirs).abs().max()) <= 1e-5
        # the comparison has teeth: the client's model without the prompt is far off (PEFT 0.21's
        # disable_adapter() fails for a SEQ_CLS prompt model, so its base model is called directly)
        assert float((ours - client.base_model(**plain).logits).abs().max()) > 1e-2


@pytest.mark.parametrize("case_id", PROMPT_CASES)
def test_the_default_layout_warns_naming_the_option(case_id, bert_dir, tokenizer, tmp_path):
    config = method_config(case_id)
    model = make(bert_dir, tokenizer, config)
    with pytest.warns(ExportWarning, match=r"--prompt-layout peft.*--pooling pooler") as caught:
        result = export(model, tmp_path / "peft", "peft")
    assert not result.exact and result.max_abs_diff > 1e-3
    assert "prompt position" in str(caught[0].message)


def test_a_peft_layout_with_cls_pooling_names_the_head_only(bert_dir, tokenizer, tmp_path):
    config = ptune.PromptTuningConfig(num_virtual_tokens=3, prompt_layout="peft")
    model = make(bert_dir, tokenizer, config, ptune.HeadConfig("classification", num_labels=3))
    with pytest.warns(ExportWarning, match="--pooling pooler"):
        result = export(model, tmp_path / "peft", "peft")
    assert len(result.differences) == 1 and result.differences[0].startswith("head:")
    assert "--prompt-layout" not in result.message()


# ------------------------------------------------------------------------------------ a run, end to end

def test_a_trained_run_keeps_its_layout_and_exports_exactly(bert_dir, tokenizer, toy_task, tmp_path, capsys):
    """``ptune train --prompt-layout peft --pooling pooler``: the layout is in the saved spec, ``Run`` encodes
    with it, and ``ptune export`` of the run is reproduced by PEFT's own model."""
    from ptune.cli import main
    from ptune.engine import Run

    out = tmp_path / "run"
    args = ["train", "--model", bert_dir, "--method", "p_tuning", "--num-virtual-tokens", "3", "--encoder", "mlp",
            "--prompt-layout", "peft", "--pooling", "pooler", "--max-steps", "2", "--batch-size", "8",
            "--eval-every", "0", "--precision", "fp32", "--output-dir", str(out), "--no-progress",
            *[x for k, v in toy_task.items() for x in (f"--{k.replace('_', '-')}", v)]]
    assert main(args) == 0
    spec = json.loads((out / "best" / "adapter_config.json").read_text())
    assert spec["method_config"]["prompt_layout"] == "peft" and spec["template"] == "[P:3]{start} {text}"
    run = Run(out)
    row = run.encoder.encode({"text": "the team won"})
    assert row.virtual_index[:4] == [0, 1, 2, -1] and row.input_ids[3] == tokenizer.cls_token_id
    capsys.readouterr()
    assert main(["export", str(out), "--format", "peft", "--strict"]) == 0
    assert "warning" not in capsys.readouterr().err
    report = json.loads((out / "export-peft" / REPORT_NAME).read_text())
    assert report["exact"] is True
    client = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(out / "export-peft"),
                                                                         num_labels=2).eval()
    batch, plain = ours_and_client_inputs(run.model, tokenizer, run.encoder)
    with torch.no_grad():
        torch.testing.assert_close(client(**plain).logits, run.model(**batch).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- the real MiniLM

def test_minilm_prompt_tuning_in_the_peft_layout_is_exact_in_peft(tokenizer, tmp_path):
    from ptune.models import resolve_model_path

    config = ptune.PromptTuningConfig(num_virtual_tokens=8, prompt_layout="peft")
    model = make(resolve_model_path("minilm"), tokenizer, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        result = export(model, tmp_path / "peft", "peft")
    assert result.exact
    client = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "peft"), num_labels=3).eval()
    batch, plain = ours_and_client_inputs(model, tokenizer)
    with torch.no_grad():
        ours, theirs = model(**batch).logits, client(**plain).logits
    assert float((ours - theirs).abs().max()) <= 1e-5
