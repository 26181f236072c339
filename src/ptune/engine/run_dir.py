"""A run directory that tells the truth: one writer at a time, and a resume that cannot silently change the run.

- **One writer.** A training run holds an exclusive lock on its directory (``filelock``: an OS file lock,
  released by the kernel when the process dies, so a killed run never blocks ``--resume``) from before it
  looks at the directory until it ends. A second writer fails at once, naming the directory and the
  process holding it. Readers (``eval``, ``predict``, ``serve``) never take the lock: every file they read
  is written aside and renamed into place.
- **Resume compares.** ``config.json`` records the options a run was started with and is never
  overwritten. On ``--resume`` the new options are compared with the recorded ones (plus the changes
  already accepted): options that change what the checkpoints mean are refused by name with both values;
  options that may change (length of the run, evaluation and save cadence, progress) are accepted, and the
  optimisation settings (learning rate, schedule, decay, clipping) only with ``--allow-changes``. Each
  accepted change is appended to ``history`` in ``config.json`` with the step at which it took effect.
- **No litter.** A run refused while setting up (bad data, a model that will not load) removes the
  directory it created.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import ConfigError, PtuneError
from .checkpoint import latest_checkpoint
from .config import TrainConfig

LOCK_NAME = ".ptune.lock"
OWNER_NAME = ".ptune.lock.json"  # who holds the lock (the lock itself cannot say)
CONFIG_NAME = "config.json"
# options that change what the checkpoints mean: a resume may not change them
FIXED = ("model", "task", "train_file", "validation_file", "test_file", "method", "method_options", "head",
         "head_dropout", "share_prompt", "task_temperature", "ensemble", "init_from", "init_task",
         "pooling", "template", "max_length", "seed", "precision", "quantize", "trust_remote_code", "allow_pickle",
         "batch_size", "grad_accum", "limit_train")
# the optimisation itself: changed on resume only when the user says so
WITH_CONSENT = ("lr", "weight_decay", "scheduler", "warmup_ratio", "max_grad_norm")
# what a command says about itself, not about the run
NOT_COMPARED = ("output_dir", "overwrite", "resume", "allow_changes")


class RunLockedError(PtuneError):
    """Another process is training into this run directory."""


class RunDirectory:
    """The directory of one training run, held for the life of the run (main process only)."""

    def __init__(self, cfg: TrainConfig, is_main: bool) -> None:
        self.cfg, self.is_main = cfg, is_main
        self.path = Path(cfg.output_dir)
        self.created = False
        self._lock: FileLock | None = None

    # ------------------------------------------------------------------ opening and closing

    def open(self) -> "RunDirectory":
        """Take the lock, then check (and with --overwrite clear) the directory; raises with one line."""
        if not self.is_main:
            return self
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunLockedError(f"{self.path} is in use by another training run ({self._owner()}); wait for it to "
                                 "end, or choose another --output-dir") from None
        self._lock = lock
        _write_json(self.path / OWNER_NAME, {"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            self._check_contents()
        except BaseException:
            self.close(discard=self.created)
            raise
        return self

    def close(self, discard: bool = False) -> None:
        """Release the lock; ``discard`` removes the directory (a run refused before it began)."""
        if self._lock is None:
            return
        if discard:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            (self.path / OWNER_NAME).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def _owner(self) -> str:
        try:
            owner = json.loads((self.path / OWNER_NAME).read_text())
            return f"process {owner['pid']} on {owner['host']}, since {owner['started']}"
        except (OSError, ValueError, KeyError):
            return "a process that has not recorded itself yet"

    def _check_contents(self) -> None:
        cfg = self.cfg
        held = [p for p in self.path.iterdir() if p.name not in (LOCK_NAME, OWNER_NAME)]
        if held and cfg.overwrite:
            for p in held:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif held and not cfg.resume:
            raise PtuneError(f"{self.path} already holds a run; pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --output-dir")
        if cfg.resume:
            if latest_checkpoint(self.path) is None:
                raise PtuneError(f"--resume: {self.path} has no checkpoint to resume from; drop --resume to start fresh")
            self._check_resume()

    # ------------------------------------------------------------------ the run's record

    def record(self) -> dict[str, Any]:
        path = self.path / CONFIG_NAME
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_record(self) -> None:
        """A fresh run records its options; a resumed run keeps its record (and its history) as it is."""
        if self.is_main and not self.cfg.resume:
            _write_json(self.path / CONFIG_NAME, self.cfg.to_dict())

    def _check_resume(self) -> None:
        record = self.record()
        if not record:
            return  # a run from before records existed: nothing to compare with
        history = record.pop("history", [])
        effective = {**TrainConfig().to_dict(), **record}
        for entry in history:
            effective.update({k: v[1] for k, v in entry["changed"].items()})
        new = self.cfg.to_dict()
        changed = {k: (effective.get(k), new[k]) for k in new if k not in NOT_COMPARED and effective.get(k) != new[k]}
        if not changed:
            return
        refused = {k: v for k, v in changed.items() if k in FIXED}
        if refused:
            raise ConfigError("--resume cannot change what the checkpoints mean: " + _describe(refused)
                              + "; resume with the recorded values, or start a new run (--output-dir)")
        needs_consent = {k: v for k, v in changed.items() if k in WITH_CONSENT}
        if needs_consent and not self.cfg.allow_changes:
            raise ConfigError("--resume would change the optimisation: " + _describe(needs_consent)
                              + "; pass --allow-changes to accept (recorded in the run's history)")
        step = json.loads((latest_checkpoint(self.path) / "trainer_state.json").read_text())["step"]
        full = self.record()
        full["history"] = history + [{"step": step, "changed": {k: list(v) for k, v in changed.items()}}]
        _write_json(self.path / CONFIG_NAME, full)


def read_run_config(run_dir: Path) -> TrainConfig:
    """The options a run directory records, as they are in effect now (accepted resume changes applied)."""
    record = json.loads((Path(run_dir) / CONFIG_NAME).read_text())
    for entry in record.pop("history", []):
        record.update({k: v[1] for k, v in entry["changed"].items()})
    return TrainConfig.from_dict(record)


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} (recorded {old!r}, now {new!r})" for k, (old, new) in changes.items())


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
