"""Setting up a training run: from a TrainConfig to what the loop needs, in the order it is built.

:func:`prepare` starts the accelerator, opens (and locks) the run directory, loads the tokenizer and
the tasks, builds the model (warm-started with ``init_from``), encodes the data, makes the
optimizer and the learning-rate schedule, and opens the experiment trackers' runs (``--report-to``,
:mod:`ptune.engine.tracking`); :class:`TrainerSetup` holds the result. The training
loop itself (``engine/loop.py``) starts from there. A run refused while setting up leaves no
directory behind.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import memory
from ..attention import training_note
from ..errors import ConfigError
from ..model import PtuneModel
from ..multitask import MultiTaskModel
from ..quantize import make_optimizer
from ..transfer import warm_start
from ..version import __version__
from ..data import Task
from ..heads import HEAD_KINDS
from ..metrics import GENERATION_METRICS
from .build import (build_model, encode_records, load_run_tokenizer, load_tasks, make_encoder, model_is_encoder,
                    task_head)
from .config import TrainConfig
from .evaluate import main_metric
from .checkpoint import latest_checkpoint
from .precision import run_precision
from .run_dir import RunDirectory
from .sharding import check_sharding, shard_model
from .tasks import RunTasks, TaskData
from .tracking import TRACKING_DIR, Tracking, flatten, parse_tags, trackers_to_start


@dataclass
class TrainerSetup:
    """What :func:`prepare` builds for one run; fixed while it trains."""

    acc: Any  # accelerate.Accelerator: device, processes, autocast, gradient all-reduce
    precision: str  # "bf16" or "no": what the run computes in
    directory: RunDirectory  # open and locked until the run ends
    tasks: RunTasks  # the encoded data of every task, and how to batch and evaluate it
    model: Any  # the PtuneModel (or MultiTaskModel) as accelerate prepared it (a DDP wrapper under several processes)
    inner: PtuneModel  # the model under any wrapper: what is saved, loaded and asked for its adapter
    params: list[torch.nn.Parameter]  # the trainable parameters (clipped together)
    optimizer: Any  # AdamW (or its 8-bit/paged form) over ``params``, as accelerate prepared it
    scheduler: torch.optim.lr_scheduler.LambdaLR  # warmup, then constant / linear / cosine (:func:`lr_lambda`)
    total: int  # optimizer steps the run takes (--max-steps, or the epochs' worth)
    tracking: Tracking = field(default_factory=Tracking)  # the experiment trackers (--report-to); none: no-ops


def lr_lambda(cfg: TrainConfig, total: int):
    warmup = int(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if cfg.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return f


def refuse_sharding_without_gpu() -> None:
    """accelerate shards (FSDP, DeepSpeed) on GPUs only: on a CPU-only machine an FSDP launch config
    silently becomes plain DDP (checked: the model comes back wrapped in DistributedDataParallel), so
    say so instead of training under another engine, and name ptune's own FSDP (``--sharding fsdp``),
    which shards on CPU."""
    for engine, name in (("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true") and not torch.cuda.is_available():
            raise ConfigError(f"{name} needs GPUs and this machine has "
                              "none (accelerate would fall back to plain data parallelism); on CPU run data-parallel "
                              "with `torchrun --standalone --nproc_per_node N -m ptune.cli train ...`"
                              + (", sharded with `--sharding fsdp`" if name == "FSDP" else ""))


def start_accelerator(cfg: TrainConfig) -> tuple[Any, str, Tracking]:
    """A fresh Accelerator for the run, the precision it computes in and its trackers (not started yet: a
    tracker whose package is missing is refused here, before the run directory exists)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    refuse_sharding_without_gpu()
    trackers = trackers_to_start(cfg.report_to)
    tracking_dir = Path(cfg.output_dir) / TRACKING_DIR
    precision = run_precision(cfg)
    # a second train() in one process (notebooks, tests) may ask for another precision; accelerate
    # keeps one global state, so start it afresh (the process group, if any, is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    # a multi-task batch may hold no row of some task: its head then gets no gradient on that step
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.multi_task else []
    acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=handlers,
                      log_with=list(trackers) or None, project_dir=str(tracking_dir) if trackers else None)
    check_sharding(cfg, acc.num_processes)
    return acc, precision, Tracking(acc, trackers, tracking_dir)


