"""SIGKILL at random moments never leaves a broken run; --resume then ends where an unbroken run ends.

The reference run and the ten killed ones are processes forked from one fork server that has imported ptune
(``multiprocessing``'s forkserver, preloading ``ptune.cli``): each is its own process, killed with SIGKILL
mid-run, holding nothing a fresh ``ptune train`` would not (no model, no run), without paying the ~5 s of
torch + transformers imports ten times. The last ``--resume`` is ``python -m ptune.cli`` in a fresh
interpreter, as a user runs it after a crash.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import subprocess
import sys
import time

from ptune.api import load_adapter
from ptune.engine.checkpoint import latest_checkpoint
from ptune.engine.run_dir import OWNER_NAME

KILL_TRIALS = 10


def _cmd(tiny_model_dir, toy_task, out, *extra):
    return [sys.executable, "-m", "ptune.cli", *_args(tiny_model_dir, toy_task, out, *extra)]


def _args(tiny_model_dir, toy_task, out, *extra):
    return ["train", "--model", tiny_model_dir, "--task", toy_task["task"],
            "--train-file", toy_task["train_file"], "--validation-file", toy_task["validation_file"],
            "--method", "p_tuning", "--template", "[P:2] {text} [P:2]", "--encoder", "lstm",
            "--epochs", "30", "--batch-size", "4", "--lr", "5e-3", "--precision", "fp32", "--eval-every", "6",
            "--save-every", "1", "--log-every", "1", "--no-progress", "--output-dir", str(out), *extra]


def _losses(run):
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("split") is None]


def _train(argv: list[str], log: str) -> None:
    """A forked process's life: ``ptune train`` through ``ptune.cli.main``, output to ``log``, its exit code out."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from ptune.cli import main

    sys.exit(main(argv))


def test_sigkill_then_resume(tiny_model_dir, toy_task, tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for k in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS"):  # the fork server starts with the processes' environment
        monkeypatch.setenv(k, env[k])
    fork = multiprocessing.get_context("forkserver")
    fork.set_forkserver_preload(["ptune.cli"])

    def forked(out, *extra):
        proc = fork.Process(target=_train, args=(_args(tiny_model_dir, toy_task, out, *extra), str(tmp_path / "log")))
        proc.start()
        return proc

    try:
        ref = forked(tmp_path / "ref")
        ref.join()
        assert ref.exitcode == 0, (tmp_path / "log").read_text()[-2000:]
        run = tmp_path / "run"
        rng = random.Random(0)
        checked = stale_locks = 0
        for trial in range(KILL_TRIALS):
            extra = ("--resume",) if latest_checkpoint(run) is not None else ("--overwrite",)
            proc = forked(run, *extra)
            started = time.time()
            while not (run / "metrics.jsonl").exists() and proc.is_alive() and time.time() - started < 120:
                time.sleep(0.05)  # wait for training to start (model and data loading)
            before = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0
            while proc.is_alive() and (run / "metrics.jsonl").stat().st_size == before:
                time.sleep(0.02)  # this process has taken a step
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.is_alive():
                proc.kill()  # SIGKILL
            proc.join()
            # a killed run leaves its lock owner note behind; the OS lock went with the process, so the
            # next --resume (the next trial) takes the directory without waiting
            stale_locks += (run / OWNER_NAME).exists()
            ckpt = latest_checkpoint(run)
            if ckpt is not None:  # whatever moment the kill hit, the checkpoint the pointer names is whole
                state = json.loads((ckpt / "trainer_state.json").read_text())
                assert state["step"] >= 1
                load_adapter(ckpt, base=_tiny_base(tiny_model_dir))
                checked += 1
    finally:
        multiprocessing.forkserver._forkserver._stop()
    assert checked == KILL_TRIALS and stale_locks >= 1
    final = subprocess.run(_cmd(tiny_model_dir, toy_task, run, "--resume"), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    got = json.loads((run / "summary.json").read_text())
    want = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert got["best_validation_accuracy"] == want["best_validation_accuracy"]
    assert got["steps"] == want["steps"]
    assert _losses(run) == _losses(tmp_path / "ref")


def _tiny_base(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)
