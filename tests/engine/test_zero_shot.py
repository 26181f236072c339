"""Zero-shot manual prompts: method ``manual`` trains nothing and scores label words with the frozen LM."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ptune
from ptune.cli import main
from ptune.engine import Run, TrainConfig, evaluate_zero_shot, train
from ptune.errors import ConfigError


def zero_shot_cfg(tiny_gpt2_dir, toy_task, **kw):
    return TrainConfig(model=tiny_gpt2_dir, task=toy_task["task"], test_file=toy_task["test_file"],
                       validation_file=toy_task["validation_file"], **kw)


def test_zero_shot_scores_equal_the_base_lm(tiny_gpt2_dir, toy_task, tokenizer):
    run = Run.zero_shot(zero_shot_cfg(tiny_gpt2_dir, toy_task, template="Topic of {text}:{mask}"))
    assert run.model.method == "manual" and run.model.trainable_parameters()[0] == 0
    text = "the team won the match"
    result = run.predict([text])[0]
    # the reference: the plain causal LM's next-token logits for the label words' first tokens
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ids = run.encoder.encode({"text": text}).input_ids
    assert ids == tokenizer("[CLS] topic of " + text + ":", add_special_tokens=False)["input_ids"]
    words = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("sports", "food")]
    with torch.no_grad():
        want = torch.softmax(base(torch.tensor([ids])).logits[0, -1, words].float(), -1)
    got = torch.tensor([result["probabilities"]["sport"], result["probabilities"]["food"]])
    assert torch.allclose(got, want, atol=1e-4)
    cfg = zero_shot_cfg(tiny_gpt2_dir, toy_task, template="Topic of {text}:{mask}")
    metrics = evaluate_zero_shot(cfg)
    assert set(metrics) == {"accuracy", "macro_f1"}
    records = Run.zero_shot(cfg).splits["test"]  # the metric is the predictions' hit rate on the test split
    hits = [p["label"] == r["label"] for p, r in zip(Run.zero_shot(cfg).predict([r["text"] for r in records]), records)]
    assert metrics["accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_zero_shot_cli(tiny_gpt2_dir, toy_task, tmp_path, capsys):
    args = ["--zero-shot", "--model", tiny_gpt2_dir, "--task", toy_task["task"], "--test-file", toy_task["test_file"]]
    assert main(["eval", *args, "--limit", "5"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    reference = evaluate_zero_shot(zero_shot_cfg(tiny_gpt2_dir, toy_task, limit_eval=5))
    assert metrics == pytest.approx(reference)
    assert main(["predict", *args, "bake the bread", "the striker scored", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["label"] in ("sport", "food") for x in lines)
    # a run directory and --zero-shot together, or zero-shot options on a run: one-line errors, exit 2
    assert main(["eval", str(tmp_path), *args]) == 2
    assert main(["eval", str(tmp_path), "--model", "gemma"]) == 2
    assert "only apply with --zero-shot" in capsys.readouterr().err


def test_manual_refuses_training_virtual_tokens_and_untrained_heads(tiny_gpt2_dir, toy_task, tmp_path):
    with pytest.raises(ConfigError, match="trains nothing.*--zero-shot"):
        train(zero_shot_cfg(tiny_gpt2_dir, toy_task, method="manual", train_file=toy_task["train_file"],
                            output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="no trainable tokens"):
        Run.zero_shot(zero_shot_cfg(tiny_gpt2_dir, toy_task, template="[P:2] {text}{mask}"))
    with pytest.raises(ConfigError, match=r"needs a head that adds no weights \(verbalizer for task toy\)"):
        Run.zero_shot(zero_shot_cfg(tiny_gpt2_dir, toy_task, head="classification"))


def test_apply_refuses_label_words_sharing_a_first_token(tokenizer):
    from conftest import tiny_base

    base = tiny_base("gpt2", "causal_lm")
    head = ptune.HeadConfig("verbalizer")
    with pytest.raises(ConfigError, match="'united states' / 'united kingdom'.*start differently"):
        ptune.apply(base, ptune.ManualConfig(), head=head, tokenizer=tokenizer, template="{text}{mask}",
                    labels=["us", "uk", "fr"], label_words=["united states", "united kingdom", "france"])


def test_probing_task_from_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """A built-in probing task: verbalizer by default, colliding candidates dropped and reported."""
    assert main(["eval", "--zero-shot", "--model", tiny_gpt2_dir, "--task", "lama-capital", "--limit", "8"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert set(metrics) == {"accuracy", "macro_f1", "precision_at_1"}
    assert metrics["precision_at_1"] == metrics["accuracy"]
    assert "lama-capital: dropped" in captured.err  # "san juan" / "san jose" share "san" in WordPiece
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_gpt2_dir, "--task", "lama-continent", "--method", "p_tuning",
                 "--max-steps", "2", "--batch-size", "8", "--limit-eval", "8", "--no-progress",
                 "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    adapter = json.loads((out / "best" / "adapter_config.json").read_text())
    assert adapter["head"]["kind"] == "verbalizer" and "Europe" in adapter["labels"]
    assert adapter["template"] == "[P:10] {subject} is a country in{mask}"
    assert summary["examples"]["test"] == 8
    assert summary["test"]["precision_at_1"] == summary["test"]["accuracy"]  # LAMA's name for top-1 accuracy


def test_a_model_without_an_lm_head_is_refused_for_zero_shot(capsys):
    """MiniLM ships no MLM head: transformers would make one up at random; ptune says so instead."""
    assert main(["eval", "--zero-shot", "--model", "minilm", "--task", "bbc", "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "minilm has no trained masked lm head" in err[0] and "--head classification" in err[0]
