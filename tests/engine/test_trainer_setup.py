"""The training set-up (engine/setup.py) and the run's tasks (engine/tasks.py), without training."""

from __future__ import annotations

import pytest
from test_multitask_engine import cfg, two_tasks  # noqa: F401  (the two_tasks fixture)

from ptune.engine.loop import Trainer
from ptune.engine.setup import prepare
from ptune.errors import ConfigError


def test_one_task_is_the_one_task_case(tiny_model_dir, toy_task, tmp_path):
    files = {k: v for k, v in toy_task.items() if k != "task"}
    c = cfg(tiny_model_dir, tmp_path / "run", toy_task["task"], **files)
    setup = prepare(c)
    try:
        tasks = setup.tasks
        assert not tasks.multi and len(tasks.parts) == 1
        assert tasks.metric == ("accuracy", True)
        assert tasks.epoch_pool(0) == tasks.epoch_pool(1) == list(range(len(tasks.train_ex)))  # each once, in order
        assert tasks.lengths == [len(e.encoded.input_ids) for e in tasks.train_ex]
        batch = tasks.make_batch([0, 1, 2], "cpu")
        assert "task_index" not in batch and batch["labels"].shape == (3,)
        counts = tasks.counts()
        assert counts["examples"]["train"] == len(tasks.train_ex) and "tasks" not in counts
        trainer = Trainer(c, setup)  # the set-up given is the one used
        assert trainer.model is setup.model and trainer.optimizer is setup.optimizer
        assert trainer.train_ex is tasks.train_ex and trainer.total == setup.total > 0
    finally:
        setup.directory.close()


def test_several_tasks_batch_and_score_per_task(tiny_model_dir, two_tasks, tmp_path):  # noqa: F811
    setup = prepare(cfg(tiny_model_dir, tmp_path / "run", two_tasks))
    try:
        tasks = setup.tasks
        assert tasks.multi and [p.task.name for p in tasks.parts] == ["toy", "ner"]
        assert tasks.metric == ("mean_score", True)
        ner = tasks.parts[1]
        rows = [0, ner.train_start]  # one row of each task
        batch = tasks.make_batch(rows, "cpu")
        assert batch["task_index"].tolist() == [0, 1] and len(batch["labels"]) == 2
        assert set(tasks.counts()["tasks"]) == {"toy", "ner"}
    finally:
        setup.directory.close()


def test_refused_set_up_leaves_no_directory(tiny_model_dir, toy_task, tmp_path):
    with pytest.raises(ConfigError, match="has no validation data"):
        prepare(cfg(tiny_model_dir, tmp_path / "run", toy_task["task"], train_file=toy_task["train_file"]))
    assert not (tmp_path / "run").exists()
