"""Data-parallel training: 2 CPU processes (gloo) under torchrun match one process, and a NaN on one rank
is decided on both.

torchrun, not ``accelerate launch --cpu``: accelerate 1.x starts a CPU "multi-process" launch as ONE
process unless MPI is installed (its simple launcher), so a test launched that way compares a run
with itself. Each test checks that two ranks really ran. This file's runs share one launch (``launch``).

The helpers here are shared with test_multinode.py and test_fsdp.py: one toy task and one
single-process reference run per method, trained once per session (in this process: no fresh
interpreter), which every launch's losses are compared with.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
METHOD_ARGS = {"prompt_tuning": ["--num-virtual-tokens", "4"], "p_tuning_v2": ["--num-virtual-tokens", "4"],
               "lora": []}
_SHARED: dict = {}  # one toy task and one reference run per method, for the whole session


def toy_files(tmp_path_factory) -> dict[str, str]:
    """conftest's toy task (two classes, train / validation / test CSVs), written once per session."""
    if "toy" not in _SHARED:
        from conftest import FOOD, SPORT

        root = tmp_path_factory.mktemp("launch-toy")
        rows = [(t, "sport") for t in SPORT] + [(t, "food") for t in FOOD]
        files = {}
        for split, data in (("train", rows * 3), ("validation", rows), ("test", rows)):
            with open(root / f"{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows(data)
            files[f"{split}_file"] = str(root / f"{split}.csv")
        (root / "task.yaml").write_text("name: toy\ntask_type: classification\nlabels: [sport, food]\n"
                                        "label_words: {sport: sports, food: food}\nmax_length: 32\n")
        _SHARED["toy"] = {"task": str(root / "task.yaml"), **files}
    return _SHARED["toy"]


def train_args(model_dir: str, task: dict[str, str], method: str = "prompt_tuning") -> list[str]:
    """The run every launch test trains: 2 epochs of 5 steps, fp32, every step's loss logged."""
    return ["train", "--model", model_dir, "--task", task["task"], "--train-file", task["train_file"],
            "--validation-file", task["validation_file"], "--test-file", task["test_file"], "--method", method,
            *METHOD_ARGS[method], "--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--precision", "fp32",
            "--no-progress", "--log-every", "1",
            "--head-dropout", "0"]  # dropout draws other masks when a batch is split across processes


def read_run(run_dir) -> tuple[list[float], dict]:
    """A run's per-step training losses (metrics.jsonl) and its summary.json."""
    rows = [json.loads(x) for x in open(Path(run_dir) / "metrics.jsonl")]
    return ([r["loss"] for r in rows if "loss" in r and r.get("split") is None],
            json.loads((Path(run_dir) / "summary.json").read_text()))


def single_run(model_dir: str, tmp_path_factory, method: str = "prompt_tuning") -> Path:
    """The single-process reference run of ``method``, trained once per session in this process."""
    key = ("single", model_dir, method)
    if key not in _SHARED:
        from ptune.cli import main

        out = tmp_path_factory.mktemp(f"single-{method}") / "run"
        assert main([*train_args(model_dir, toy_files(tmp_path_factory), method), "--output-dir", str(out)]) == 0
        _SHARED[key] = out
    return _SHARED[key]


def assert_follows_single(run_dir, single_dir, tolerance: float) -> float:
    """The launch's losses follow the single-process run's step for step (within ``tolerance``); returns the
    largest difference."""
    l1, s1 = read_run(single_dir)
    l2, s2 = read_run(run_dir)
    assert len(l1) == len(l2) == s1["steps"] == s2["steps"] == 10
    worst = max(abs(a - b) for a, b in zip(l1, l2))
    assert worst < tolerance, (l1, l2)
    assert abs(s1["best_validation_accuracy"] - s2["best_validation_accuracy"]) <= 1 / 12
    return worst


DRIVER = '''
import json, os, sys
from ptune.model import PtuneModel

real, nan = PtuneModel.forward, {"on": False, "n": 0}


def forward(self, *args, **kwargs):  # a NaN run: rank 1's third training batch gives a NaN loss, rank 0's stay finite
    out = real(self, *args, **kwargs)
    if nan["on"] and self.training and os.environ.get("RANK") == "1":
        nan["n"] += 1
        if nan["n"] == 3:
            out.loss = out.loss * float("nan")
    return out


PtuneModel.forward = forward
from ptune.cli import main

folder, code = sys.argv[1], 0
for name, nan_on_rank_1, args in json.loads(sys.argv[2]):
    nan.update(on=nan_on_rank_1, n=0)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, ext in ((1, "out"), (2, "err")):  # each run's output apart, both ranks' in one file (as torchrun's)
        f = os.open(os.path.join(folder, f"{name}.{ext}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(f, fd)
        os.close(f)
    try:
        code = main(args)
    except BaseException:  # recorded as the run's failure, with its traceback in its stderr
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.path.join(folder, f"{name}.rank{os.environ['RANK']}.code"), "w") as f:
        f.write(str(code))
sys.exit(code)  # the last run's
'''


def _nan_args(model_dir: str, task: dict[str, str], policy: str, out) -> list[str]:
    return ["train", "--model", model_dir, "--task", task["task"], "--train-file", task["train_file"],
            "--validation-file", task["validation_file"], "--method", "prompt_tuning", "--num-virtual-tokens",
            "4", "--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--no-progress", "--log-every", "1",
            "--nan-policy", policy, "--output-dir", str(out)]


@pytest.fixture(scope="module")
def launch(tiny_model_dir, tmp_path_factory):
    """ONE torchrun launch of 2 processes (gloo) that runs, in turn, ``ptune.cli.main`` as ``ptune train`` runs
    it: the plain run test_two_process_ddp_matches_single checks, then the --nan-policy skip and stop runs of
    test_nonfinite_loss_on_one_rank_is_decided_on_every_rank (rank 1's third batch made NaN), the stop run
    last (it ends the launch with its error). Each run's stdout / stderr (both ranks') and each rank's exit code
    are kept apart: ``launch(name)`` -> (exit codes by rank, stdout, stderr); ``launch.folder`` holds the runs."""
    folder = tmp_path_factory.mktemp("ddp-launch")
    task = toy_files(tmp_path_factory)
    runs = [("two", False, [*train_args(tiny_model_dir, task), "--output-dir", str(folder / "two")]),
            *((f"nan-{policy}", True, _nan_args(tiny_model_dir, task, policy, folder / f"nan-{policy}"))
              for policy in ("skip", "stop"))]
    (folder / "driver.py").write_text(DRIVER)
    proc = subprocess.run([*TORCHRUN, str(folder / "driver.py"), str(folder), json.dumps(runs)],
                          capture_output=True, text=True, env=ENV, timeout=600)

    def result(name: str) -> tuple[dict[int, int], str, str]:
        codes = {r: int((folder / f"{name}.rank{r}.code").read_text()) for r in (0, 1)
                 if (folder / f"{name}.rank{r}.code").exists()}
        out, err = ((folder / f"{name}.{ext}") for ext in ("out", "err"))
        text = [f.read_text() if f.exists() else "" for f in (out, err)]
        assert codes, f"the launch never finished the {name} run (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        return codes, text[0], text[1]

    result.folder, result.returncode = folder, proc.returncode
    return result


def test_two_process_ddp_matches_single(launch, tiny_model_dir, tmp_path_factory):
    single = single_run(tiny_model_dir, tmp_path_factory)
    codes, stdout, stderr = launch("two")
    assert codes == {0: 0, 1: 0}, stderr[-3000:]
    assert "ptune: 2 processes" in stdout, stdout  # really two ranks
    for line in ("ptune: done.", "ptune: adapter:", "ptune: metrics:"):  # the main process alone says it
        assert stdout.count(line) == 1, stdout
    # each process takes half of every batch and DDP averages gradients: same trajectory up to float order
    assert_follows_single(launch.folder / "two", single, 1e-5)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_loss_on_one_rank_is_decided_on_every_rank(policy, launch):
    """One process seeing a NaN must not skip (or stop) alone: the other would wait in the gradient
    all-reduce for ever. Both skip the same batch, or both stop with the error."""
    codes, _, stderr = launch(f"nan-{policy}")
    if policy == "skip":
        assert codes == {0: 0, 1: 0}, stderr[-3000:]
        summary = json.loads((launch.folder / "nan-skip" / "summary.json").read_text())
        assert summary["skipped_batches"] == 1 and summary["steps"] == 5  # the step budget is kept: one batch more
    else:
        assert len(codes) == 2 and 0 not in codes.values() and launch.returncode != 0
        assert "loss became non-finite on another process at step 2" in stderr
        assert "loss became nan at step 2" in stderr
