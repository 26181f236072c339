"""The training loop: one loop for every method and task, on accelerate.

AdamW on the trainable parameters, warmup then linear/cosine decay, gradient accumulation and
clipping, bf16 autocast where the hardware has it, dynamic padding with length-grouped batches,
evaluation every epoch or N steps, early stopping, the best adapter kept by the task metric,
crash-safe checkpoints and exact resume (model, optimizer, scheduler, RNG and data position).
Under ``accelerate launch`` each process takes an equal slice of every batch (DDP averages the
gradients), so a multi-process run follows the single-process one. What the loop starts from
(accelerator, run directory, model, data, optimizer) is built by :func:`ptune.engine.setup.prepare`;
what differs between one task and several is :class:`ptune.engine.tasks.RunTasks`'s to know.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapter_io import WEIGHTS_NAME, load_trainable, read_tensors, save_adapter
from ..batching import length_grouped_order
from ..errors import ConfigError, PtuneError, TrainingInterrupted
from ..heads import Example
from ..methods.base import TrainingHooks
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .setup import TrainerSetup, prepare
from .trainer_state import MetricsLog, TrainState


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _adapter_hooks(adapter: Any) -> tuple[Callable | None, Callable | None, Callable | None]:
    """The adapter's loop hooks when it has them (:class:`TrainingHooks`, AdaLoRA): a loss term, a per-step
    update, the length of the run; None for each otherwise."""
    if not isinstance(adapter, TrainingHooks):
        return None, None, None
    return adapter.extra_loss, adapter.after_optimizer_step, adapter.set_total_steps


class Trainer:
    """One training run, in the order ``train`` calls its steps: ``resume``, ``fit``, ``finish``.

    It starts from a :class:`TrainerSetup` (``prepare(cfg)`` builds one when none is given) and keeps
    these attributes, all set here:

    - from the set-up, fixed for the run: ``acc``, ``precision``, ``directory``, ``tasks``, ``model``
      (as accelerate wrapped it), ``inner`` (the model under the wrapper), ``params``, ``optimizer``,
      ``scheduler``, ``total`` (steps), ``tracking`` (the experiment trackers); ``train_ex`` and ``lengths``
      are the tasks' training examples and their token counts;
    - the adapter's loop hooks (None without them): ``extra_loss``, ``after_step``;
    - where the run stands: ``state`` (what a checkpoint saves), ``log`` (metrics.jsonl, opened by
      ``resume``), ``checkpointed_step`` (the step the last checkpoint holds, None before any);
    - this session's progress, reset by ``fit``: ``t0`` (its start), ``seen`` (examples trained on),
      ``running`` (losses since the last log line), ``bar`` (the progress bar, or None),
      ``interrupted`` (Ctrl-C received), ``out_of_time`` (--max-minutes spent), ``evaluated_at`` (the
      step of the last evaluation).
    """

    def __init__(self, cfg: TrainConfig, setup: TrainerSetup | None = None) -> None:
        s = prepare(cfg) if setup is None else setup
        self.cfg = cfg
        self.acc, self.precision, self.directory, self.tasks = s.acc, s.precision, s.directory, s.tasks
        self.model, self.inner, self.params = s.model, s.inner, s.params
        self.optimizer, self.scheduler, self.total = s.optimizer, s.scheduler, s.total
        self.train_ex: list[Example] = s.tasks.train_ex
        self.lengths: list[int] = s.tasks.lengths
        self.extra_loss, self.after_step, _ = _adapter_hooks(s.inner.adapter)
        self.tracking = s.tracking  # --report-to: each metrics.jsonl row goes to the trackers too
        self.state = TrainState()
        self.log: MetricsLog | None = None
        self.checkpointed_step: int | None = None
        self.t0, self.seen, self.running = time.perf_counter(), 0, []
        self.bar: Any = None
        self.interrupted = self.out_of_time = False
        self.evaluated_at: int | None = None

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def run_dir(self) -> Path:
        return self.directory.path

    def epoch_pool(self, epoch: int) -> list[int]:
        """The training examples of one epoch (indices into ``train_ex``): :meth:`RunTasks.epoch_pool`."""
        return self.tasks.epoch_pool(epoch)

    def make_train_batch(self, rows: list[int]) -> dict[str, Any]:
        return self.tasks.make_batch(rows, self.acc.device)

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
                              self.state.step if self.cfg.resume else None, track=self.tracking.log_row)

    def fit(self) -> None:
        """Epochs until the step budget or early stopping; Ctrl-C checkpoints, then TrainingInterrupted."""
        cfg = self.cfg
        if isinstance(self.inner.adapter, TrainingHooks):  # AdaLoRA: its rank schedule spans the run
            self.inner.adapter.set_total_steps(self.total)
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
            started = time.perf_counter()
            loss = self.train_step(order[b:b + cfg.grad_accum])
            st.step_seconds += time.perf_counter() - started
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
            bad = self._non_finite_anywhere(loss)  # decided together: every process stops or skips alike
            if bad is not None:
                self.optimizer.zero_grad(set_to_none=True)
                if cfg.nan_policy == "stop":
                    raise PtuneError(
                        f"loss became {bad} at step {st.step} (epoch {st.epoch}); stopped. "
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

    def _non_finite_anywhere(self, loss: torch.Tensor) -> str | None:
        """None when the loss is finite on every process, else what it became. Under DDP one process
        skipping a batch (or stopping) while another goes on to backward() would desynchronise the
        gradient all-reduce, so the decision is reduced across processes first (one small all-reduce per
        micro-batch)."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.acc.num_processes > 1:
            ok = self.acc.reduce(finite.to(self.acc.device), reduction="sum")
            if ok.item() == self.acc.num_processes:
                return None
            return str(float(loss.detach())) if not bool(finite.item()) else "non-finite on another process"
        return None if bool(finite.item()) else str(float(loss.detach()))

    def _log_step(self, loss: float) -> None:
        self.running.append(loss)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{self.seen / (time.perf_counter() - self.t0):.1f}")
        if self.state.step % self.cfg.log_every == 0:
            self.log.write(step=self.state.step, epoch=self.state.epoch, loss=sum(self.running) / len(self.running),
                           lr=self.scheduler.get_last_lr()[0],
                           samples_per_second=self.seen / max(time.perf_counter() - self.t0, 1e-9))
            self.running = []

    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """Metrics of every task on a split (several tasks: ``task/metric`` and ``mean_score``, the mean of
        the tasks' main metrics); each process predicts its share of the examples."""
        return self.tasks.evaluate(split, self.acc, self.cfg.eval_batch_size)

    def evaluate_and_checkpoint(self) -> bool:
        """Evaluate, keep the best adapter, checkpoint; True when early stopping says stop."""
        cfg, st = self.cfg, self.state
        started = time.perf_counter()
        self.evaluated_at = st.step
        try:
            metrics = self.evaluate()
            self._keep_best(metrics[self.tasks.metric[0]])
            self.log.write(step=st.step, epoch=st.epoch, split="validation", **metrics,
                           step_seconds=round(st.step_seconds, 3))
            if self.is_main:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                print(f"ptune: step {st.step} validation: {shown}", flush=True)
            self.checkpoint()
            return bool(cfg.early_stopping_patience) and st.bad_evals >= cfg.early_stopping_patience
        finally:
            # added after the checkpoint, so a checkpoint counts the evaluations before this one
            st.eval_seconds = (st.eval_seconds or 0.0) + time.perf_counter() - started

    def _keep_best(self, value: float) -> None:
        st, higher = self.state, self.tasks.metric[1]
        if not (st.best is None or (value > st.best if higher else value < st.best)):
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
        counts = self.tasks.counts()  # encodes the test examples
        if counts["examples"]["test"]:  # the best adapter on held-out data
            load_trainable(self.inner, read_tensors(run_dir / "best" / WEIGHTS_NAME), str(run_dir / "best"))
            test_metrics = self.evaluate("test")
            self.log.write(step=st.step, split="test", **test_metrics)
        trainable, total_params = self.inner.trainable_parameters()
        summary = {
            "run_dir": str(run_dir), "adapter": str(run_dir / "best"), "method": cfg.method,
            "task": ",".join(p.task.name for p in self.tasks.parts),
            "model": cfg.model, "steps": st.step, "epochs_completed": st.epoch,
            f"best_validation_{self.tasks.metric[0]}": st.best, "best_step": st.best_step,
            "trainable_parameters": trainable, "total_parameters": total_params,
            "trainable_percent": 100 * trainable / total_params, "train_seconds_this_session": st.train_seconds,
            "eval_seconds": st.eval_seconds or 0.0, "step_seconds": st.step_seconds,
            "test": test_metrics, "skipped_batches": st.skipped_batches, "peak_rss_mb": peak_rss_mb(),
            "precision": self.precision, **counts,  # examples (and, for several tasks, per task)
        }
        if cfg.ensemble > 1:
            summary["ensemble"] = cfg.ensemble
        if self.inner.frozen is not None:
            summary["frozen_work"] = self.inner.frozen.summary()
        if self.out_of_time:
            summary["stopped"] = f"time budget (--max-minutes {cfg.max_minutes})"
        if self.is_main:
            tmp = run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, run_dir / "summary.json")
        self.tracking.end()
        self.acc.wait_for_everyone()
        return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns the summary (also written to ``summary.json`` in the run directory)."""
    if cfg.method == "manual":
        raise ConfigError("method manual trains nothing: evaluate the hand-written prompt with "
                          "`ptune eval --zero-shot --model M --task T` (Python: ptune.engine.evaluate_zero_shot)")
    trainer = Trainer(cfg, prepare(cfg))  # accelerator, run directory (locked), tasks, model, data, optimizer
    try:
        trainer.resume()
        trainer.fit()
        return trainer.finish()
    except BaseException as e:  # the trackers' runs end as failed (interrupted: killed)
        trainer.tracking.end(e)
        raise
    finally:
        trainer.directory.close()
