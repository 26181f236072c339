"""Multi-task runs, prompt ensembles and warm starts through the engine, the run directory and the CLI."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from cli_batch import run_batch
from test_train_loop import interrupt_after, losses

from ptune.engine import Run, TrainConfig, train
from ptune.engine.build import build_model, encode_records, load_task, load_run_tokenizer, make_encoder
from ptune.engine.evaluate import make_batch
from ptune.engine.loop import Trainer
from ptune.errors import AdapterMismatchError, ConfigError, PtuneError, TrainingInterrupted
from ptune.transfer import warm_start

SENTS = [(["alice", "went", "to", "paris"], ["B-per", "O", "O", "B-loc"]),
         (["bob", "likes", "london", "a", "lot"], ["B-per", "O", "B-loc", "O", "O"]),
         (["carol", "met", "dave", "in", "rome"], ["B-per", "O", "B-per", "O", "B-loc"])]


@pytest.fixture()
def two_tasks(toy_task, tmp_path):
    """The toy classification task and a toy tagging task, as a multi-task ``task`` list."""
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        with open(tmp_path / f"ner_{split}.jsonl", "w") as f:
            for _ in range(n):
                for tokens, tags in SENTS:
                    f.write(json.dumps({"tokens": tokens, "tags": tags}) + "\n")
    (tmp_path / "ner.yaml").write_text("name: ner\nhead: tagging\ntext_fields: [tokens]\nlabel_field: tags\n"
                                       "labels: [O, B-per, I-per, B-loc, I-loc]\nmax_length: 32\n")
    ner = {"task": str(tmp_path / "ner.yaml"), **{f"{s}_file": str(tmp_path / f"ner_{s}.jsonl")
                                                    for s in ("train", "validation", "test")}}
    return [dict(toy_task), ner]


def cfg(model, out, task, **kw):
    base = dict(model=model, task=task, method="p_tuning_v2", method_options={"num_virtual_tokens": 4},
                epochs=2, batch_size=8, lr=5e-3, progress=False, log_every=1, output_dir=str(out),
                precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_multitask_run_trains_saves_and_reloads(tiny_model_dir, two_tasks, tmp_path):
    s = train(cfg(tiny_model_dir, tmp_path / "run", two_tasks))
    assert s["task"] == "toy,ner" and set(s["tasks"]) == {"toy", "ner"}
    assert {"toy/accuracy", "ner/f1", "mean_score"} <= set(s["test"])
    assert s["test"]["mean_score"] == pytest.approx((s["test"]["toy/accuracy"] + s["test"]["ner/f1"]) / 2)
    validation = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if '"validation"' in x]
    assert all("toy/accuracy" in r and "ner/f1" in r for r in validation)  # per task, every evaluation
    run = Run(tmp_path / "run")
    assert run.evaluate("test") == pytest.approx(s["test"])  # reloaded from best/: the same per-task metrics
    ner = Run(tmp_path / "run", task="ner")
    assert ner.evaluate("test")["f1"] == pytest.approx(s["test"]["ner/f1"])
    assert ner.predict(["alice went to rome"])[0]["tags"][0] in ("O", "B-per", "I-per", "B-loc", "I-loc")
    with pytest.raises(PtuneError, match="answers tasks toy, ner"):
        run.predict(["the team won"])
    with pytest.raises(PtuneError, match="not one of them"):
        Run(tmp_path / "run", task="nope")
    # two prompt tables, one per task, and two heads
    names = set(run.model.trainable_state_dict())
    assert {"head.toy.classifier.weight", "head.ner.classifier.weight"} <= names
    assert run.model.adapter.encoder.embedding.shape[0] == 2


def test_multitask_resume_equals_uninterrupted(tiny_model_dir, two_tasks, tmp_path, monkeypatch):
    full = train(cfg(tiny_model_dir, tmp_path / "full", two_tasks, eval_every=3))
    with monkeypatch.context() as m:
        interrupt_after(m, 5)
        with pytest.raises(TrainingInterrupted):
            train(cfg(tiny_model_dir, tmp_path / "part", two_tasks, eval_every=3))
    resumed = train(cfg(tiny_model_dir, tmp_path / "part", two_tasks, eval_every=3, resume=True))
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert resumed["test"] == full["test"]


def test_sampling_weights_and_temperature(tiny_model_dir, two_tasks, tmp_path):
    def pool_counts(task, **kw):
        t = Trainer(cfg(tiny_model_dir, tmp_path / f"r{len(os.listdir(tmp_path))}", task, **kw))
        try:
            return Counter(t.train_ex[i].task for i in t.epoch_pool(0)), t
        finally:
            t.directory.close()

    counts, t = pool_counts(two_tasks)
    assert counts == {0: 36, 1: 18}  # in proportion to the data: every example once
    assert sorted(t.epoch_pool(0)) == list(range(54)) and t.epoch_pool(0) != t.epoch_pool(1)
    weighted = [two_tasks[0], {**two_tasks[1], "weight": 4}]
    counts, _ = pool_counts(weighted)
    assert counts == {0: 18, 1: 36}  # (1*36) : (4*18) = 1 : 2 of 54 draws; ner's 18 examples cycled twice
    counts, _ = pool_counts(two_tasks, task_temperature=1000.0)
    assert counts == {0: 27, 1: 27}  # a high temperature samples the tasks uniformly


def test_multitask_config_refusals(tiny_model_dir, two_tasks, toy_task, tmp_path):
    with pytest.raises(ConfigError, match="ensemble trains K prompts for one task"):
        cfg(tiny_model_dir, tmp_path / "a", two_tasks, ensemble=3)
    with pytest.raises(ConfigError, match="share_prompt shares one prompt"):
        cfg(tiny_model_dir, tmp_path / "a", toy_task["task"], share_prompt=True)
    with pytest.raises(ConfigError, match="num_tasks follows from the run"):
        cfg(tiny_model_dir, tmp_path / "a", two_tasks, method_options={"num_tasks": 2})
    with pytest.raises(ConfigError, match="each task's data files in the task list"):
        cfg(tiny_model_dir, tmp_path / "a", "bbc,wnut", train_file=toy_task["train_file"])
    with pytest.raises(ConfigError, match="ensemble needs a method with prompts"):
        cfg(tiny_model_dir, tmp_path / "a", toy_task["task"], method="lora", method_options={}, ensemble=2)
    with pytest.raises(ConfigError, match="init_task"):
        cfg(tiny_model_dir, tmp_path / "a", toy_task["task"], init_task="x")
    with pytest.raises(ConfigError, match="start apart"):
        train(cfg(tiny_model_dir, tmp_path / "b", toy_task["task"], method="prompt_tuning", ensemble=2,
                  method_options={"num_virtual_tokens": 4, "init": "labels"},
                  **{k: v for k, v in toy_task.items() if k != "task"}))
    assert not (tmp_path / "b").exists()  # refused while setting up: nothing left behind


def test_weight_method_multitask_shares_the_adapter(tiny_model_dir, two_tasks, tmp_path):
    s = train(cfg(tiny_model_dir, tmp_path / "run", two_tasks, method="lora", method_options={"r": 2}, max_steps=3))
    run = Run(tmp_path / "run")
    assert run.model.spec.prompt_index == (0, 0) and s["test"]["mean_score"] >= 0


def test_ensemble_run_reports_members_and_votes(tiny_model_dir, toy_task, tmp_path):
    s = train(cfg(tiny_model_dir, tmp_path / "run", toy_task["task"], ensemble=3, epochs=3,
                  **{k: v for k, v in toy_task.items() if k != "task"}))
    assert s["ensemble"] == 3
    assert {"accuracy", "member_0_accuracy", "member_1_accuracy", "member_2_accuracy"} <= set(s["test"])
    run = Run(tmp_path / "run")
    assert run.evaluate("test") == pytest.approx(s["test"])
    mean = run.predict(["the team won the cup", "bake the bread"])
    vote = run.predict(["the team won the cup", "bake the bread"], vote="majority")
    for m, v in zip(mean, vote):
        assert len(m["members"]) == 3 and m["probabilities"] == v["probabilities"]
        assert v["label"] == Counter(v["members"]).most_common(1)[0][0] or Counter(v["members"]).most_common(2)[0][1] \
            == Counter(v["members"]).most_common(2)[-1][1]
    with pytest.raises(ConfigError, match="vote="):
        run.predict(["x y"], vote="median")


def logits_of(model, task, tokenizer, records):
    enc = make_encoder(model, tokenizer, 32)
    ex = encode_records(task, enc, records)
    batch = make_batch(ex, list(range(len(ex))), enc.placeholder_id, "cpu")
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_warm_start_reproduces_the_source_before_the_first_step(tiny_model_dir, toy_task, two_tasks, tmp_path):
    files = {k: v for k, v in toy_task.items() if k != "task"}
    train(cfg(tiny_model_dir, tmp_path / "src", toy_task["task"], max_steps=4, **files))
    c = cfg(tiny_model_dir, tmp_path / "new", toy_task["task"], init_from=str(tmp_path / "src"), **files)
    tok = load_run_tokenizer(c)
    task, splits = load_task(c, tok)
    fresh = build_model(c, task, tok)
    before = logits_of(fresh, task, tok, splits["test"])
    copied = warm_start(fresh, tmp_path / "src")
    assert copied["heads"] == ["toy"]
    source = Run(tmp_path / "src").model
    want = logits_of(source, task, tok, splits["test"])
    got = logits_of(fresh, task, tok, splits["test"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(before, want)
    # through train(): the run starts where the source ended. Both runs draw the same first batch (same seed,
    # same data), the source from a fresh init and the warm run from the source's 4 trained steps on this data,
    # so the warm run's first loss sits below the source's first loss (a warm start that copied nothing, or the
    # wrong tensors, starts at the source's first loss: the same init)
    s = train(c)
    assert s["steps"] > 0
    (src_step, src_first), (new_step, new_first) = losses(tmp_path / "src")[0], losses(tmp_path / "new")[0]
    assert src_step == new_step == 1
    assert new_first < src_first - 0.01, (src_first, new_first)  # observed: 0.6994 -> 0.6775

    # from one task of a multi-task adapter: that task's table fills every table of the new run
    train(cfg(tiny_model_dir, tmp_path / "mt", two_tasks, max_steps=2))
    fresh = build_model(c, task, tok)
    with pytest.raises(ConfigError, match="pass --init-task NAME"):
        warm_start(fresh, tmp_path / "mt")
    with pytest.raises(ConfigError, match="holds tasks toy, ner"):
        warm_start(fresh, tmp_path / "mt", "nope")
    copied = warm_start(fresh, tmp_path / "mt", "ner")
    assert copied["heads"] == ["toy"]  # the source has a head for this run's task too: it is taken
    mt = Run(tmp_path / "mt").model
    torch.testing.assert_close(fresh.adapter.encoder.embedding[0], mt.adapter.encoder.embedding[1])  # ner's table
    torch.testing.assert_close(fresh.head.classifier.weight, mt.head["toy"].classifier.weight)
    # shapes that do not fit are named
    other = cfg(tiny_model_dir, tmp_path / "x", toy_task["task"], method_options={"num_virtual_tokens": 6}, **files)
    with pytest.raises(AdapterMismatchError, match=r"\(1, 4, 64\) there and \(1, 6, 64\) here"):
        warm_start(build_model(other, task, tok), tmp_path / "src")
    lora = cfg(tiny_model_dir, tmp_path / "y", toy_task["task"], method="lora", method_options={}, **files)
    with pytest.raises(ConfigError, match="is a p_tuning_v2 adapter; this run trains lora"):
        warm_start(build_model(lora, task, tok), tmp_path / "src")


def test_multitask_cli_in_fresh_processes(tiny_model_dir, two_tasks, tmp_path):
    import yaml

    (tmp_path / "mt.yaml").write_text(yaml.safe_dump({
        "model": tiny_model_dir, "task": two_tasks, "method": "p_tuning", "share_prompt": True,
        "method_options": {"num_virtual_tokens": 3, "encoder": "mlp", "encoder_hidden_size": 16},
        "max_steps": 4, "batch_size": 8, "precision": "fp32", "output_dir": str(tmp_path / "run")}))
    # train in one fresh process; eval and predict in another, which rebuilds the run from its files
    # (tests/cli_batch.py: each command through the `ptune` script's main, its own output and exit code)
    [r] = run_batch([["train", "--config", str(tmp_path / "mt.yaml"), "--no-progress"]], workdir=tmp_path)
    r.check()
    assert "best validation mean score" in r.stdout
    evaluate, predict, unnamed = run_batch([
        ["eval", str(tmp_path / "run"), "--split", "test", "--task", "ner"],
        ["predict", str(tmp_path / "run"), "the team won", "--task", "toy", "--json"],
        ["predict", str(tmp_path / "run"), "the team won"]], workdir=tmp_path)
    assert set(json.loads(evaluate.check().stdout)) == {"precision", "recall", "f1", "accuracy"}
    assert json.loads(predict.check().stdout)["label"] in ("sport", "food")
    assert unnamed.rc == 2 and "name one" in unnamed.stderr and "--task NAME" in unnamed.stderr


def test_predict_mixed_adapters_from_the_cli(tiny_model_dir, toy_task, two_tasks, tmp_path, capsys):
    from ptune.cli import main

    files = {k: v for k, v in toy_task.items() if k != "task"}
    train(cfg(tiny_model_dir, tmp_path / "a", toy_task["task"], max_steps=3, **files))
    train(cfg(tiny_model_dir, tmp_path / "b", toy_task["task"], method="prompt_tuning", max_steps=3, **files))
    rows = [{"adapter": "a", "text": "the team won"}, {"adapter": "b", "text": "bake the bread"},
            {"adapter": "a", "text": "simmer the soup"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["predict", "--adapter", f"a={tmp_path / 'a'}", "--adapter", f"b={tmp_path / 'b'}",
                 "--input", str(tmp_path / "mixed.jsonl"), "--json"]) == 0
    got = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for row, result in zip(rows, got):
        alone = Run(tmp_path / row["adapter"]).predict([row["text"]])[0]
        assert result["adapter"] == row["adapter"] and result["label"] == alone["label"]
        assert result["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-5)
    assert main(["predict", "--adapter", f"a={tmp_path / 'a'}", "--input", str(tmp_path / "mixed.jsonl")]) == 2
    assert "unknown adapter 'b'" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "a"), "the team won", "--input", str(tmp_path / "mixed.jsonl")]) == 2
