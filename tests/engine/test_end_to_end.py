"""What a user does, method by method: `ptune train` (on a plain base and, where the method allows it, on a
4-bit NF4 base), then `ptune eval`, `ptune predict` (and `ptune generate` on a causal LM), which rebuild the
model from the run's saved spec alone.

The eval metrics must equal the test metrics the training run reported: same adapter, same base loaded the
same way (a 4-bit run reloads its base in 4 bits), same template and head.

The commands run as a user's shell would, through `ptune.cli.main` in fresh processes (tests/cli_batch.py),
two for the whole module: one trains every case's run, a second one (which never held them) evaluates,
predicts and generates from each run's saved files. Each case's test asserts on its own commands' results, so
a broken method fails its own test, with its stderr.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import transformers as tf
from cases import METHOD_CASES, methods
from cli_batch import run_batch
from conftest import FOOD, SPORT

# every trained method with its `ptune train` options (tests/cases.py), on a plain base and, where the method
# allows it, a 4-bit one (full fine-tuning cannot train 4-bit weights; QLoRA is LoRA on a 4-bit base)
CASES = [(m, q) for m in methods() for q in (None, "nf4")
         if {"no": q is None, "yes": True, "only": q is not None}[METHOD_CASES[m].base_4bit]]
CASE_IDS = [f"{m}-{q or 'plain'}" for m, q in CASES]
# the causal LM with a verbalizer head: each with its template, and `ptune generate` too
CAUSAL = [("p_tuning", None), ("qlora", "nf4")]
TEMPLATES = {"p_tuning": "[P:2] {text} [P:1] it is about{mask}", "qlora": "{text} it is about{mask}"}
PREDICT = ["the team won the match", "bake the bread"]
GENERATE = ["the team won", "bake the"]


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def bert64(folder: Path, tokenizer) -> str:
    """A tiny random BERT whose linear layers are whole 64-weight NF4 blocks wide."""
    import torch

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    return _save(tf.BertModel(cfg), tokenizer, folder)


def llama64(folder: Path, tokenizer) -> str:
    import torch

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    return _save(tf.LlamaForCausalLM(cfg), tokenizer, folder)


def toy_task(folder: Path) -> dict[str, str]:
    """conftest's two-class toy task (YAML task, CSV train/validation/test), written once for the module."""
    def write(name, rows):
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
        return str(folder / name)

    rows = [(t, "sport") for t in SPORT] + [(t, "food") for t in FOOD]
    files = {"train": write("train.csv", rows * 3), "validation": write("validation.csv", rows),
             "test": write("test.csv", rows)}
    (folder / "task.yaml").write_text(
        "name: toy\ntask_type: classification\nlabels: [sport, food]\n"
        "label_words: {sport: sports, food: food}\nmax_length: 32\n")
    return {"task": str(folder / "task.yaml"), **{f"{k}_file": v for k, v in files.items()}}


def train_args(model, toy_task, method, quantize, out, *extra):
    args = ["train", "--model", model, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
            "--validation-file", toy_task["validation_file"], "--test-file", toy_task["test_file"],
            "--method", method, *METHOD_CASES[method].cli, "--max-steps", "3", "--batch-size", "8", "--precision", "fp32",
            "--no-progress", "--output-dir", str(out), *extra]
    return args + (["--quantize", quantize] if quantize else [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer) -> dict[tuple[str, str | None, str], dict]:
    """Every case trained in one fresh process, then read back in another: (kind, method, quantize) -> the run
    folder and each command's Result ("train", "eval", "predict", and "generate" for the causal LM)."""
    root = tmp_path_factory.mktemp("e2e")
    task = toy_task(root)
    models = {"bert": bert64(root / "bert64", tokenizer), "llama": llama64(root / "llama64", tokenizer)}
    cases = {("bert", m, q): {"out": root / f"bert-{m}-{q or 'plain'}" / "run"} for m, q in CASES}
    cases.update({("llama", m, q): {"out": root / f"llama-{m}-{q or 'plain'}" / "run"} for m, q in CAUSAL})
    commands = {}
    for (kind, method, quantize), case in cases.items():
        extra = ["--head", "verbalizer", "--template", TEMPLATES[method]] if kind == "llama" else []
        commands[(kind, method, quantize), "train"] = train_args(models[kind], task, method, quantize, case["out"],
                                                                 *extra)
    for key, result in zip(commands, run_batch(list(commands.values()), workdir=root)):
        cases[key[0]][key[1]] = result
    commands = {}
    for (kind, method, quantize), case in cases.items():  # a process that never held the runs: saved files only
        out = str(case["out"])
        commands[(kind, method, quantize), "eval"] = ["eval", out, "--split", "test"]
        commands[(kind, method, quantize), "predict"] = ["predict", out, *PREDICT, "--json"]
        if kind == "llama":
            commands[(kind, method, quantize), "generate"] = ["generate", out, *GENERATE, "--max-new-tokens", "3"]
    for key, result in zip(commands, run_batch(list(commands.values()), workdir=root)):
        cases[key[0]][key[1]] = result
    return cases


def check_eval_and_predict(case, quantize):
    out = case["out"]
    case["train"].check()
    summary = json.loads((out / "summary.json").read_text())
    spec = json.loads((out / "best" / "adapter_config.json").read_text())
    assert spec["format_version"] == 2 and spec["base"]["quantize"] == quantize
    metrics = json.loads(case["eval"].check().stdout)
    assert metrics == pytest.approx(summary["test"], abs=1e-9)
    lines = case["predict"].check().stdout.strip().splitlines()
    results = [json.loads(x) for x in lines]
    assert len(results) == 2 and all(r["label"] in ("sport", "food") for r in results)
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for r in results)


@pytest.mark.parametrize("method, quantize", CASES, ids=CASE_IDS)
def test_train_eval_predict(method, quantize, runs):
    check_eval_and_predict(runs["bert", method, quantize], quantize)


@pytest.mark.parametrize("method, quantize", CAUSAL)
def test_causal_lm_verbalizer_train_eval_predict_generate(method, quantize, runs):
    case = runs["llama", method, quantize]
    check_eval_and_predict(case, quantize)
    text = case["generate"].check().stdout
    assert len(text.strip().splitlines()) == 2
