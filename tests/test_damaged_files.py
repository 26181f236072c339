"""Damaged tensor files (truncated, garbled, a tensor of the wrong dtype or shape) are refused by every
command that reads them with one line naming the file and what to do, exit status 2, no traceback, and
nothing written: ``eval``, ``predict`` (one run, and ``--adapter`` sets), ``generate``, ``export`` (peft and
merged), ``serve``, ``train --resume`` (the checkpoint's adapter, optimizer and RNG tensors) and
``train --init-from``.

One tiny LoRA run is trained once for the module; each case damages one file of a copy of it.
``generate`` runs on that classification run: ``Run`` loads the adapter before anything else (a
causal-LM run takes the same path), so the damaged file is what it must refuse. Last, the optimizer
checks hold for bitsandbytes' paged AdamW too (the optimizer on CUDA), whose state saves and resumes exactly.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptune.cli import main

ADAPTER = "best/adapter_model.safetensors"
DAMAGES = ("truncated", "garbled", "int32", "shape")


# ---------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("damaged-data")
    rows = [("the team won the match", "sport"), ("bake the bread until golden", "food")] * 4
    for split in ("train", "validation", "test"):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
    (folder / "task.yaml").write_text("name: toy\ntask_type: classification\nlabels: [sport, food]\nmax_length: 16\n")
    (folder / "mixed.jsonl").write_text('{"adapter": "a", "text": "the team won"}\n')
    return {"folder": str(folder), "task": str(folder / "task.yaml")}


def _train_args(model_dir: str, data: dict[str, str], out: Path, *extra: str) -> list[str]:
    d = data["folder"]
    return ["train", "--model", model_dir, "--task", data["task"], "--train-file", f"{d}/train.csv",
            "--validation-file", f"{d}/validation.csv", "--test-file", f"{d}/test.csv", "--method", "lora",
            "--r", "2", "--max-steps", "2", "--batch-size", "4", "--save-every", "1", "--precision", "fp32",
            "--no-progress", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damaged-run") / "run"
    assert main(_train_args(tiny_model_dir, data, out)) == 0
    assert (out / ADAPTER).is_file() and (out / "checkpoints" / "latest").is_file()
    return out


@pytest.fixture()
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, free to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


# ---------------------------------------------------------------------------------------- damages


def damage(path: Path, how: str) -> None:
    if how == "truncated":  # a copy or a download cut off half-way
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "garbled":  # a plausible header length, then noise where the JSON header should be
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        path.write_bytes(raw[:8] + bytes((b * 37 + 11) % 256 for b in range(n)) + raw[8 + n:])
    elif how == "int32":  # every tensor re-saved as integers
        save_file({k: v.to(torch.int32) for k, v in load_file(str(path)).items()}, str(path))
    elif how in ("shape", "shape-body"):  # a tensor loses a row (and the whole file still parses): the
        tensors = load_file(str(path))   # largest (the head's weight here), or the body's first (LoRA's)
        key = max(tensors, key=lambda k: (tensors[k].numel(), k)) if how == "shape" else \
            min(k for k in tensors if not k.startswith("head."))
        t = tensors[key]
        tensors[key] = t.reshape(-1)[:-1].clone() if t.dim() < 2 else t[:-1].clone()
        save_file(tensors, str(path))
    else:
        raise ValueError(how)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (the lock file, empty and reused, excluded)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".ptune.lock"}


def refused(argv: list[str], capsys, damaged: Path) -> str:
    """Run ``ptune ARGV`` in this process: exit 2 and one stderr line naming ``damaged``."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("ptune: error: "), err
    assert str(damaged) in lines[0], f"the line does not name {damaged}: {lines[0]}"
    return lines[0]


# ---------------------------------------------------------------------------------------- inference


