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
from contextlib import nullcontext
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import load_file

from ..api import WEIGHTS_NAME, load_trainable, save_adapter
from ..batching import length_grouped_order
from ..quantize import make_optimizer
from ..errors import ConfigError, PtuneError, TrainingInterrupted
from .build import build_model, encode_records, load_run_tokenizer, load_task, make_encoder
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import main_metric, make_batch, predict_logits, score


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


def bf16_available() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") or "avx512_bf16" in open(
            "/proc/cpuinfo").read()
    except OSError:
        return False


def prepare_run_dir(cfg: TrainConfig, is_main: bool) -> Path:
    run_dir = Path(cfg.output_dir)
    if is_main and run_dir.exists() and any(run_dir.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(run_dir)
        elif not cfg.resume:
            raise PtuneError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --output-dir")
    if cfg.resume and latest_checkpoint(run_dir) is None:
        raise PtuneError(f"--resume: {run_dir} has no checkpoint to resume from; drop --resume to start fresh")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class MetricsLog:
    """Appends JSON lines to metrics.jsonl; on resume, drops lines past the checkpoint's step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(k + "\n" for k in keep))

    def write(self, **row: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns the summary (also written to ``summary.json`` in the run directory)."""
    from accelerate import Accelerator

    if cfg.method == "manual":
        raise ConfigError("method manual trains nothing: evaluate the hand-written prompt with "
                          "`ptune eval --zero-shot --model M --task T` (Python: ptune.engine.evaluate_zero_shot)")

    precision = "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_available()) else "no"
    from accelerate.state import AcceleratorState

    # a second train() in one process (notebooks, tests) may ask for another precision; accelerate
    # keeps one global state, so start it afresh (the process group, if any, is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    run_dir = prepare_run_dir(cfg, acc.is_main_process)
    acc.wait_for_everyone()
    torch.manual_seed(cfg.seed)
    tokenizer = load_run_tokenizer(cfg)
    say = (lambda line: print(f"ptune: {line}", flush=True)) if cfg.progress and acc.is_main_process else None
    task, splits = load_task(cfg, tokenizer, log=say)
    if "validation" not in splits:
        raise ConfigError(f"task {task.name} has no validation data; pass --validation-file")
    model = build_model(cfg, task, tokenizer)
    encoder = make_encoder(model, tokenizer, cfg.max_length or task.max_length)
    train_ex = encode_records(task, encoder, splits["train"][:cfg.limit_train or None])
    val_ex = encode_records(task, encoder, splits["validation"][:cfg.limit_eval or None])
    pad_id = encoder.placeholder_id
    if acc.is_main_process:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        print(f"ptune: {model.describe()}; template {model.template.source!r}; "
              f"{len(train_ex)} train / {len(val_ex)} validation examples; precision {precision}", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    lengths = [len(e.encoded.input_ids) for e in train_ex]
    batches_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    model, optimizer = acc.prepare(model, optimizer)
    inner = acc.unwrap_model(model)
    metric_key, higher = main_metric(task)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": None, "bad_evals": 0,
             "skipped_batches": 0, "train_seconds": 0.0}
    if cfg.resume:
        state = load_checkpoint(latest_checkpoint(run_dir), inner, optimizer)
        scheduler.load_state_dict(state.pop("scheduler"))
        if acc.is_main_process:
            print(f"ptune: resumed from step {state['step']}", flush=True)
    log = MetricsLog(run_dir / "metrics.jsonl", acc.is_main_process, state["step"] if cfg.resume else None)
    # optional adapter hooks (AdaLoRA): a loss term, a per-step update, the length of the run
    extra_loss = getattr(inner.adapter, "extra_loss", None)
    after_step = getattr(inner.adapter, "after_optimizer_step", None)
    if hasattr(inner.adapter, "set_total_steps"):
        inner.adapter.set_total_steps(total)

    def evaluate_now() -> dict[str, float]:
        logits = predict_logits(inner, val_ex, batch_size=cfg.eval_batch_size, pad_id=pad_id, device=acc.device,
                                autocast=acc.autocast, shard=(acc.process_index, acc.num_processes))
        if acc.num_processes > 1:
            merged: dict = {}
            for part in acc.gather_for_metrics([logits], use_gather_object=True):
                merged.update(part)
            logits = merged
        return score(task, val_ex, logits)

    def checkpoint() -> None:
        if acc.is_main_process:
            save_checkpoint(run_dir, inner, optimizer, {**state, "scheduler": scheduler.state_dict()})
        acc.wait_for_everyone()

    def evaluate_and_keep_best() -> bool:
        """Evaluate, save the best adapter, checkpoint; True when early stopping says stop."""
        started = time.perf_counter()
        try:
            return _evaluate_and_keep_best()
        finally:
            state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - started

    def _evaluate_and_keep_best() -> bool:
        metrics = evaluate_now()
        value = metrics[metric_key]
        improved = state["best"] is None or (value > state["best"] if higher else value < state["best"])
        if improved:
            state.update(best=value, best_step=state["step"], bad_evals=0)
            if acc.is_main_process:
                tmp = run_dir / ".best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                save_adapter(inner, tmp)
                shutil.rmtree(run_dir / "best", ignore_errors=True)
                os.replace(tmp, run_dir / "best")
        else:
            state["bad_evals"] += 1
        log.write(step=state["step"], epoch=state["epoch"], split="validation", **metrics)
        if acc.is_main_process:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"ptune: step {state['step']} validation: {shown}", flush=True)
        checkpoint()
        return bool(cfg.early_stopping_patience) and state["bad_evals"] >= cfg.early_stopping_patience

    interrupted = {"flag": False}
    previous = signal.getsignal(signal.SIGINT)
    if acc.is_main_process:
        signal.signal(signal.SIGINT, lambda *_: interrupted.update(flag=True))
    bar = None
    if cfg.progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    model.train()
    stop = state["step"] >= total
    t0, seen, running = time.perf_counter(), 0, []
    try:
        while not stop:
            order = length_grouped_order(lengths, cfg.batch_size, cfg.seed + state["epoch"])
            usable = len(order) - len(order) % cfg.grad_accum
            b = state["batch_in_epoch"]
            while b < usable and not stop:
                group = order[b:b + cfg.grad_accum]
                losses, bad = [], False
                for micro, idx in enumerate(group):
                    rows = idx[acc.process_index::acc.num_processes] or idx[:1]
                    batch = make_batch(train_ex, rows, pad_id, acc.device)
                    sync = micro == len(group) - 1
                    with acc.autocast(), (acc.no_sync(model) if not sync else nullcontext()):
                        loss = model(**batch).loss
                        if extra_loss is not None:
                            loss = loss + extra_loss()
                    if not torch.isfinite(loss):
                        bad = True
                        break
                    acc.backward(loss / len(group))
                    shown = acc.reduce(loss.detach(), reduction="mean") if acc.num_processes > 1 else loss.detach()
                    losses.append(float(shown))
                    seen += len(idx)
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.nan_policy == "stop":
                        raise PtuneError(
                            f"loss became {float(loss.detach())} at step {state['step']} (epoch {state['epoch']}); stopped. "
                            f"The last good checkpoint is in {run_dir / 'checkpoints'}; lower --lr, or pass "
                            "--nan-policy skip to skip such batches")
                    state["skipped_batches"] += 1
                    b += cfg.grad_accum
                    state["batch_in_epoch"] = b
                    continue
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if after_step is not None:  # AdaLoRA: importance from this step's gradients, rank budget
                    after_step(state["step"])
                optimizer.zero_grad(set_to_none=True)
                b += cfg.grad_accum
                state.update(step=state["step"] + 1, batch_in_epoch=b)
                running.append(sum(losses) / len(losses))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running[-1]:.4f}", samples_s=f"{seen / (time.perf_counter() - t0):.1f}")
                if state["step"] % cfg.log_every == 0:
                    log.write(step=state["step"], epoch=state["epoch"], loss=sum(running) / len(running),
                              lr=scheduler.get_last_lr()[0])
                    running = []
                stop = state["step"] >= total
                if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                    stop = evaluate_and_keep_best() or stop
                elif cfg.save_every and state["step"] % cfg.save_every == 0:
                    checkpoint()
                if interrupted["flag"]:
                    checkpoint()
                    raise KeyboardInterrupt
            if b >= usable:
                state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
                if not cfg.eval_every:
                    stop = evaluate_and_keep_best() or stop
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        raise TrainingInterrupted(f"interrupted at step {state['step']}; checkpoint saved in {run_dir / 'checkpoints'}; "
                         "continue with --resume") from None
    finally:
        signal.signal(signal.SIGINT, previous) if acc.is_main_process else None
    if bar is not None:
        bar.close()
    if state["best_step"] is None:  # ended before any evaluation (max_steps inside the first epoch)
        evaluate_and_keep_best()
    state["train_seconds"] += time.perf_counter() - t0
    test_metrics, test_ex = None, []
    if "test" in splits:  # the best adapter on held-out data
        load_trainable(inner, load_file(str(run_dir / "best" / WEIGHTS_NAME)), str(run_dir / "best"))
        test_ex = encode_records(task, encoder, splits["test"][:cfg.limit_eval or None])
        test_logits = predict_logits(inner, test_ex, batch_size=cfg.eval_batch_size, pad_id=pad_id,
                                     device=acc.device, autocast=acc.autocast)
        test_metrics = score(task, test_ex, test_logits)
        log.write(step=state["step"], split="test", **test_metrics)
    trainable, total_params = inner.trainable_parameters()
    summary = {
        "run_dir": str(run_dir), "adapter": str(run_dir / "best"), "method": cfg.method, "task": task.name,
        "model": cfg.model, "steps": state["step"], "epochs_completed": state["epoch"],
        f"best_validation_{metric_key}": state["best"], "best_step": state["best_step"],
        "trainable_parameters": trainable, "total_parameters": total_params,
        "trainable_percent": 100 * trainable / total_params, "train_seconds_this_session": state["train_seconds"],
        "eval_seconds": state.get("eval_seconds", 0.0),
        "test": test_metrics, "skipped_batches": state["skipped_batches"], "peak_rss_mb": peak_rss_mb(),
        "precision": precision, "examples": {"train": len(train_ex), "validation": len(val_ex), "test": len(test_ex)},
    }
    if acc.is_main_process:
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, run_dir / "summary.json")
    acc.wait_for_everyone()
    return summary
