"""The tasks of one training run behind one interface, whether the run has one task or several.

A single-task run is the one-task case of a multi-task run: :class:`RunTasks` holds each task's
encoded data and the model that answers it, and is the one place that knows what differs with the
count (the epoch's sampling, the batch layout, the metric names and the metric the run keeps its
best adapter by), so the training loop never asks how many tasks it has.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ..data import Task
from ..heads import Example
from ..model import PtuneModel
from .build import encode_records
from ..scoring import score_rows
from .evaluate import main_metric, make_batch, make_multitask_batch, score
from .generation import generate_and_score
from .sharding import is_sharded


@dataclass
class TaskData:
    """One task of the run: the model that answers it (a multi-task model's view), its encoder, where its
    training examples sit in ``RunTasks.train_ex``, its validation examples and its test records."""

    task: Task
    model: PtuneModel
    encoder: Any  # TemplateEncoder
    train_start: int
    train_size: int
    val: list[Example]
    test_records: list[dict]  # encoded on first use (``RunTasks.examples``)
    test: list[Example] | None = None


@dataclass
class RunTasks:
    """Every task of the run, its training examples in one list (``Example.task`` is the task's index)."""

    parts: list[TaskData]
    train_ex: list[Example]
    pad_id: int  # the shared tokenizer's: one padding id for every task's rows
    weights: list[float]  # each task's sampling weight (several tasks)
    temperature: float  # --task-temperature: 1 samples in proportion to weight * size, higher flattens
    seed: int
    # --eval-generate N: each evaluation also answers the first N records of the split by greedy generation
    # (ROUGE / BLEU beside the scoring pass's metrics); ``tokenizer`` decodes the answers
    generate_rows: int = 0
    tokenizer: Any = None
    chosen_metric: tuple[str, bool] | None = None  # --metric: (key, higher is better), instead of the task's
    lengths: list[int] = field(init=False)  # token count of each training example (length-grouped batches)

    def __post_init__(self) -> None:
        self.lengths = [len(e.encoded.input_ids) for e in self.train_ex]

    @property
    def multi(self) -> bool:
        return len(self.parts) > 1

    @property
    def metric(self) -> tuple[str, bool]:
        """(key, higher is better) of the number the best adapter is kept by: --metric, else the task's main
        metric, or for several tasks the mean of theirs (all higher-is-better, checked when set up)."""
        if self.chosen_metric is not None:
            return self.chosen_metric
        return ("mean_score", True) if self.multi else main_metric(self.parts[0].task)

    def epoch_pool(self, epoch: int) -> list[int]:
        """The training examples of one epoch (indices into ``train_ex``). One task: each once. Several:
        task t gets N * p_t draws, p_t proportional to (weight_t * n_t) ** (1 / temperature), N the
        examples of all tasks (each task's examples cycled in a seeded order)."""
        if not self.multi:
            return list(range(len(self.train_ex)))
        mass = [(w * p.train_size) ** (1 / self.temperature) for w, p in zip(self.weights, self.parts)]
        total = sum(p.train_size for p in self.parts)
        rng = random.Random(self.seed * 100003 + epoch)
        pool: list[int] = []
        for p, m in zip(self.parts, mass):
            draws = max(1, round(total * m / sum(mass)))
            while draws > 0:
                perm = list(range(p.train_start, p.train_start + p.train_size))
                rng.shuffle(perm)
                pool.extend(perm[:draws])
                draws -= len(perm)
        return pool

    def make_batch(self, rows: list[int], device: Any) -> dict[str, Any]:
        """The training batch of ``rows`` (several tasks: with ``task_index`` and per-task labels)."""
        if self.multi:
            return make_multitask_batch(self.train_ex, rows, self.pad_id, device, len(self.parts))
        return make_batch(self.train_ex, rows, self.pad_id, device)

    def examples(self, part: TaskData, split: str) -> list[Example]:
        """A task's validation or test examples (test encoded on first use)."""
        if split == "validation":
            return part.val
        if part.test is None:
            part.test = encode_records(part.task, part.encoder, part.test_records)
        return part.test

    def evaluate(self, split: str, acc: Any, batch_size: int) -> dict[str, float]:
        """Metrics of every task on a split, each process of ``acc`` (an Accelerator) predicting its share
        (several tasks: ``task/metric`` and ``mean_score``, the mean of the tasks' main metrics)."""
        def score_part(part: TaskData, examples: list[Example]) -> dict[str, float]:
            metrics = score_on_processes(acc, part, examples, batch_size=batch_size, pad_id=self.pad_id)
            if self.generate_rows and part.model.head_config.spec.generates:
                metrics.update(self.generated(part, examples, acc, batch_size))
            return metrics

        if not self.multi:
            part = self.parts[0]
            return score_part(part, self.examples(part, split))
        metrics: dict[str, float] = {}
        mains = []
        for part in self.parts:
            examples = self.examples(part, split)
            if not examples:
                continue
            got = score_part(part, examples)
            metrics.update({f"{part.task.name}/{k}": v for k, v in got.items()})
            mains.append(got[main_metric(part.task)[0]])
        metrics["mean_score"] = sum(mains) / len(mains)
        return metrics

    def generated(self, part: TaskData, examples: list[Example], acc: Any, batch_size: int) -> dict[str, float]:
        """ROUGE-1/2/L and BLEU-4 of greedy answers to the first ``generate_rows`` records. Every process
        decodes the same records (greedy: the same answers), so each keeps the same best adapter."""
        records = [e.record for e in examples[:self.generate_rows]]
        scores, _ = generate_and_score(part.model, self.tokenizer, part.task, part.encoder, records,
                                       batch_rows=batch_size, autocast=acc.autocast)
        return scores

    def counts(self) -> dict[str, Any]:
        """The summary's example counts: ``examples`` (all tasks), and ``tasks`` (per task) when several."""
        n_test = sum(len(self.examples(p, "test")) for p in self.parts)
        out: dict[str, Any] = {"examples": {"train": len(self.train_ex),
                                            "validation": sum(len(p.val) for p in self.parts), "test": n_test}}
        if self.multi:
            out["tasks"] = {p.task.name: {"train": p.train_size, "validation": len(p.val),
                                          "test": len(self.examples(p, "test"))} for p in self.parts}
        return out


def score_on_processes(acc: Any, part: TaskData, examples: list[Example], *, batch_size: int,
                       pad_id: int) -> dict[str, float]:
    """One task's metrics on ``examples``: each process of ``acc`` (an Accelerator) predicts its share,
    gathered before scoring. A prompt ensemble adds each member's main metric (``member_k_<metric>``)."""
    K = part.model.spec.ensemble
    members: list[dict[int, Any]] | None = [{} for _ in range(K)] if K > 1 else None
    # a sharded model (--sharding fsdp) all-gathers its layers in every forward, on every process together:
    # each process then scores every example (the same passes), and nothing is left to gather
    split = not is_sharded(part.model) and acc.num_processes > 1
    logits = score_rows(part.model, examples, batch_size=batch_size, pad_id=pad_id, device=acc.device,
                        autocast=acc.autocast, shard=(acc.process_index, acc.num_processes) if split else (0, 1),
                        members=members)
    if split:
        merged: dict = {}
        merged_members: list[dict] = [{} for _ in range(K)]
        for rows, member_rows in acc.gather_for_metrics([(logits, members)], use_gather_object=True):
            merged.update(rows)
            for into, got in zip(merged_members, member_rows or []):
                into.update(got)
        logits, members = merged, (merged_members if members is not None else None)
    return score(part.task, examples, logits, members)
