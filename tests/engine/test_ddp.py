"""Data-parallel training: 2 CPU processes (gloo) under torchrun match one process.

torchrun, not ``accelerate launch --cpu``: accelerate 1.x starts a CPU "multi-process" launch as ONE
process unless MPI is installed (its simple launcher), so a test launched that way compares a run
with itself. Each test checks that two ranks really ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port


def test_two_process_ddp_matches_single(tiny_model_dir, toy_task, tmp_path):
    common = ["--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
              "--validation-file", toy_task["validation_file"], "--method", "prompt_tuning",
              "--num-virtual-tokens", "4", "--epochs", "2", "--batch-size", "8", "--lr", "5e-3",
              "--precision", "fp32", "--no-progress", "--log-every", "1",
              "--head-dropout", "0"]  # dropout draws other masks when a batch is split across processes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ptune.cli", "train", *common, "--output-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([*TORCHRUN, "-m", "ptune.cli", "train", *common, "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "ptune: 2 processes" in ddp.stdout, ddp.stdout  # really two ranks
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


NAN_ON_RANK_1 = '''
import os, sys
from ptune.model import PtuneModel

real, calls = PtuneModel.forward, {"n": 0}


def forward(self, *args, **kwargs):  # rank 1's third training batch gives a NaN loss; rank 0's stay finite
    out = real(self, *args, **kwargs)
    if self.training and os.environ.get("RANK") == "1":
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
    return out


PtuneModel.forward = forward
from ptune.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_loss_on_one_rank_is_decided_on_every_rank(policy, tiny_model_dir, toy_task, tmp_path):
    """One process seeing a NaN must not skip (or stop) alone: the other would wait in the gradient
    all-reduce for ever. Both skip the same batch, or both stop with the error."""
    (tmp_path / "nan_on_rank_1.py").write_text(NAN_ON_RANK_1)
    args = ["train", "--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
            "--validation-file", toy_task["validation_file"], "--method", "prompt_tuning", "--num-virtual-tokens",
            "4", "--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--no-progress", "--log-every", "1",
            "--nan-policy", policy, "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*TORCHRUN, str(tmp_path / "nan_on_rank_1.py"), *args], capture_output=True, text=True,
                       env=env, timeout=300)
    if policy == "skip":
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["skipped_batches"] == 1 and summary["steps"] == 5  # the step budget is kept: one batch more
    else:
        assert r.returncode != 0
        assert "loss became non-finite on another process at step 2" in r.stderr
        assert "loss became nan at step 2" in r.stderr