def load_model_and_tasks(cfg: TrainConfig, is_main: bool) -> tuple[PtuneModel, RunTasks]:
    """The tokenizer, every task (refused without validation data), the model that answers them
    (warm-started from ``init_from``) and each task's encoded examples."""
    torch.manual_seed(cfg.seed)
    tokenizer = load_run_tokenizer(cfg)
    say = (lambda line: print(f"ptune: {line}", flush=True)) if cfg.progress and is_main else None
    encoder = model_is_encoder(cfg)  # read once: it decides label words and which class loads the base
    loaded = load_tasks(cfg, tokenizer, log=say, encoder_model=encoder)
    multi = len(loaded) > 1
    for task, splits in loaded:
        if "validation" not in splits:
            where = " (in its task entry)" if multi else ""
            raise ConfigError(f"task {task.name} has no validation data; pass --validation-file{where}")
    tasks = [t for t, _ in loaded]
    if multi:
        lower = [t.name for t in tasks if not main_metric(t)[1]]
        if lower:
            raise ConfigError(f"a multi-task run keeps the adapter with the best mean of its tasks' main metrics, "
                              f"which must all be higher-is-better; {', '.join(lower)} are not (train them alone)")
    chosen = chosen_metric(cfg, tasks)
    model = build_model(cfg, tasks if multi else tasks[0], tokenizer, encoder_model=encoder)
    if cfg.init_from:
        note = (lambda line: print(f"ptune: {line}", flush=True)) if is_main else None
        warm_start(model, cfg.init_from, cfg.init_task, log=note)
    views = model.views if isinstance(model, MultiTaskModel) else [model]
    parts: list[TaskData] = []
    train_ex = []
    for t, ((task, splits), view) in enumerate(zip(loaded, views)):
        enc = make_encoder(view, tokenizer, cfg.max_length or task.max_length)
        train = encode_records(task, enc, splits["train"][:cfg.limit_train or None])
        for ex in train:
            ex.task = t
        val = encode_records(task, enc, splits["validation"][:cfg.limit_eval or None])
        test_records = splits.get("test", [])[:cfg.limit_eval or None]
        parts.append(TaskData(task, view, enc, len(train_ex), len(train), val, test_records))
        train_ex.extend(train)
    run_tasks = RunTasks(parts, train_ex, pad_id=parts[0].encoder.placeholder_id,
                         weights=[e.weight for e in cfg.task_entries()], temperature=cfg.task_temperature,
                         seed=cfg.seed, generate_rows=cfg.eval_generate, tokenizer=tokenizer, chosen_metric=chosen)
    return model, run_tasks


def chosen_metric(cfg: TrainConfig, tasks: list[Task]) -> tuple[str, bool] | None:
    """--metric as (key, higher is better), checked against the run's head; with --eval-generate, that every
    task's head writes text; a metric scored on generated text (--metric, or a task's own) needs --eval-generate."""
    heads = [task_head(cfg, t).spec for t in tasks]
    if cfg.eval_generate:
        silent = [f"{t.name} ({h.name})" for t, h in zip(tasks, heads) if not h.generates]
        if silent:
            writers = ", ".join(name for name, k in HEAD_KINDS.items() if k.generates)
            raise ConfigError(f"--eval-generate scores text the model writes; the head of task {', '.join(silent)} "
                              f"does not write text (heads that do: {writers}); drop --eval-generate")
    for t in tasks:
        if main_metric(t)[0] in GENERATION_METRICS and not cfg.eval_generate:
            raise ConfigError(f"task {t.name}'s metric {t.metric} is scored on generated text: add --eval-generate N "
                              "(validation records answered at each evaluation)")
    if cfg.metric is None:
        return None
    if len(tasks) > 1:
        raise ConfigError("--metric picks the metric of one task; a multi-task run keeps the adapter with the best "
                          "mean of its tasks' main metrics")
    try:
        spec = heads[0].metric(cfg.metric)
    except ConfigError as e:
        raise ConfigError(f"--metric: {e}") from None
    if spec.name in GENERATION_METRICS and not cfg.eval_generate:
        raise ConfigError(f"--metric {spec.name} is scored on generated text: add --eval-generate N (validation "
                          "records answered by generation at each evaluation)")
    return spec.name, spec.higher_is_better


