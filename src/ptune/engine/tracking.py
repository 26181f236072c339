"""Experiment tracking: a run's numbers sent to TensorBoard, MLflow or W&B (``--report-to``), beside metrics.jsonl.

Through accelerate's trackers, on the main process only. Every row the run writes to ``metrics.jsonl`` goes
to each tracker too, at its step: the training rows as ``train/loss``, ``train/lr``, ``train/epoch``,
``train/samples_per_second``; an evaluation's as ``validation/<metric>`` and ``test/<metric>`` (a multi-task
run's ``validation/<task>/<metric>`` and ``validation/mean_score``). The options, the resolved spec
(``spec.*``), the parameter counts and ``--tracking-tags`` (``tag.*``) are the run's hyperparameters.
Where they go, all under ``<run>/tracking/``: TensorBoard's event files in ``<project>/`` (the
hyperparameters in a sub-folder, as ``SummaryWriter.add_hparams`` writes them); MLflow's store in
``mlflow.db`` (SQLite; MLflow 3 refuses a new ``file:`` store) unless ``MLFLOW_TRACKING_URI`` names
another; W&B's files in ``wandb/`` (online, or offline with ``WANDB_MODE=offline``). A resumed run goes on
logging to the same runs (``ids.json`` keeps the MLflow and W&B run ids; TensorBoard hides what the first
session wrote past the checkpoint, ``purge_step``). Not done: artifacts (the adapter is in the run
directory), system metrics, and accelerate's other trackers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError, TrainingInterrupted

# --report-to name -> the Python packages it needs (mlflow: sqlalchemy and alembic run its local SQLite store)
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "wandb": ("wandb",),
}
REPORT_TO = ("none", *TRACKERS, "all")
TRACKING_DIR = "tracking"  # under the run directory
IDS_NAME = "ids.json"  # each tracker's run (MLflow / W&B run id, TensorBoard folder): a resumed run goes on with it
INSTALL_HINT = "./install.sh track (or pip install 'ptune[track]')"


def parse_report_to(value: str) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> the names, checked (``none`` -> ()); ``all`` is kept as it is."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    bad = [n for n in names if n not in REPORT_TO]
    if bad or not names or (len(names) > 1 and ("none" in names or "all" in names)):
        raise ConfigError(f"report_to={value!r} is invalid: it must be one of {', '.join(REPORT_TO)}, or several "
                          f"of {', '.join(TRACKERS)} comma-separated")
    return () if names == ("none",) else names


def parse_tags(value: str | None) -> dict[str, str]:
    """``--tracking-tags study=cmp,variant=lora`` -> {key: value} (a later key wins); None -> {}."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"tracking_tags={value!r} must be text: KEY=VALUE,KEY=VALUE")
    tags: dict[str, str] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        key, eq, text = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"tracking_tags: {item!r} is not KEY=VALUE (e.g. --tracking-tags study=lr,team=nlp)")
        tags[key.strip()] = text.strip()
    return tags


def installed(name: str) -> bool:
    """Whether tracker ``name``'s packages are importable (the local MLflow store's too, unless
    MLFLOW_TRACKING_URI names another store)."""
    needs = TRACKERS[name]
    if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
        needs = needs[:1]
    return all(importlib.util.find_spec(p) is not None for p in needs)


def trackers_to_start(report_to: str) -> tuple[str, ...]:
    """The trackers a run starts: the named ones, each refused by name when its packages are missing; ``all``:
    those installed (at least one)."""
    names = parse_report_to(report_to)
    if names == ("all",):
        names = tuple(n for n in TRACKERS if installed(n))
        if not names:
            raise ConfigError(f"--report-to all: none of {', '.join(TRACKERS)} is installed; {INSTALL_HINT}")
        return names
    missing = [n for n in names if not installed(n)]
    if missing:
        packages = sorted({p for n in missing for p in TRACKERS[n] if importlib.util.find_spec(p) is None})
        raise ConfigError(f"--report-to {','.join(missing)} needs {', '.join(packages)}, not installed; {INSTALL_HINT}")
    return names


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested options as one level of hyperparameters every tracker takes: ``{"a": {"b": 1}}`` ->
    ``{"a.b": 1}``; lists as JSON, None as ``"none"``."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is None:
            out[name] = "none"
        else:
            out[name] = json.dumps(value, default=str)
    return out


