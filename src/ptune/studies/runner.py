"""Run a study's runs, each as an ordinary ``ptune train`` in a fresh process.

A fresh process per run keeps runs independent and makes each run's time and peak memory its own.
A run with ``summary.json`` is finished and reused; one with a checkpoint but no summary was
interrupted and is resumed; one whose ``config.json`` differs from the plan is refused (the study
folder was changed by hand). Ctrl-C stops the study after the running run saved what it had;
running the same command again continues. With ``--report-to`` each run is tagged with its study, the study's
kind, its variant and seed, and logs to the study's project (the study folder's name, unless
``--tracking-project`` names one); MLflow runs share one store, ``<study>/tracking/mlflow.db`` (unless
``MLFLOW_TRACKING_URI`` names another), TensorBoard's are read together with ``--logdir <study>/runs``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ..engine.config import TrainConfig
from ..engine.tracking import parse_report_to, parse_tags
from ..errors import ConfigError, TrainingInterrupted
from .plan import Study, Variant, slug

# options that may differ between the plan and a run's config.json without changing the run
VOLATILE = ("resume", "overwrite", "progress", "allow_changes", "report_to", "tracking_project", "tracking_tags")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "")
    except OSError:
        return ""


def run_state(run_dir: Path) -> str:
    if (run_dir / "summary.json").is_file():
        return "done"
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        return "partial"
    return "new"


def _same_run(run_dir: Path, options: dict[str, Any]) -> None:
    path = run_dir / "config.json"
    if not path.is_file():
        return
    had = json.loads(path.read_text())
    want = TrainConfig.from_dict(options).to_dict()
    diff = sorted(k for k in want if k not in VOLATILE and had.get(k) != want[k])
    if diff:
        raise ConfigError(f"{run_dir} was trained with other settings ({', '.join(diff)}); it is not this study's "
                          f"run: remove it, or use another --output-dir")


def tracked(options: dict[str, Any], study: Study, output_dir: Path, variant: Variant, seed: int) -> dict[str, Any]:
    """A run's options with its study's tracker tags (study, study_kind, variant as its folder is named, seed; the
    user's own --tracking-tags kept) and project, when it reports to a tracker; as they are otherwise."""
    if not parse_report_to(options.get("report_to", "none")):
        return options
    tags = {**parse_tags(options.get("tracking_tags")), "study": output_dir.resolve().name, "study_kind": study.kind,
            "variant": slug(variant.name), "seed": str(seed)}
    return {**options, "tracking_tags": ",".join(f"{k}={v}" for k, v in tags.items()),
            "tracking_project": options.get("tracking_project") or output_dir.resolve().name}


def tracking_env(options: dict[str, Any], output_dir: Path) -> dict[str, str]:
    """The environment of a run reporting to MLflow: the study's one store, unless MLFLOW_TRACKING_URI is set."""
    if os.environ.get("MLFLOW_TRACKING_URI") or not ({"mlflow", "all"} & set(parse_report_to(
            options.get("report_to", "none")))):
        return {}
    (output_dir / "tracking").mkdir(parents=True, exist_ok=True)
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{(output_dir / 'tracking' / 'mlflow.db').resolve()}"}


def run_study(study: Study, output_dir: Path, log: Callable[[str], None] = print,
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train every (variant, seed) not finished yet; returns {"ran": n, "reused": n, "failed": [...]}."""
    jobs = [(v, s) for v in study.variants for s in study.seeds]
    for v, s in jobs:  # every run's options are valid before anything trains
        TrainConfig.from_dict(study.run_options(output_dir, v, s))
    ran, reused, failed = 0, 0, []
    for k, (variant, seed) in enumerate(jobs, 1):
        run_dir = study.run_dir(output_dir, variant, seed)
        options = tracked(study.run_options(output_dir, variant, seed), study, output_dir, variant, seed)
        state = run_state(run_dir)
        _same_run(run_dir, options)
        label = f"[{k}/{len(jobs)}] {variant.name} seed {seed}"
        if state == "done":
            reused += 1
            log(f"{label}: finished before, reused ({run_dir})")
            continue
        if state == "partial":
            options["resume"] = True
            log(f"{label}: resuming from its last checkpoint")
        else:
            if run_dir.exists():  # started but nothing saved yet
                shutil.rmtree(run_dir)
            log(f"{label}: training -> {run_dir}")
        env = {**tracking_env(options, output_dir), **(extra_env or {})}
        code, seconds = _train_in_subprocess(options, run_dir, env)
        if code == 130:
            raise TrainingInterrupted(f"study interrupted during {variant.name} seed {seed}; run the same command "
                                      f"again to continue (finished runs are reused)")
        if code != 0:
            failed.append({"variant": variant.name, "seed": seed, "exit_code": code,
                           "log": str(run_dir.parent / f"seed-{seed}.log")})
            log(f"{label}: FAILED (exit {code}); see {run_dir.parent / f'seed-{seed}.log'}")
            continue
        ran += 1
        log(f"{label}: done in {seconds:.0f} s")
    return {"ran": ran, "reused": reused, "failed": failed}


def _train_in_subprocess(options: dict[str, Any], run_dir: Path, extra_env: dict[str, str] | None) -> tuple[int, float]:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = run_dir.parent / f"seed-{options['seed']}.yaml"
    config.write_text(yaml.safe_dump(options, sort_keys=False))
    log_path = run_dir.parent / f"seed-{options['seed']}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with open(log_path, "a", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ptune.cli", "train", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT: let it save its checkpoint
            code = proc.wait()
            code = 130 if code != 0 else 0
    # the machine's load while the run trained: its times are comparable only under similar load
    (run_dir.parent / f"seed-{options['seed']}.host.json").write_text(json.dumps(
        {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_before": load_before, "load_after": os.getloadavg()[0],
         "seconds": time.perf_counter() - started}))
    if code != 0 and code != 130:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        if tail and tail[0].startswith("ptune: error:"):
            print(f"ptune: {run_dir}: {tail[0][len('ptune: '):]}", file=sys.stderr)
    return code, time.perf_counter() - started
