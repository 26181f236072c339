"""Data-parallel training: 2 CPU processes (gloo) under `accelerate launch` match one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def test_two_process_ddp_matches_single(tiny_model_dir, toy_task, tmp_path):
    if shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")):
        pytest.skip("accelerate launcher missing")
    common = ["--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
              "--validation-file", toy_task["validation_file"], "--method", "prompt_tuning",
              "--num-virtual-tokens", "4", "--epochs", "2", "--batch-size", "8", "--lr", "5e-3",
              "--precision", "fp32", "--no-progress", "--log-every", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ptune.cli", "train", *common, "--output-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    ddp = subprocess.run([launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ptune.cli", "train", *common,
                          "--output-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for line in ("ptune: done.", "ptune: adapter:", "ptune: metrics:"):  # the main process alone says it
        assert ddp.stdout.count(line) == 1, ddp.stdout

    def read(name):
        rows = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
        return [r["loss"] for r in rows if "loss" in r and r.get("split") is None], json.loads(
            (tmp_path / name / "summary.json").read_text())

    l1, s1 = read("one")
    l2, s2 = read("two")
    assert len(l1) == len(l2) == s1["steps"] == s2["steps"]
    # each process takes half of every batch and DDP averages gradients: same trajectory up to float order
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-3
    assert abs(s1["best_validation_accuracy"] - s2["best_validation_accuracy"]) <= 1 / 12