COMMANDS = {
    "eval": lambda run: ["eval", str(run), "--split", "test"],
    "predict": lambda run: ["predict", str(run), "the team won"],
    "generate": lambda run: ["generate", str(run), "the team", "--max-new-tokens", "2"],
    "export-peft": lambda run: ["export", str(run), "--format", "peft"],
    "export-merged": lambda run: ["export", str(run), "--format", "merged"],
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_run_commands_refuse_a_damaged_adapter(run, command, how, capsys):
    damage(run / ADAPTER, how)
    before = snapshot(run)
    line = refused(COMMANDS[command](run), capsys, run / ADAPTER)
    assert snapshot(run) == before  # nothing written: no export-*/ folder, no temporary folder either
    assert [p.name for p in run.iterdir() if p.name.startswith((".export", "export"))] == [], line


SET_COMMANDS = {
    "serve": lambda run, data: ["serve", f"a={run}", "--port", "0"],
    "predict --adapter": lambda run, data: ["predict", "--adapter", f"a={run}", "--input",
                                            f"{data['folder']}/mixed.jsonl"],
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", list(SET_COMMANDS))
def test_adapter_set_commands_refuse_a_damaged_adapter(run, data, command, how, capsys, monkeypatch):
    import uvicorn

    # were the adapter loaded after all, the server must not start and hold the test
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    damage(run / ADAPTER, how)
    before = snapshot(run)
    refused(SET_COMMANDS[command](run, data), capsys, run / ADAPTER)
    assert snapshot(run) == before


def test_a_garbled_adapter_config_is_one_line_too(run, capsys):
    (run / "best" / "adapter_config.json").write_bytes(b"{\"format_version\": 2, \x00\xff")
    refused(["predict", str(run), "the team won"], capsys, run / "best" / "adapter_config.json")


def test_predict_in_a_fresh_process_prints_no_traceback(run):
    """The issue's report as the user saw it: the real command, its exit status and its stderr."""
    damage(run / ADAPTER, "truncated")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ptune.cli", "predict", str(run), "the team won"],
                          capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "SafetensorError" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("ptune: error: ") and str(run / ADAPTER) in lines[0], proc.stderr


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_resume_refuses_a_damaged_checkpoint(run, tiny_model_dir, data, name, how, capsys):
    damaged = _checkpoint(run) / name
    damage(damaged, how)
    before = snapshot(run)
    refused(_train_args(tiny_model_dir, data, run, "--resume"), capsys, damaged)
    assert snapshot(run) == before


@pytest.mark.parametrize("how", [*DAMAGES, "shape-body"])
def test_init_from_refuses_a_damaged_source(run, tiny_model_dir, data, how, capsys, tmp_path):
    damage(run / ADAPTER, how)
    before = snapshot(run)
    new = tmp_path / "new"
    refused(_train_args(tiny_model_dir, data, new, "--init-from", str(run)), capsys, run / ADAPTER)
    assert not new.exists()  # the refused run leaves no directory behind
    assert snapshot(run) == before


def test_bitsandbytes_optimizer_state_is_saved_checked_and_restored(tmp_path):
    """On CUDA the optimizer is bitsandbytes' paged AdamW, whose state_dict nests its tensors under one key:
    the checkpoint stores them flat, the checks above accept them, and training goes on exactly."""
    bnb = pytest.importorskip("bitsandbytes")
    import json

    from ptune.engine.checkpoint import _optimizer_from_files, _optimizer_to_files

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        return params, bnb.optim.PagedAdamW32bit(params, lr=1e-2)

    def step(params, opt, seed):
        torch.manual_seed(seed)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers on CPU parameters fall back to plain buffers, and say so
        params, opt = make()
        step(params, opt, 1)
        tensors, meta = _optimizer_to_files(opt)
        save_file(tensors, str(tmp_path / "optimizer.safetensors"))
        meta = json.loads(json.dumps(meta))  # trainer_state.json holds the rest
        again, opt2 = make()
        with torch.no_grad():
            for a, b in zip(again, params):
                a.copy_(b)
        opt2.load_state_dict(_optimizer_from_files(load_file(str(tmp_path / "optimizer.safetensors")), meta, opt2,
                                                   tmp_path / "optimizer.safetensors"))
        step(params, opt, 2)
        step(again, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(params, again))
