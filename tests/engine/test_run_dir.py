"""A run directory tells the truth: one writer, resume that cannot silently change the run, no litter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ptune.engine import TrainConfig, train
from ptune.engine.run_dir import FIXED, OWNER_NAME
from ptune.errors import ConfigError, DataError, PtuneError


def cfg(tiny_model_dir, toy_task, out, **kw):
    base = dict(model=tiny_model_dir, method="p_tuning_v2", method_options={"num_virtual_tokens": 4}, epochs=2,
                batch_size=8, lr=5e-3, eval_every=3, progress=False, log_every=1, output_dir=str(out),
                precision="fp32", **toy_task)
    base.update(kw)
    return TrainConfig(**base)


def _cli(tiny_model_dir, toy_task, out, *extra):
    return [sys.executable, "-m", "ptune.cli", "train", "--model", tiny_model_dir, "--task", toy_task["task"],
            "--train-file", toy_task["train_file"], "--validation-file", toy_task["validation_file"],
            "--method", "p_tuning_v2", "--num-virtual-tokens", "4", "--batch-size", "4", "--precision", "fp32",
            "--eval-every", "5", "--no-progress", "--output-dir", str(out), *extra]


def test_two_writers_one_directory(tiny_model_dir, toy_task, tmp_path, capsys):
    """A second ``ptune train`` into a directory a running one holds is refused at once, with one line naming
    the holder. The first is its own process; the second runs here (``ptune.cli.main``: its exit code and
    stderr are the script's), which takes the lock as any other process would."""
    from ptune.cli import main

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "same"
    first = subprocess.Popen(_cli(tiny_model_dir, toy_task, out, "--seed", "1", "--epochs", "1000", "--max-steps",
                                  "200", "--eval-every", "50"), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.time()
        while not (out / OWNER_NAME).exists() and first.poll() is None and time.time() - started < 120:
            time.sleep(0.01)  # the first run takes the directory (its lock, then its owner note)
        # held still while the second command runs, however fast the machine: a stopped process holds its lock
        # as a running one does
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, first.stderr.read()[-2000:]
        capsys.readouterr()
        code = main(_cli(tiny_model_dir, toy_task, out, "--seed", "2", "--epochs", "1")[3:])
        stderr = capsys.readouterr().err
        assert first.poll() is None, "the first run ended before the second started"
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2
    assert stderr.strip().splitlines() == [stderr.strip()]  # one line
    assert f"{out} is in use by another training run (process {first.pid} on " in stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    record = json.loads((out / "config.json").read_text())
    assert record["seed"] == 1 and record["max_steps"] == 200
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [r["step"] for r in rows if "loss" in r and r.get("split") is None] == list(range(10, steps + 1, 10))
    assert [r["step"] for r in rows if r.get("split") == "validation"] == [50, 100, 150, 200]
    assert not (out / OWNER_NAME).exists()


@pytest.fixture()
def stopped_run(tiny_model_dir, toy_task, tmp_path):
    """A run of 2 epochs (10 steps) that has checkpoints, to resume."""
    out = tmp_path / "rz"
    train(cfg(tiny_model_dir, toy_task, out))
    return out


CHANGED = {"model": "tiny-gpt2", "task": "other.yaml", "train_file": "other.csv", "validation_file": "other.csv",
           "test_file": "other.csv", "method": "prompt_tuning", "method_options": {"num_virtual_tokens": 5},
           "head": "verbalizer", "pooling": "mean", "template": "{text} !", "max_length": 16, "seed": 14,
           "precision": "bf16", "quantize": "nf4", "trust_remote_code": True, "allow_pickle": True, "batch_size": 4,
           "grad_accum": 2, "limit_train": 10, "head_dropout": 0.0, "task_temperature": 2.0, "ensemble": 2,
           "init_from": "other_run"}
# fixed too, but a single-task run cannot change them alone (they need several tasks / an --init-from)
NOT_ALONE = {"share_prompt", "init_task"}


def test_every_option_that_changes_the_checkpoints_is_refused_by_name(stopped_run, tiny_model_dir, toy_task,
                                                                      tiny_gpt2_dir):
    assert set(CHANGED) | NOT_ALONE == set(FIXED)
    before = (stopped_run / "config.json").read_text()
    for option, value in CHANGED.items():
        value = tiny_gpt2_dir if option == "model" else value
        c = cfg(tiny_model_dir, toy_task, stopped_run, resume=True, epochs=3)
        c = TrainConfig.from_dict({**c.to_dict(), option: value})
        with pytest.raises(ConfigError) as info:
            train(c)
        recorded = json.loads(before)[option]
        assert f"--resume cannot change what the checkpoints mean: {option} (recorded {recorded!r}, now {value!r})" \
            in str(info.value), option
    assert (stopped_run / "config.json").read_text() == before  # nothing recorded is overwritten


def test_accepted_changes_go_to_the_history(stopped_run, tiny_model_dir, toy_task):
    with pytest.raises(ConfigError, match=r"would change the optimisation: lr \(recorded 0.005, now 0.01\); "
                                          "pass --allow-changes"):
        train(cfg(tiny_model_dir, toy_task, stopped_run, resume=True, epochs=3, lr=1e-2))
    s = train(cfg(tiny_model_dir, toy_task, stopped_run, resume=True, epochs=3, lr=1e-2, allow_changes=True,
                  eval_every=5))
    assert s["steps"] == 15
    record = json.loads((stopped_run / "config.json").read_text())
    assert record["epochs"] == 2 and record["lr"] == 5e-3 and record["eval_every"] == 3  # as the run started
    assert record["history"] == [{"step": 10, "changed": {"epochs": [2, 3], "lr": [0.005, 0.01],
                                                          "eval_every": [3, 5]}}]
    # resuming again with the settings now in effect is no change at all (and the run has nothing left to do)
    train(cfg(tiny_model_dir, toy_task, stopped_run, resume=True, epochs=3, lr=1e-2, eval_every=5))
    assert len(json.loads((stopped_run / "config.json").read_text())["history"]) == 1


def test_a_refused_run_leaves_no_directory(tiny_model_dir, toy_task, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,neither\n")
    with pytest.raises(DataError, match="unknown label 'neither'"):
        train(cfg(tiny_model_dir, {**toy_task, "train_file": str(bad)}, tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    with pytest.raises(PtuneError):
        train(cfg("/no/such/model", toy_task, tmp_path / "never2"))
    assert not (tmp_path / "never2").exists()
