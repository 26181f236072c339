"""The ptune command: a full train -> predict -> eval round, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ptune.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptune.cli", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_train_predict_eval(tiny_model_dir, toy_task, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
            "--validation-file", toy_task["validation_file"], "--test-file", toy_task["test_file"],
            "--method", "p_tuning", "--template", "[P:2] {text} [P:1]", "--encoder", "mlp", "--epochs", "1",
            "--batch-size", "8", "--no-progress", "--output-dir", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "trainable" in text and f"adapter: {out / 'best'}" in text
    saved = json.loads((out / "config.json").read_text())
    assert saved["method_options"] == {"encoder": "mlp"} and saved["template"] == "[P:2] {text} [P:1]"
    assert main(["predict", str(out), "the team won the match", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["label"] in ("sport", "food")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert main(["eval", str(out), "--split", "test"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--batch-size", "0"], "batch_size=0 is invalid"),
    (["train", "--model", "/no/such/model", "--max-steps", "1"], "/no/such/model"),
    (["train", "--task", "/no/such/task.yaml"], "does not exist"),
    (["predict", "/no/such/run", "hello"], "is not a finished ptune run"),
])
def test_user_errors_are_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
