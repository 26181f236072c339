"""Crash-safe checkpoints in a run directory.

A checkpoint is a folder ``checkpoints/step-N`` holding the adapter (safetensors + JSON), the
optimizer state (safetensors: tensors; JSON: the rest), and ``trainer_state.json`` (step, epoch,
position in the epoch, best metric, scheduler and RNG state). It is written under a temporary name,
fsynced, renamed into place, and only then does the pointer file ``checkpoints/latest`` move to it
(an atomic ``os.replace``), so a process killed at any moment leaves the previous checkpoint intact.
Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..adapter_io import WEIGHTS_NAME, load_trainable, read_tensors, save_adapter
from ..errors import PtuneError
from ..model import PtuneModel


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": random.getstate()[1], "python_version": random.getstate()[0]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((meta["python_version"], tuple(meta["python"]), None))


def save_checkpoint(run_dir: Path, model: PtuneModel, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']}"
    tmp = ckpts / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(model, tmp)
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    rng_tensors, rng_meta = rng_state()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(
        {**state, "optimizer": opt_meta, "rng": rng_meta}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = ckpts / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpts)
    pointer = ckpts / "latest.tmp"
    pointer.write_text(name)
    with open(pointer, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer, ckpts / "latest")
    _fsync_dir(ckpts)
    older = sorted((p for p in ckpts.glob("step-*") if p.name != name), key=lambda p: int(p.name.split("-")[1]))
    for old in older[:max(0, len(older) - (keep - 1))]:  # keep this one and keep-1 before it
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model: PtuneModel, optimizer: torch.optim.Optimizer) -> dict:
    """Restore adapter weights, optimizer and RNG; returns the trainer state."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        load_trainable(model, read_tensors(path / WEIGHTS_NAME, "checkpoint"), str(path))
        optimizer.load_state_dict(_optimizer_from_files(read_tensors(path / "optimizer.safetensors", "checkpoint"),
                                                        state.pop("optimizer")))
        set_rng_state(read_tensors(path / "rng.safetensors", "checkpoint"), state.pop("rng"))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise PtuneError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                         "delete it or start again with --overwrite") from e
    return state
