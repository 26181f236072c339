"""The training loop: one loop for every method and task, on accelerate.

AdamW on the trainable parameters, warmup then linear/cosine decay, gradient accumulation and
clipping, bf16 autocast where the hardware has it, dynamic padding with length-grouped batches,
evaluation every epoch or N steps, early stopping, the best adapter kept by the task metric,
crash-safe checkpoints and exact resume (model, optimizer, scheduler, RNG and data position).
Under ``accelerate launch`` each process takes an equal slice of every batch (DDP averages the
gradients), so a multi-process run follows the single-process one.
"""

from __future__ import annotations

import json
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
import shutil
import signal
import time
from typing import Any, Callable

import torch


from . import memory
from ..attention import training_note
from ..adapter_io import WEIGHTS_NAME, load_trainable, read_tensors, save_adapter
from ..batching import length_grouped_order
from ..methods.base import TrainingHooks
from ..quantize import make_optimizer
from ..errors import ConfigError, PtuneError, TrainingInterrupted
from ..data import Task
from ..heads import Example
from ..model import PtuneModel
from ..multitask import MultiTaskModel
from ..transfer import warm_start
from .build import build_model, encode_records, load_run_tokenizer, load_tasks, make_encoder, model_is_encoder
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import main_metric, make_batch, make_multitask_batch, predict_logits, score
from .precision import bf16_autocast, bf16_available, cpu_flags, run_precision  # noqa: F401  (re-exported)
from .run_dir import RunDirectory
from .trainer_state import MetricsLog, TrainState


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
    say so instead of training under another engine."""
    for engine, name in (("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true") and not torch.cuda.is_available():
            raise ConfigError(f"{name} needs GPUs and this machine has "
                              "none (accelerate would fall back to plain data parallelism); on CPU run data-parallel "
                              "with `torchrun --standalone --nproc_per_node N -m ptune.cli train ...`")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _adapter_hooks(adapter: Any) -> tuple[Callable | None, Callable | None, Callable | None]:
    """The adapter's loop hooks when it has them (:class:`TrainingHooks`, AdaLoRA): a loss term, a per-step
    update, the length of the run; None for each otherwise."""
    if not isinstance(adapter, TrainingHooks):
        return None, None, None
    return adapter.extra_loss, adapter.after_optimizer_step, adapter.set_total_steps


@dataclass
class TaskData:
    """One task of the run: its data, the model that answers it (a multi-task model's view), its encoder,
    where its training examples sit in ``Trainer.train_ex``, and its validation examples."""

    task: Task
    splits: dict[str, list[dict]]
    model: PtuneModel
    encoder: Any
    train_start: int
    train_size: int
    val: list[Example]
    test: list[Example] | None = None  # encoded on first use


class Trainer:
    """One training run, in the order ``train`` calls its steps: construction sets up (accelerator,
    run directory, task, model, data, optimizer), then ``resume``, ``fit``, ``finish``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        memory.keep_freed_memory()  # each step reuses the last one's pages (engine/memory.py)
        self._start_accelerator()
        try:
            self._load_task_model_and_data()
            self._make_optimizer()
        except BaseException:  # refused while setting up (bad data, a model that will not load): leave nothing
            self.directory.close(discard=self.directory.created)
            raise
        self.state = TrainState()

    def _start_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        refuse_sharding_without_gpu()
        self.precision = run_precision(cfg)
        # a second train() in one process (notebooks, tests) may ask for another precision; accelerate
        # keeps one global state, so start it afresh (the process group, if any, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
        # a multi-task batch may hold no row of some task: its head then gets no gradient on that step
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.multi_task else []
        self.acc = Accelerator(mixed_precision=self.precision, cpu=not torch.cuda.is_available(),
                               kwargs_handlers=handlers)
        self.is_main = self.acc.is_main_process
        self.directory = RunDirectory(cfg, self.is_main).open()  # locked until train() returns
        self.run_dir = self.directory.path
        self.acc.wait_for_everyone()

    def _load_task_model_and_data(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        tokenizer = load_run_tokenizer(cfg)
        say = (lambda line: print(f"ptune: {line}", flush=True)) if cfg.progress and self.is_main else None
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
        self.model = build_model(cfg, tasks if multi else tasks[0], tokenizer, encoder_model=encoder)
        if cfg.init_from:
            note = (lambda line: print(f"ptune: {line}", flush=True)) if self.is_main else None
            warm_start(self.model, cfg.init_from, cfg.init_task, log=note)
        views = self.model.views if isinstance(self.model, MultiTaskModel) else [self.model]
        self.parts: list[TaskData] = []
        self.train_ex = []
        for t, ((task, splits), view) in enumerate(zip(loaded, views)):
            enc = make_encoder(view, tokenizer, cfg.max_length or task.max_length)
            train = encode_records(task, enc, splits["train"][:cfg.limit_train or None])
            for ex in train:
                ex.task = t
            val = encode_records(task, enc, splits["validation"][:cfg.limit_eval or None])
            self.parts.append(TaskData(task, splits, view, enc, len(self.train_ex), len(train), val))
            self.train_ex.extend(train)
        first = self.parts[0]  # the single-task names the rest of the loop reads
        self.task, self.splits, self.encoder, self.val_ex = first.task, first.splits, first.encoder, first.val
        self.pad_id = self.encoder.placeholder_id
        if self.is_main:
            self.directory.write_record()
            templates = "; ".join(f"{p.task.name} template {p.model.template.source!r}" if multi
                                  else f"template {p.model.template.source!r}" for p in self.parts)
            print(f"ptune: {self.model.describe()}; {templates}; {len(self.train_ex)} train / "
                  f"{sum(len(p.val) for p in self.parts)} validation examples; precision {self.precision}"
                  f"{training_note(self.model.base, self.precision, self.acc.device.type)}", flush=True)
            if self.model.frozen is not None:
                print(f"ptune: skipped work: {self.model.frozen.describe()}", flush=True)
            if self.acc.num_processes > 1:
                print(f"ptune: {self.acc.num_processes} processes ({self.acc.distributed_type.value}), each takes an "
                      "equal slice of every batch", flush=True)

    def epoch_pool(self, epoch: int) -> list[int]:
        """The training examples of one epoch (indices into ``train_ex``). One task: each once. Several:
        task t gets N * p_t draws, p_t proportional to (weight_t * n_t) ** (1 / task_temperature), N the
        examples of all tasks (each task's examples cycled in a seeded order)."""
        if len(self.parts) == 1:
            return list(range(len(self.train_ex)))
        cfg = self.cfg
        weights = [e.weight for e in cfg.task_entries()]
        mass = [(w * p.train_size) ** (1 / cfg.task_temperature) for w, p in zip(weights, self.parts)]
        total = sum(p.train_size for p in self.parts)
        rng = random.Random(cfg.seed * 100003 + epoch)
        pool: list[int] = []
        for p, m in zip(self.parts, mass):
            draws = max(1, round(total * m / sum(mass)))
            while draws > 0:
                perm = list(range(p.train_start, p.train_start + p.train_size))
                rng.shuffle(perm)
                pool.extend(perm[:draws])
                draws -= len(perm)
        return pool

    def make_train_batch(self, rows: list[int]) -> dict[str, Any]:
        if len(self.parts) > 1:
            return make_multitask_batch(self.train_ex, rows, self.pad_id, self.acc.device, len(self.parts))
        return make_batch(self.train_ex, rows, self.pad_id, self.acc.device)

    def _make_optimizer(self) -> None:
        cfg = self.cfg
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.params, cfg.learning_rate, cfg.weight_decay)
        self.lengths = [len(e.encoded.input_ids) for e in self.train_ex]
        steps_per_epoch = max(1, math.ceil(len(self.epoch_pool(0)) / cfg.batch_size) // cfg.grad_accum)
        self.total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.total))
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.inner = self.acc.unwrap_model(self.model)  # the PtuneModel under any DDP wrapper
        self.metric_key, self.higher = ("mean_score", True) if len(self.parts) > 1 else main_metric(self.task)

    def resume(self) -> None:
        """With --resume, restore from the latest checkpoint; open metrics.jsonl (trimmed to match)."""
        if self.cfg.resume:
            saved = load_checkpoint(latest_checkpoint(self.run_dir), self.inner, self.optimizer)
            self.scheduler.load_state_dict(saved.pop("scheduler"))
            self.state = TrainState.from_dict(saved)
            if self.is_main:
                print(f"ptune: resumed from step {self.state.step}", flush=True)
        self.checkpointed_step = self.state.step if self.cfg.resume else None
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", self.is_main,
                              self.state.step if self.cfg.resume else None)

    def fit(self) -> None:
        """Epochs until the step budget or early stopping; Ctrl-C checkpoints, then TrainingInterrupted."""
        cfg = self.cfg
        self.extra_loss, self.after_step, set_total_steps = _adapter_hooks(self.inner.adapter)
        if set_total_steps is not None:
            set_total_steps(self.total)
        # the handler only raises a flag: the loop checkpoints at the end of the step, then stops
        self.interrupted = False
        previous = signal.getsignal(signal.SIGINT)
        if self.is_main:
            signal.signal(signal.SIGINT, lambda *_: setattr(self, "interrupted", True))
        self.bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        stop = self.state.step >= self.total
        self.t0, self.seen, self.running = time.perf_counter(), 0, []
        self.out_of_time, self.evaluated_at = False, None
        try:
            while not stop:
                stop = self.run_epoch()
        except KeyboardInterrupt:
            if self.bar is not None:
                self.bar.close()
            raise TrainingInterrupted(f"interrupted at step {self.state.step}; checkpoint saved in "
                                      f"{self.run_dir / 'checkpoints'}; continue with --resume") from None
        finally:
            if self.is_main:
                signal.signal(signal.SIGINT, previous)
        if self.bar is not None:
            self.bar.close()

    def run_epoch(self) -> bool:
        """Train from the saved position to the end of this epoch; True when training should stop."""
        cfg, st = self.cfg, self.state
        pool = self.epoch_pool(st.epoch)
        order = [[pool[j] for j in b] for b in
                 length_grouped_order([self.lengths[i] for i in pool], cfg.batch_size, cfg.seed + st.epoch)]
        usable = len(order) - len(order) % cfg.grad_accum  # a trailing partial group is dropped
        b, stop = st.batch_in_epoch, False
        while b < usable and not stop:
            loss = self.train_step(order[b:b + cfg.grad_accum])
            b += cfg.grad_accum
            st.batch_in_epoch = b
            if loss is None:  # skipped for a non-finite loss: no step, no evaluation
                continue
            st.step += 1
            self._log_step(loss)
            stop = st.step >= self.total or self._out_of_time()
            if cfg.eval_every and st.step % cfg.eval_every == 0:
                stop = self.evaluate_and_checkpoint() or stop
            elif cfg.save_every and st.step % cfg.save_every == 0:
                self.checkpoint()
            if self.interrupted:
                self.checkpoint()
                raise KeyboardInterrupt
        if b >= usable:
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            if not cfg.eval_every:
                stop = self.evaluate_and_checkpoint() or stop
        if self.out_of_time and self.evaluated_at != st.step:  # the time-boxed run's last steps count too
            self.evaluate_and_checkpoint()
        return stop

    def _out_of_time(self) -> bool:
        """--max-minutes spent (decided by the main process, so every process stops at the same step)."""
        if not self.cfg.max_minutes:
            return False
        late = torch.tensor(float(time.perf_counter() - self.t0 >= 60 * self.cfg.max_minutes))
        if self.acc.num_processes > 1:
            late = self.acc.reduce(late.to(self.acc.device), reduction="sum").cpu()
        self.out_of_time = bool(late.item())
        return self.out_of_time

    def train_step(self, group: list[list[int]]) -> float | None:
        """One optimizer step over ``group`` (grad_accum batches); returns the mean loss, or None when a
        loss was not finite and --nan-policy skip dropped the group."""
        cfg, acc, st = self.cfg, self.acc, self.state
        losses = []
        for micro, idx in enumerate(group):
            # each process takes its slice of the batch (at least one row)
            rows = idx[acc.process_index::acc.num_processes] or idx[:1]
            batch = self.make_train_batch(rows)
            sync = micro == len(group) - 1  # DDP all-reduces gradients on the last micro-batch only
            with acc.autocast(), (acc.no_sync(self.model) if not sync else nullcontext()):
                loss = self.model(**batch).loss
                if self.extra_loss is not None:
                    loss = loss + self.extra_loss()
            if not self._finite_everywhere(loss):  # decided together: every process stops or skips alike
                self.optimizer.zero_grad(set_to_none=True)
                if cfg.nan_policy == "stop":
                    raise PtuneError(
                        f"loss became {self._bad_loss} at step {st.step} (epoch {st.epoch}); stopped. "
                        f"The last good checkpoint is in {self.run_dir / 'checkpoints'}; lower --lr, or pass "
                        "--nan-policy skip to skip such batches")
                st.skipped_batches += 1
                return None
            acc.backward(loss / len(group))
            shown = acc.reduce(loss.detach(), reduction="mean") if acc.num_processes > 1 else loss.detach()
            losses.append(float(shown))
            self.seen += len(idx)
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.after_step is not None:  # AdaLoRA: importance from this step's gradients, rank budget
            self.after_step(st.step)
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses)

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process. Under DDP one process skipping a batch (or
        stopping) while another goes on to backward() would desynchronise the gradient all-reduce, so
        the decision is reduced across processes first (one small all-reduce per micro-batch)."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        self._bad_loss = float(loss.detach())
        if self.acc.num_processes > 1:
            ok = self.acc.reduce(finite.to(self.acc.device), reduction="sum")
            if ok.item() < self.acc.num_processes and bool(finite.item()):
                self._bad_loss = "non-finite on another process"
            return ok.item() == self.acc.num_processes
        return bool(finite.item())

    def _log_step(self, loss: float) -> None:
        self.running.append(loss)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{self.seen / (time.perf_counter() - self.t0):.1f}")
        if self.state.step % self.cfg.log_every == 0:
            self.log.write(step=self.state.step, epoch=self.state.epoch, loss=sum(self.running) / len(self.running),
                           lr=self.scheduler.get_last_lr()[0])
            self.running = []

    def score_part(self, part: "TaskData", examples: list[Example]) -> dict[str, float]:
        """One task's metrics on ``examples``; each process predicts its share, gathered before scoring. A
        prompt ensemble adds each member's main metric (``member_k_<metric>``)."""
        acc = self.acc
        K = part.model.spec.ensemble
        members: list[dict[int, Any]] | None = [{} for _ in range(K)] if K > 1 else None
        logits = predict_logits(part.model, examples, batch_size=self.cfg.eval_batch_size, pad_id=self.pad_id,
                                device=acc.device, autocast=acc.autocast, shard=(acc.process_index, acc.num_processes),
                                members=members)
        if acc.num_processes > 1:
            merged: dict = {}
            merged_members: list[dict] = [{} for _ in range(K)]
            for rows, member_rows in acc.gather_for_metrics([(logits, members)], use_gather_object=True):
                merged.update(rows)
                for into, got in zip(merged_members, member_rows or []):
                    into.update(got)
            logits, members = merged, (merged_members if members is not None else None)
        return score(part.task, examples, logits, members)

    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """Metrics of every task on a split (several tasks: ``task/metric`` and ``mean_score``, the mean of
        the tasks' main metrics)."""
        if len(self.parts) == 1:
            part = self.parts[0]
            return self.score_part(part, part.val if split == "validation" else self.test_examples(part))
        metrics: dict[str, float] = {}
        mains = []
        for part in self.parts:
            examples = part.val if split == "validation" else self.test_examples(part)
            if not examples:
                continue
            got = self.score_part(part, examples)
            metrics.update({f"{part.task.name}/{k}": v for k, v in got.items()})
            mains.append(got[main_metric(part.task)[0]])
        metrics["mean_score"] = sum(mains) / len(mains)
        return metrics

    def test_examples(self, part: "TaskData") -> list[Example]:
        if part.test is None:
            records = part.splits.get("test", [])[:self.cfg.limit_eval or None]
            part.test = encode_records(part.task, part.encoder, records)
        return part.test

    def evaluate_and_checkpoint(self) -> bool:
        """Evaluate, keep the best adapter, checkpoint; True when early stopping says stop."""
        cfg, st = self.cfg, self.state
        started = time.perf_counter()
        self.evaluated_at = st.step
        try:
            metrics = self.evaluate()
            self._keep_best(metrics[self.metric_key])
            self.log.write(step=st.step, epoch=st.epoch, split="validation", **metrics)
            if self.is_main:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                print(f"ptune: step {st.step} validation: {shown}", flush=True)
            self.checkpoint()
            return bool(cfg.early_stopping_patience) and st.bad_evals >= cfg.early_stopping_patience
        finally:
            # added after the checkpoint, so a checkpoint counts the evaluations before this one
            st.eval_seconds = (st.eval_seconds or 0.0) + time.perf_counter() - started

    def _keep_best(self, value: float) -> None:
        st = self.state
        if not (st.best is None or (value > st.best if self.higher else value < st.best)):
            st.bad_evals += 1
            return
        st.best, st.best_step, st.bad_evals = value, st.step, 0
        if self.is_main:  # written aside, then renamed into place: best/ is never half-written
            tmp = self.run_dir / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(self.inner, tmp)
            old = self.run_dir / ".best.old"
            shutil.rmtree(old, ignore_errors=True)
            if (self.run_dir / "best").exists():  # moved aside, not deleted, until the new one is in place
                os.replace(self.run_dir / "best", old)
            os.replace(tmp, self.run_dir / "best")
            shutil.rmtree(old, ignore_errors=True)

    def checkpoint(self) -> None:
        self.checkpointed_step = self.state.step
        if self.is_main:
            save_checkpoint(self.run_dir, self.inner, self.optimizer,
                            {**self.state.to_dict(), "scheduler": self.scheduler.state_dict()})
        self.acc.wait_for_everyone()

    def finish(self) -> dict[str, Any]:
        """Evaluate if no evaluation ran yet, test the best adapter, write summary.json."""
        cfg, st, run_dir = self.cfg, self.state, self.run_dir
        if st.best_step is None:  # ended before any evaluation (max_steps inside the first epoch)
            self.evaluate_and_checkpoint()
        if self.checkpointed_step != st.step:  # a later --resume starts from the end
            self.checkpoint()
        st.train_seconds += time.perf_counter() - self.t0
        test_metrics = None
        n_test = sum(len(self.test_examples(p)) for p in self.parts)
        if n_test:  # the best adapter on held-out data
            load_trainable(self.inner, read_tensors(run_dir / "best" / WEIGHTS_NAME), str(run_dir / "best"))
            test_metrics = self.evaluate("test")
            self.log.write(step=st.step, split="test", **test_metrics)
        trainable, total_params = self.inner.trainable_parameters()
        summary = {
            "run_dir": str(run_dir), "adapter": str(run_dir / "best"), "method": cfg.method,
            "task": ",".join(p.task.name for p in self.parts),
            "model": cfg.model, "steps": st.step, "epochs_completed": st.epoch,
            f"best_validation_{self.metric_key}": st.best, "best_step": st.best_step,
            "trainable_parameters": trainable, "total_parameters": total_params,
            "trainable_percent": 100 * trainable / total_params, "train_seconds_this_session": st.train_seconds,
            "eval_seconds": st.eval_seconds or 0.0,
            "test": test_metrics, "skipped_batches": st.skipped_batches, "peak_rss_mb": peak_rss_mb(),
            "precision": self.precision,
            "examples": {"train": len(self.train_ex), "validation": sum(len(p.val) for p in self.parts),
                         "test": n_test},
        }
        if len(self.parts) > 1:
            summary["tasks"] = {p.task.name: {"train": p.train_size, "validation": len(p.val),
                                              "test": len(self.test_examples(p))} for p in self.parts}
        if cfg.ensemble > 1:
            summary["ensemble"] = cfg.ensemble
        if self.inner.frozen is not None:
            summary["frozen_work"] = self.inner.frozen.summary()
        if getattr(self, "out_of_time", False):
            summary["stopped"] = f"time budget (--max-minutes {cfg.max_minutes})"
        if self.is_main:
            tmp = run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, run_dir / "summary.json")
        self.acc.wait_for_everyone()
        return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns the summary (also written to ``summary.json`` in the run directory)."""
    if cfg.method == "manual":
        raise ConfigError("method manual trains nothing: evaluate the hand-written prompt with "
                          "`ptune eval --zero-shot --model M --task T` (Python: ptune.engine.evaluate_zero_shot)")
    trainer = Trainer(cfg)  # accelerator, run directory (locked), task, model, data, optimizer, scheduler
    try:
        trainer.resume()
        trainer.fit()
        return trainer.finish()
    finally:
        trainer.directory.close()
