"""Evaluation by generation end to end on a tiny random causal LM, each command in a fresh process: train with
--eval-generate and --metric rougeL (best/ kept by ROUGE-L) -> ptune eval RUN --generate -> predictions file;
the zero-shot prompt scored the same way; and the refusals (--generate on a classification run, --eval-generate
on a head that does not write text, a generated metric without --eval-generate): one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ptune.cli import main

PAIRS = [("the capital of france is", "paris"), ("the capital of italy is", "rome"),
         ("the capital of spain is", "madrid"), ("the capital of peru is", "lima")]
TASK = """name: capitals
head: causal_lm
text_fields: [text]
target_field: target
max_length: 24
max_target_length: 6
stop: ["."]
"""


def ptune(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """One ptune command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "ptune.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@pytest.fixture()
def capitals(tmp_path):
    rows = [{"text": q, "target": " " + a} for q, a in PAIRS]
    for name, data in (("train", rows * 4), ("validation", rows), ("test", rows[::-1])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "task.yaml").write_text(TASK)
    return tmp_path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_keeps_best_by_rouge_l_then_eval_generate_writes_predictions(tiny_gpt2_dir, capitals):
    run = capitals / "run"
    files = [f"--{s}-file={capitals / f'{s}.jsonl'}" for s in ("train", "validation", "test")]
    done = ptune("train", "--model", tiny_gpt2_dir, "--task", str(capitals / "task.yaml"), *files,
                 "--method", "lora", "--lr", "0.02", "--max-steps", "8", "--batch-size", "4", "--eval-every", "2",
                 "--eval-generate", "4", "--metric", "rougeL", "--precision", "fp32", "--no-progress",
                 "--output-dir", str(run))
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("split") == "validation"]
    assert len(evals) == 4 and all({"loss", "rouge1", "rouge2", "rougeL", "bleu4"} <= set(r) for r in evals)
    # best/ is the first evaluation with the highest ROUGE-L (a later tie does not replace it)
    best = max(evals, key=lambda r: (r["rougeL"], -r["step"]))
    assert summary["best_validation_rougeL"] == best["rougeL"] and summary["best_step"] == best["step"]
    lowest_loss = min(evals, key=lambda r: r["loss"])
    assert lowest_loss["step"] != best["step"]  # the loss kept falling: a loss-kept best/ would be another step
    assert {"rougeL", "bleu4", "loss"} <= set(summary["test"])  # the test split is scored by generation too

    # the kept adapter, evaluated by generation on the same validation records, gives the ROUGE-L it was kept for
    done = ptune("eval", str(run), "--split", "validation", "--generate")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["rougeL"] == pytest.approx(best["rougeL"], abs=1e-12)
    assert metrics["generated"] == 4 and metrics["loss"] > 0 and metrics["perplexity"] > 1
    assert metrics["predictions"] == str(run / "predictions-validation.jsonl")

    done = ptune("eval", str(run), "--generate", "--limit", "3")  # the test split, its first 3 records
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    rows = read_jsonl(run / "predictions-test.jsonl")
    assert [(r["input"], r["reference"]) for r in rows] == [(q, a) for q, a in PAIRS[::-1][:3]]

    # the predictions are the run's own greedy answers (batched decoding equals generate() alone), cut at the
    # task's stop string, and the reported scores are those of the file's rows
    from ptune.engine import Run
    from ptune.engine.generation import cut_at_stops
    from ptune.metrics import generation_scores

    model = Run(run)
    alone = [cut_at_stops(model.generate([r["input"]], max_new_tokens=6)[0], (".",)) for r in rows]
    assert [r["prediction"] for r in rows] == alone
    assert all("." not in p for p in alone)
    scores = generation_scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert {k: metrics[k] for k in scores} == pytest.approx(scores)


def test_zero_shot_generation_writes_where_asked(tiny_gpt2_dir, capitals):
    out = capitals / "out" / "zs.jsonl"
    done = ptune("eval", "--zero-shot", "--model", tiny_gpt2_dir, "--task", str(capitals / "task.yaml"),
                 "--test-file", str(capitals / "test.jsonl"), "--generate", "--limit", "2", "--max-new-tokens", "3",
                 "--output", str(out), cwd=capitals)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "bleu4"} <= set(metrics)
    rows = read_jsonl(out)
    assert [r["reference"] for r in rows] == ["lima", "madrid"] and all("prediction" in r for r in rows)
    # without --output: a file named after the task and split, in the working directory
    done = ptune("eval", "--zero-shot", "--model", tiny_gpt2_dir, "--task", str(capitals / "task.yaml"),
                 "--test-file", str(capitals / "test.jsonl"), "--generate", "--limit", "1", cwd=capitals)
    assert done.returncode == 0, done.stderr
    assert len(read_jsonl(capitals / "predictions-zero-shot-capitals-test.jsonl")) == 1


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptune: error: ") and "\n" not in err
    return err


def test_generate_on_a_classification_run_is_refused(tiny_model_dir, toy_task, tmp_path, capsys):
    run = tmp_path / "cls"
    assert main(["train", "--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
                 "--validation-file", toy_task["validation_file"], "--max-steps", "1", "--no-progress",
                 "--output-dir", str(run)]) == 0
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    assert main(["eval", str(run), "--generate"]) == 2
    err = _one_line_error(capsys)
    assert "--generate" in err and "classification head does not write text" in err
    assert sorted(p.name for p in run.iterdir()) == before  # no predictions file


@pytest.mark.parametrize("extra, message", [
    (["--eval-generate", "4"], "--eval-generate scores text the model writes"),
    (["--metric", "rougeL"], "--metric: metric 'rougeL' does not fit a classification head"),
])
def test_generation_options_on_a_classification_task_are_refused(tiny_model_dir, toy_task, tmp_path, capsys,
                                                                  extra, message):
    run = tmp_path / "cls"
    assert main(["train", "--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
                 "--validation-file", toy_task["validation_file"], "--max-steps", "1", "--no-progress",
                 "--output-dir", str(run), *extra]) == 2
    assert message in _one_line_error(capsys)
    assert not run.exists()


def test_a_generated_metric_needs_eval_generate(tiny_gpt2_dir, capitals, capsys):
    run = capitals / "run"
    assert main(["train", "--model", tiny_gpt2_dir, "--task", str(capitals / "task.yaml"),
                 "--train-file", str(capitals / "train.jsonl"), "--validation-file", str(capitals / "validation.jsonl"),
                 "--max-steps", "1", "--metric", "rougeL", "--no-progress", "--output-dir", str(run)]) == 2
    assert "--metric rougeL is scored on generated text: add --eval-generate N" in _one_line_error(capsys)
    assert not run.exists()
