"""FSDP on 2 CPU processes (configs/accelerate/fsdp_cpu_2proc.yaml) against one process.

What holds today: the run starts, trains only the adapter, finishes, says its closing lines once and
saves a whole (unsharded) adapter. What does not: its losses do not follow the single-process run
(already the first logged loss differs: 0.7009 against 0.7042 on this toy run), where the DDP run
follows it to 1e-3 (test_ddp.py). That is a known defect, kept visible as a strict xfail: when it
is fixed, the xfail fails and must be turned into a plain assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    import csv

    from conftest import FOOD, SPORT

    tmp = tmp_path_factory.mktemp("fsdp")
    rows = [(t, "sport") for t in SPORT] + [(t, "food") for t in FOOD]
    for name, part in (("train.csv", rows * 3), ("validation.csv", rows)):
        with open(tmp / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
    (tmp / "task.yaml").write_text("name: toy\nhead: classification\nlabels: [sport, food]\nmax_length: 32\n")
    common = ["train", "--model", tiny_model_dir, "--task", str(tmp / "task.yaml"), "--train-file",
              str(tmp / "train.csv"), "--validation-file", str(tmp / "validation.csv"), "--method", "prompt_tuning",
              "--num-virtual-tokens", "4", "--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--precision", "fp32",
              "--no-progress", "--log-every", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ptune.cli", *common, "--output-dir", str(tmp / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    two = subprocess.run([launcher, "launch", "--config_file", str(CONFIG), "-m", "ptune.cli", *common,
                          "--output-dir", str(tmp / "two")], capture_output=True, text=True, env=env, timeout=600)
    return tmp, one, two


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r and r.get("split") is None]


def test_fsdp_run_trains_the_adapter_and_saves_it_whole(runs):
    tmp, one, two = runs
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("ptune: done.") == 1
    s1, s2 = (json.loads((tmp / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["steps"] == s1["steps"] and s2["trainable_parameters"] == s1["trainable_parameters"]
    a1, a2 = (load_file(str(tmp / d / "best" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert {k: v.shape for k, v in a2.items()} == {k: v.shape for k, v in a1.items()}


@pytest.mark.xfail(strict=True, reason="known defect: FSDP's losses do not follow the single-process run yet")
def test_fsdp_losses_follow_the_single_process_run(runs):
    tmp, one, two = runs
    assert max(abs(a - b) for a, b in zip(_losses(tmp / "one"), _losses(tmp / "two"))) < 1e-3