def announce(model: PtuneModel, tasks: RunTasks, acc: Any, precision: str) -> None:
    """The run's opening lines: method, template(s), data sizes, precision, skipped work, processes."""
    templates = "; ".join(f"{p.task.name} template {p.model.template.source!r}" if tasks.multi
                          else f"template {p.model.template.source!r}" for p in tasks.parts)
    print(f"ptune: {model.describe()}; {templates}; {len(tasks.train_ex)} train / "
          f"{sum(len(p.val) for p in tasks.parts)} validation examples; precision {precision}"
          f"{training_note(model.base, precision, acc.device.type)}", flush=True)
    if model.frozen is not None:
        print(f"ptune: skipped work: {model.frozen.describe()}", flush=True)
    if acc.num_processes > 1:
        print(f"ptune: {acc.num_processes} processes ({acc.distributed_type.value}), each takes an "
              "equal slice of every batch", flush=True)


def prepare(cfg: TrainConfig) -> TrainerSetup:
    """Everything a run trains with, built in order: accelerator, run directory (opened and locked until
    the caller closes it), tokenizer, tasks, model, encoded data, optimizer, schedule."""
    memory.keep_freed_memory()  # each step reuses the last one's pages (engine/memory.py)
    acc, precision, tracking = start_accelerator(cfg)
    directory = RunDirectory(cfg, acc.is_main_process).open()
    acc.wait_for_everyone()
    try:
        model, tasks = load_model_and_tasks(cfg, acc.is_main_process)
        shards = shard_model(model, acc) if cfg.sharding == "fsdp" else None  # --sharding fsdp: in place
        if acc.is_main_process:
            directory.write_record()
            announce(model, tasks, acc, precision)
        if shards is not None:
            acc.wait_for_everyone()  # after the main process's opening lines
            print(f"ptune: {shards.line()}", flush=True)  # every rank: what it holds
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(tasks.epoch_pool(0)) / cfg.batch_size) // cfg.grad_accum)
        total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
        model, optimizer = acc.prepare(model, optimizer)
        start_tracking(tracking, cfg, acc.unwrap_model(model), directory.path, acc, precision, total)
    except BaseException as e:  # refused while setting up (bad data, a model that will not load): leave nothing
        tracking.end(e)
        directory.close(discard=directory.created)
        raise
    return TrainerSetup(acc=acc, precision=precision, directory=directory, tasks=tasks, model=model,
                        inner=acc.unwrap_model(model), params=params, optimizer=optimizer, scheduler=scheduler,
                        total=total, tracking=tracking)


def start_tracking(tracking: Tracking, cfg: TrainConfig, model: PtuneModel, run_dir: Path, acc: Any,
                   precision: str, total: int) -> None:
    """Open the trackers' runs with the run's hyperparameters: its options, its resolved spec (``spec.*``), the
    parameter counts, and its tags (``tag.*``); a resumed run goes on from its checkpoint's step."""
    if not tracking.names:
        return
    resume_step = None
    if cfg.resume:
        resume_step = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())["step"]
    trainable, total_params = model.trainable_parameters()
    tags = parse_tags(cfg.tracking_tags)
    hyperparameters = {**flatten(cfg.to_dict()), **flatten(model.spec.to_dict(), "spec."),
                       "trainable_parameters": trainable, "total_parameters": total_params, "total_steps": total,
                       "precision_used": precision, "processes": acc.num_processes, "ptune_version": __version__,
                       **{f"tag.{k}": v for k, v in tags.items()}}
    tracking.start(cfg.tracking_project, cfg.output_dir, hyperparameters, tags, resume_step)
