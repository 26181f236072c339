"""The training loop: resume equals an uninterrupted run, run-directory safety, NaN handling."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from ptune.engine import TrainConfig, train
from ptune.engine.checkpoint import latest_checkpoint
from ptune.errors import ConfigError, PtuneError, TrainingInterrupted


def cfg(tiny_model_dir, toy_task, out, **kw):
    base = dict(model=tiny_model_dir, method="p_tuning_v2", method_options={"num_virtual_tokens": 4},
                epochs=3, batch_size=8, lr=5e-3, eval_every=3, progress=False, log_every=1,
                output_dir=str(out), precision="fp32", **toy_task)
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir):
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    return [(r["step"], round(r["loss"], 6)) for r in rows if "loss" in r and r.get("split") is None]


def test_train_writes_run_directory(tiny_model_dir, toy_task, tmp_path):
    s = train(cfg(tiny_model_dir, toy_task, tmp_path / "run"))
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "summary.json").is_file()
    assert (run / "best" / "adapter_model.safetensors").is_file()
    assert latest_checkpoint(run) is not None
    assert s["steps"] == 3 * 5  # 36 rows / 8 -> 5 batches per epoch
    from ptune.engine import Run

    assert Run(run).evaluate("test") == pytest.approx(s["test"])  # the best adapter, reloaded, scores the same
    # prefixes in the upper half of the 2 layers (P-Tuning v2's default layers="auto"): 1 layer x 4 tokens x K,V x 32
    assert s["trainable_parameters"] == 1 * 4 * 2 * 32 + 32 * 2 + 2  # prefixes + head
    # seconds of training on every validation row: growing, and evaluations are not in them
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    seconds = [r["step_seconds"] for r in rows if r.get("split") == "validation"]
    assert len(seconds) == 5 and 0 < seconds[0] and seconds == sorted(seconds) and seconds[-1] <= round(s["step_seconds"], 3)  # rows: 3 decimals
    assert s["step_seconds"] <= s["train_seconds_this_session"] - s["eval_seconds"]


def interrupt_after(monkeypatch, steps):
    """Send this process SIGINT (Ctrl-C) right after the given optimizer step."""
    real = torch.optim.lr_scheduler.LambdaLR.step
    count = {"n": 0}

    def step(self, *a, **k):
        real(self, *a, **k)
        count["n"] += 1
        if count["n"] == steps + 1:  # LambdaLR.step runs once at construction
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)


def test_resume_equals_uninterrupted(tiny_model_dir, toy_task, tmp_path, monkeypatch):
    full = train(cfg(tiny_model_dir, toy_task, tmp_path / "full"))
    with monkeypatch.context() as m:
        interrupt_after(m, 7)
        with pytest.raises(TrainingInterrupted, match="interrupted at step 7"):
            train(cfg(tiny_model_dir, toy_task, tmp_path / "part"))
    assert latest_checkpoint(tmp_path / "part").name == "step-7"
    resumed = train(cfg(tiny_model_dir, toy_task, tmp_path / "part", resume=True))
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert resumed["best_validation_accuracy"] == full["best_validation_accuracy"]
    assert resumed["test"] == full["test"]


def test_existing_run_dir_is_refused(tiny_model_dir, toy_task, tmp_path):
    train(cfg(tiny_model_dir, toy_task, tmp_path / "run", max_steps=2))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(PtuneError, match="already holds a run"):
        train(cfg(tiny_model_dir, toy_task, tmp_path / "run", max_steps=2))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    train(cfg(tiny_model_dir, toy_task, tmp_path / "run", max_steps=2, overwrite=True))


def test_resume_without_checkpoint_is_refused(tiny_model_dir, toy_task, tmp_path):
    with pytest.raises(PtuneError, match="no checkpoint"):
        train(cfg(tiny_model_dir, toy_task, tmp_path / "none", resume=True))


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_model_dir, toy_task, tmp_path, monkeypatch):
    from ptune.model import PtuneModel

    real = PtuneModel.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if self.training and calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PtuneModel, "forward", flaky)
    with pytest.raises(PtuneError, match="loss became nan"):
        train(cfg(tiny_model_dir, toy_task, tmp_path / "nan"))
    assert latest_checkpoint(tmp_path / "nan").name == "step-3"
    calls["n"] = 0
    s = train(cfg(tiny_model_dir, toy_task, tmp_path / "skip", nan_policy="skip"))
    assert s["skipped_batches"] == 1


def test_invalid_config_values():
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="scheduler"):
        TrainConfig(scheduler="exp")
    with pytest.raises(ConfigError, match=r"training options: unknown option\(s\) \[.bach_size.\]"):
        TrainConfig.from_dict({"bach_size": 3})


def test_early_stopping(tiny_model_dir, toy_task, tmp_path):
    s = train(cfg(tiny_model_dir, toy_task, tmp_path / "es", epochs=20, eval_every=1, lr=1e-9,
                  early_stopping_patience=2))
    assert s["steps"] < 20 * 5
    assert torch.isfinite(torch.tensor(s["best_validation_accuracy"]))


def test_a_run_is_scored_at_the_precision_it_trained_at(tiny_model_dir, toy_task, tmp_path):
    """`ptune eval` reproduces the run's own test metrics: a bf16-autocast run is scored under bf16 autocast."""
    from ptune.engine import Run
    from ptune.engine.build import encode_records
    from ptune.scoring import score_rows

    s = train(cfg(tiny_model_dir, toy_task, tmp_path / "bf", precision="bf16", epochs=1))
    run = Run(tmp_path / "bf")
    assert run.evaluate("test") == s["test"]
    examples = encode_records(run.task, run.encoder, run.splits["test"])
    rows = lambda **kw: score_rows(run.model, examples, batch_size=64, pad_id=0, **kw)  # noqa: E731
    scored = rows(autocast=run.autocast)  # what Run.evaluate scores with
    bf16 = rows(autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    fp32 = rows()
    assert all(torch.equal(scored[i], bf16[i]) for i in bf16)
    assert not all(torch.equal(fp32[i], bf16[i]) for i in bf16)
