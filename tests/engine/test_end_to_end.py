"""What a user does, method by method, each command in a fresh process: `ptune train` (on a plain base and,
where the method allows it, on a 4-bit NF4 base), then `ptune eval`, `ptune predict` (and `ptune generate`
on a causal LM), which rebuild the model from the run's saved spec alone.

The eval metrics must equal the test metrics the training run reported: same adapter, same base loaded the
same way (a 4-bit run reloads its base in 4 bits), same template and head.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers as tf
from cases import METHOD_CASES, methods

# every trained method with its `ptune train` options (tests/cases.py), on a plain base and, where the method
# allows it, a 4-bit one (full fine-tuning cannot train 4-bit weights; QLoRA is LoRA on a 4-bit base)
CASES = [(m, q) for m in methods() for q in (None, "nf4")
         if {"no": q is None, "yes": True, "only": q is not None}[METHOD_CASES[m].base_4bit]]


def ptune(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "ptune.cli", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, f"ptune {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bert64(tmp_path_factory, tokenizer):
    """A tiny random BERT whose linear layers are whole 64-weight NF4 blocks wide."""
    import torch

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    return _save(tf.BertModel(cfg), tokenizer, tmp_path_factory.mktemp("bert64"))


@pytest.fixture(scope="module")
def llama64(tmp_path_factory, tokenizer):
    import torch

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    return _save(tf.LlamaForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("llama64"))


def train_args(model, toy_task, method, quantize, out, *extra):
    args = ["train", "--model", model, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
            "--validation-file", toy_task["validation_file"], "--test-file", toy_task["test_file"],
            "--method", method, *METHOD_CASES[method].cli, "--max-steps", "3", "--batch-size", "8", "--precision", "fp32",
            "--no-progress", "--output-dir", str(out), *extra]
    return args + (["--quantize", quantize] if quantize else [])


def check_eval_and_predict(out, quantize):
    summary = json.loads((out / "summary.json").read_text())
    spec = json.loads((out / "best" / "adapter_config.json").read_text())
    assert spec["format_version"] == 2 and spec["base"]["quantize"] == quantize
    metrics = json.loads(ptune("eval", str(out), "--split", "test"))
    assert metrics == pytest.approx(summary["test"], abs=1e-9)
    lines = ptune("predict", str(out), "the team won the match", "bake the bread", "--json").strip().splitlines()
    results = [json.loads(x) for x in lines]
    assert len(results) == 2 and all(r["label"] in ("sport", "food") for r in results)
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for r in results)


@pytest.mark.parametrize("method, quantize", CASES, ids=[f"{m}-{q or 'plain'}" for m, q in CASES])
def test_train_eval_predict(method, quantize, bert64, toy_task, tmp_path):
    out = tmp_path / "run"
    ptune(*train_args(bert64, toy_task, method, quantize, out))
    check_eval_and_predict(out, quantize)


@pytest.mark.parametrize("method, quantize", [("p_tuning", None), ("qlora", "nf4")])
def test_causal_lm_verbalizer_train_eval_predict_generate(method, quantize, llama64, toy_task, tmp_path):
    out = tmp_path / "run"
    template = "[P:2] {text} [P:1] it is about{mask}" if method == "p_tuning" else "{text} it is about{mask}"
    ptune(*train_args(llama64, toy_task, method, quantize, out, "--head", "verbalizer", "--template", template))
    check_eval_and_predict(out, quantize)
    text = ptune("generate", str(out), "the team won", "bake the", "--max-new-tokens", "3")
    assert len(text.strip().splitlines()) == 2
