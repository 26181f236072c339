"""Evaluation by generation end to end on a tiny random causal LM, in fresh processes as a shell runs the
commands (tests/cli_batch.py; the run is read back by a process that did not train it): train with
--eval-generate and --metric rougeL (best/ kept by ROUGE-L) -> ptune eval RUN --generate -> predictions file;
the zero-shot prompt scored the same way; and the refusals (--generate on a classification run, --eval-generate
on a head that does not write text, a generated metric without --eval-generate): one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_batch import run_batch

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


def write_capitals(folder: Path) -> Path:
    rows = [{"text": q, "target": " " + a} for q, a in PAIRS]
    for name, data in (("train", rows * 4), ("validation", rows), ("test", rows[::-1])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (folder / "task.yaml").write_text(TASK)
    return folder


@pytest.fixture()
def capitals(tmp_path):
    return write_capitals(tmp_path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cli(tiny_gpt2_dir, tmp_path_factory) -> dict:
    """The file's `ptune` commands in two fresh processes: the first trains the run and scores the zero-shot
    prompt (which reads no run), the second, which never held the run, evaluates it from its saved files. Each
    command's Result under its name; "root": the capitals folder (the commands' working directory), "run": the run."""
    root = write_capitals(tmp_path_factory.mktemp("capitals"))
    run = root / "run"
    files = [f"--{s}-file={root / f'{s}.jsonl'}" for s in ("train", "validation", "test")]
    zero_shot = ["eval", "--zero-shot", "--model", tiny_gpt2_dir, "--task", str(root / "task.yaml"),
                 "--test-file", str(root / "test.jsonl"), "--generate"]
    first = {
        "train": ["train", "--model", tiny_gpt2_dir, "--task", str(root / "task.yaml"), *files, "--method", "lora",
                  "--lr", "0.02", "--max-steps", "8", "--batch-size", "4", "--eval-every", "2", "--eval-generate", "4",
                  "--metric", "rougeL", "--precision", "fp32", "--no-progress", "--output-dir", str(run)],
        "zero-shot --output": [*zero_shot, "--limit", "2", "--max-new-tokens", "3",
                               "--output", str(root / "out" / "zs.jsonl")],
        "zero-shot": [*zero_shot, "--limit", "1"],
    }
    second = {
        "eval validation": ["eval", str(run), "--split", "validation", "--generate"],
        "eval test": ["eval", str(run), "--generate", "--limit", "3"],  # the test split, its first 3 records
    }
    done = {"root": root, "run": run}
    for batch in (first, second):
        done.update(zip(batch, run_batch(list(batch.values()), workdir=root)))
    return done


def test_train_keeps_best_by_rouge_l_then_eval_generate_writes_predictions(cli):
    run = cli["run"]
    cli["train"].check()
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
    metrics = json.loads(cli["eval validation"].check().stdout)
    assert metrics["rougeL"] == pytest.approx(best["rougeL"], abs=1e-12)
    assert metrics["generated"] == 4 and metrics["loss"] > 0 and metrics["perplexity"] > 1
    assert metrics["predictions"] == str(run / "predictions-validation.jsonl")

    metrics = json.loads(cli["eval test"].check().stdout)  # the test split, its first 3 records
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


def test_zero_shot_generation_writes_where_asked(cli):
    capitals = cli["root"]
    metrics = json.loads(cli["zero-shot --output"].check().stdout)
    assert {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "bleu4"} <= set(metrics)
    rows = read_jsonl(capitals / "out" / "zs.jsonl")
    assert [r["reference"] for r in rows] == ["lima", "madrid"] and all("prediction" in r for r in rows)
    # without --output: a file named after the task and split, in the working directory
    cli["zero-shot"].check()
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