def tracked_values(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as tracker values: a training row's under ``train/``, an evaluation's under its split."""
    split = row.get("split")
    skip = ("step", "split") if split is None else ("step", "split", "epoch")
    return {f"{split or 'train'}/{k}": v for k, v in row.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracking:
    """The run's trackers on an Accelerator built with ``log_with=names``; with no names every call does nothing."""

    def __init__(self, acc: Any = None, names: Iterable[str] = (), directory: Path | None = None) -> None:
        self.acc, self.names, self.directory = acc, tuple(names), directory
        self.ended = not self.names

    def start(self, project: str, run_name: str, hyperparameters: dict[str, Any], tags: dict[str, str],
              resume_step: int | None) -> None:
        """Open the trackers' runs (a resumed run: the same ones, from ``resume_step``) and record the
        hyperparameters of every run opened now (a resumed run keeps those of its first session)."""
        if not self.names:
            return
        assert self.directory is not None
        ids_path = self.directory / IDS_NAME
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
        kwargs: dict[str, dict[str, Any]] = {}
        if "tensorboard" in self.names and resume_step is not None:
            kwargs["tensorboard"] = {"purge_step": resume_step + 1}  # what a killed session wrote later is hidden
        if "mlflow" in self.names:
            kwargs["mlflow"] = {"run_name": run_name, "tags": tags or None, "run_id": ids.get("mlflow")}
            if self.acc.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                mlflow.set_tracking_uri(f"sqlite:///{(self.directory / 'mlflow.db').resolve()}")
                # which also exports MLFLOW_TRACKING_URI: a later run in this process would read it as the user's
                os.environ.pop("MLFLOW_TRACKING_URI", None)
                kwargs["mlflow"]["logging_dir"] = str((self.directory / "mlflow-artifacts").resolve())
        if "wandb" in self.names:
            kwargs["wandb"] = {"dir": str(self.directory), "name": run_name,
                               "tags": [f"{k}={v}" for k, v in tags.items()] or None}
            if ids.get("wandb"):
                kwargs["wandb"].update(id=ids["wandb"], resume="allow")
        if self.acc.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.ended = False
        self.acc.init_trackers(project, config=None, init_kwargs=kwargs)
        if not self.acc.is_main_process:
            return
        for tracker in self.acc.trackers:
            if tracker.name not in ids:  # a run opened now (a resumed session's runs have theirs)
                tracker.store_init_configuration(hyperparameters)
        run_id = {"tensorboard": lambda t: os.path.relpath(t.logging_dir, self.directory),  # its folder
                  "mlflow": lambda t: t.tracker.info.run_id, "wandb": lambda t: t.tracker.id}
        ids.update({t.name: run_id[t.name](t) for t in self.acc.trackers})
        tmp = ids_path.with_name(IDS_NAME + ".tmp")
        tmp.write_text(json.dumps(ids, indent=2))
        os.replace(tmp, ids_path)

    def log_row(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row, at its step (called on the main process)."""
        if not self.ended:
            self.acc.log(tracked_values(row), step=int(row["step"]))

    def end(self, error: BaseException | None = None) -> None:
        """Close the trackers' runs: finished, or (``error``) failed, or killed when interrupted. Not
        ``Accelerator.end_training``: it also destroys the process group, which a later run in the process keeps."""
        if self.ended:
            return
        self.ended = True
        if not self.acc.is_main_process:
            return
        interrupted = isinstance(error, (KeyboardInterrupt, TrainingInterrupted))
        for tracker in self.acc.trackers:
            if error is not None and tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="KILLED" if interrupted else "FAILED")
            elif error is not None and tracker.name == "wandb":
                tracker.tracker.finish(exit_code=130 if interrupted else 1)
            else:
                tracker.finish()
