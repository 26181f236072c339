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
from safetensors.torch import save_file

from ..adapter_io import WEIGHTS_NAME, load_trainable, read_tensors, save_adapter
from ..errors import PtuneError
from ..model import PtuneModel


_EARLIER = ("resume from an earlier checkpoint (write its step-N name into checkpoints/latest) "
            "or start again with --overwrite")
_DAMAGED = f"the checkpoint is damaged: {_EARLIER}"


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
        flat: dict[str, Any] = {}
        for k, v in state.items():
            if isinstance(v, dict):  # bitsandbytes nests its state tensors under one key (hidden from FSDP)
                flat.update(v)  # and its load_state_dict takes them flat as well
            else:
                flat[k] = v
        for k, v in flat.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict,
                          optimizer: torch.optim.Optimizer | None = None, source: Path | str = "") -> dict:
    """The optimizer state dict saved by :func:`_optimizer_to_files`. With ``optimizer``, each tensor is
    checked against the parameter it belongs to first (torch's ``load_state_dict`` casts and never
    compares shapes, so a damaged file would load and fail, or silently train wrong, steps later)."""
    params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else None
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, dot, name = key.partition(".")
        if not (dot and pid.isdigit()) or (params is not None and int(pid) >= len(params)):
            raise PtuneError(f"{source} holds an entry {key!r} that belongs to no parameter of this model; "
                             f"{_DAMAGED}")
        state.setdefault(int(pid), {})[name] = v
    if params is not None:
        for key, v in tensors.items():
            pid, _, name = key.partition(".")
            p = params[int(pid)]
            if not v.dtype.is_floating_point:
                raise PtuneError(f"{source}: {key} holds {v.dtype} values where the optimizer keeps floats; "
                                 f"{_DAMAGED}")
            if v.dim() != 0 and v.shape != p.shape:
                raise PtuneError(f"{source}: {key} has shape {tuple(v.shape)}, its parameter "
                                 f"{tuple(p.shape)}; {_DAMAGED}")
        names = {pid: sorted(k for k, v in s.items() if torch.is_tensor(v)) for pid, s in state.items()}
        if len({tuple(n) for n in names.values()}) > 1:
            pid = min(names, key=lambda i: len(names[i]))
            raise PtuneError(f"{source} lacks tensors of parameter {pid} (it has {names[pid]}); {_DAMAGED}")
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": random.getstate()[1], "python_version": random.getstate()[0]}


def check_rng_state(tensors: dict[str, torch.Tensor], source: Path | str = "") -> None:
    """Refuse RNG tensors that ``torch.set_rng_state`` would reject with a traceback (or misread)."""
    want = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # the device generators set_rng_state restores (none without CUDA)
        want.update({f"cuda{i}": st for i, st in enumerate(torch.cuda.get_rng_state_all()) if f"cuda{i}" in tensors})
    for key, ref in want.items():
        got = tensors.get(key)
        if got is None:
            raise PtuneError(f"{source} lacks the {key} generator state; {_DAMAGED}")
        if got.dtype != ref.dtype or got.shape != ref.shape:
            raise PtuneError(f"{source}: {key} is {got.dtype} {tuple(got.shape)}, a generator state is "
                             f"{ref.dtype} {tuple(ref.shape)}; {_DAMAGED}")


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
    """Restore adapter weights, optimizer and RNG; returns the trainer state. Every file is read and
    checked before anything is restored: a damaged one is refused with one :class:`PtuneError` line
    naming it, and the model, optimizer and RNG are left as they were."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        weights = read_tensors(path / WEIGHTS_NAME, "checkpoint", _EARLIER)
        opt_file, rng_file = path / "optimizer.safetensors", path / "rng.safetensors"
        opt_state = _optimizer_from_files(read_tensors(opt_file, "checkpoint", _EARLIER), state.pop("optimizer"),
                                          optimizer, opt_file)
        rng_tensors = read_tensors(rng_file, "checkpoint", _EARLIER)
        check_rng_state(rng_tensors, rng_file)
        rng_meta = state.pop("rng")
        load_trainable(model, weights, path / WEIGHTS_NAME)
        optimizer.load_state_dict(opt_state)
        set_rng_state(rng_tensors, rng_meta)
    except PtuneError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise PtuneError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                         f"{_EARLIER}") from e
    return state
