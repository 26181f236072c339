"""ptune compare / sweep / ablate / recommend on a tiny model: the report's numbers are the runs' own,
an interrupted study continues without re-running finished runs, plots are real PNGs with a line per
method, and ``num_virtual_tokens=0`` / ``--max-minutes`` do what they say."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_batch import Result
from conftest import FOOD, SPORT

import ptune
from ptune.errors import ConfigError
from ptune.studies import plots, report
from ptune.studies.plan import ablate_plan, compare_plan, parse_seeds, sweep_plan
from ptune.studies.recommend import choose_peft_method, complexity, pick, recommend

PNG = b"\x89PNG\r\n\x1a\n"


def _toy_task(root: Path) -> dict[str, str]:
    """conftest's toy task (two classes, train / validation / test CSVs), written once for the module's studies
    (conftest's ``toy_task`` fixture is per test)."""
    rows = [(t, "sport") for t in SPORT] + [(t, "food") for t in FOOD]
    files = {}
    for split, data in (("train", rows * 3), ("validation", rows), ("test", rows)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(data)
        files[f"{split}_file"] = str(root / f"{split}.csv")
    (root / "task.yaml").write_text("name: toy\ntask_type: classification\nlabels: [sport, food]\n"
                                    "label_words: {sport: sports, food: food}\nmax_length: 32\n")
    return {"task": str(root / "task.yaml"), **files}


def study_commands(commands: list[list[str]], cwd: Path) -> list[Result]:
    """``ptune compare | sweep | ablate`` commands through ``ptune.cli.main`` in this process, each with its own
    stdout, stderr and exit code (as tests/cli_batch.py keeps them). A study's own process only plans, starts
    every run as its own fresh ``ptune train`` process and writes the report from the runs' files: a fresh
    interpreter for it would add ~5 s of imports and nothing else. ``cwd``: the working directory meanwhile."""
    import os

    from ptune.cli import main

    results, before = [], os.getcwd()
    os.chdir(cwd)
    try:
        for argv in commands:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(argv)
                except SystemExit as e:  # argparse errors, as the shell would see them
                    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            results.append(Result(argv, int(rc or 0), out.getvalue(), err.getvalue()))
    finally:
        os.chdir(before)
    return results


def _data_flags(tiny_model_dir, toy_task) -> list[str]:
    return ["--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
            "--validation-file", toy_task["validation_file"], "--test-file", toy_task["test_file"],
            "--epochs", "2", "--batch-size", "8", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_model_dir):
    """The three studies, each trained once for the module (:func:`study_commands`; each study trains every
    run in its own fresh ``ptune train`` process, as always). The tests that read the compare study read a copy
    taken as the command left it (``as_written``): :func:`continued` then interrupts and continues the
    original in place."""
    root = tmp_path_factory.mktemp("studies")
    (root / "data").mkdir()
    data = _data_flags(tiny_model_dir, _toy_task(root / "data"))
    flags = {
        "compare": ["compare", "--methods", "prompt_tuning,lora", "--seeds", "2", "--num-virtual-tokens", "3",
                    "--r", "2", *data, "--output-dir", str(root / "cmp")],
        "sweep": ["sweep", "--method", "p_tuning_v2", "--sweep", "num_virtual_tokens=0,2", *data,
                  "--output-dir", str(root / "sweep")],
        "ablate": ["ablate", "--seeds", "1", "--variants", "no_residual", "--num-virtual-tokens", "3", *data,
                   "--output-dir", str(root / "ablate")],
    }
    results = dict(zip(flags, study_commands(list(flags.values()), root)))
    if (root / "cmp").is_dir():  # (else the compare tests fail on its exit code and stderr)
        shutil.copytree(root / "cmp", root / "cmp-as-written")  # read, never continued (its runs name the original)
    return SimpleNamespace(root=root, flags=flags, results=results, as_written=root / "cmp-as-written")


@pytest.fixture(scope="module")
def continued(studies):
    """The compare study interrupted (one run stopped after its checkpoint, one never started) and the same
    command run again; and, on a copy, the command with a changed setting (what they read, each run trained in
    its own process)."""
    out, flags = studies.root / "cmp", studies.flags["compare"]
    studies.results["compare"].check()
    refused_dir = studies.root / "cmp-changed"
    shutil.copytree(out, refused_dir)
    runs = out / "runs"
    kept = runs / "lora" / "seed-13" / "summary.json"
    seen = {"kept_time": kept.stat().st_mtime_ns, "kept_summary": json.loads(kept.read_text()),
            "results_before_change": (refused_dir / "results.json").read_text()}
    (runs / "prompt_tuning" / "seed-14" / "summary.json").unlink()  # stopped after its checkpoint
    shutil.rmtree(runs / "lora" / "seed-14")  # never started
    changed = [f if f != "2" or flags[k - 1] != "--seeds" else "3" for k, f in enumerate(flags)]
    changed[changed.index("--output-dir") + 1] = str(refused_dir)
    refused, resumed = study_commands([changed, flags], studies.root)
    return SimpleNamespace(out=out, kept=kept, refused=refused, refused_dir=refused_dir, resumed=resumed, **seen)


def test_compare_report_equals_the_runs_summaries(studies, tmp_path, monkeypatch):
    proc = studies.results["compare"].check()
    out = shutil.copytree(studies.as_written, tmp_path / "cmp")  # write_report below rewrites the report
    for name in ("report.md", "report.html", "results.json", "study.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert data["runs_finished"] == data["runs_expected"] == 4 and not data["failed"]
    for row in data["rows"]:
        summaries = [json.loads((out / "runs" / row["variant"] / f"seed-{s}" / "summary.json").read_text())
                     for s in (13, 14)]
        assert {s["method"] for s in summaries} == {row["variant"]}
        val = [s["best_validation_accuracy"] for s in summaries]
        test = [s["test"]["accuracy"] for s in summaries]
        assert row["validation_mean"] == pytest.approx(statistics.fmean(val))
        assert row["validation_std"] == pytest.approx(statistics.stdev(val))
        assert row["test_mean"] == pytest.approx(statistics.fmean(test))
        assert row["trainable"] == summaries[0]["trainable_parameters"]
        assert row["peak_rss_mb"] == pytest.approx(max(s["peak_rss_mb"] for s in summaries))
        adapter = out / "runs" / row["variant"] / "seed-13" / "best"
        assert row["adapter_bytes"] == sum(p.stat().st_size for p in adapter.iterdir())
        assert f"{row['validation_mean']:.4f} ± {row['validation_std']:.4f}" in (out / "report.md").read_text()
        # seconds to 95% of best: the training seconds on the first validation row that reached it, per seed
        to_target = []
        for s, summary in zip((13, 14), summaries):
            rows = [json.loads(x) for x in (out / "runs" / row["variant"] / f"seed-{s}" / "metrics.jsonl").open()]
            val_rows = [r for r in rows if r.get("split") == "validation"]
            first = next(r for r in val_rows if r["accuracy"] >= 0.95 * summary["best_validation_accuracy"])
            to_target.append(first["step_seconds"])
        assert row["seconds_to_95"] == pytest.approx(statistics.fmean(to_target))
        assert f"| {row['seconds_to_95']:.1f} | 2 |" in (out / "report.md").read_text()
    # different methods have different trainable parts: the table does not repeat one run's numbers
    assert len({r["trainable"] for r in data["rows"]}) == 2
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == PNG
        assert "![" in (out / "report.md").read_text() and name in (out / "report.md").read_text()
    assert (out / "report.html").read_text().count("data:image/png;base64,") == len(data["plots"]) == 3
    assert "| prompt_tuning |" in proc.stdout and "report.md" in proc.stdout

    figures = []  # the learning-curve figure: one line per method
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    report.write_report(out)
    labels = [line.get_label() for line in figures[0].axes[0].get_lines()]
    assert labels == ["prompt_tuning", "lora"]


def test_an_interrupted_compare_continues_and_reuses_finished_runs(continued):
    proc, runs, kept = continued.resumed.check(), continued.out / "runs", continued.kept
    assert "prompt_tuning seed 14: resuming from its last checkpoint" in proc.stdout
    assert "lora seed 14: training" in proc.stdout
    assert proc.stdout.count("finished before, reused") == 2
    assert "(4 of 4 runs; 2 trained now, 2 reused)" in proc.stdout
    assert kept.stat().st_mtime_ns == continued.kept_time and json.loads(kept.read_text()) == continued.kept_summary
    assert (runs / "lora" / "seed-14" / "summary.json").is_file()


def test_a_changed_study_is_refused_and_nothing_is_touched(continued):
    proc = continued.refused
    assert proc.rc == 2
    assert "holds a compare study with other settings" in proc.stderr and "seeds" in proc.stderr
    assert (continued.refused_dir / "results.json").read_text() == continued.results_before_change


def test_sweep_over_prompt_length_with_zero_tokens(studies):
    studies.results["sweep"].check()
    out = studies.root / "sweep"
    data = json.loads((out / "results.json").read_text())
    zero, two = data["rows"]
    assert (zero["value"], two["value"]) == (0, 2)
    head = 2 * 32 + 2  # the classification head of the 32-wide tiny BERT, 2 labels: nothing else trains
    assert zero["trainable"] == head and two["trainable"] > head
    spec = json.loads((out / "runs" / "num_virtual_tokens=0" / "seed-13" / "best" / "adapter_config.json").read_text())
    assert "[P" not in json.dumps(spec["template"])
    assert data["plots"] == ["learning_curves.png", "metric_vs_value.png"]
    assert (out / "metric_vs_value.png").read_bytes()[:8] == PNG


def test_ablate_reports_the_drop_from_the_full_model(studies):
    studies.results["ablate"].check()
    out = studies.root / "ablate"
    data = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["full", "no_residual"]
    plan = json.loads((out / "study.json").read_text())
    assert plan["base"]["method_options"]["residual"] is True
    full, ablated = data["rows"]
    drop = full["test_mean"] - ablated["test_mean"]
    assert f"| no_residual | {ablated['validation_mean']:.4f} ± 0.0000 | {ablated['test_mean']:.4f} ± 0.0000 | " \
           f"{drop:+.4f} |" in (out / "report.md").read_text()


def test_recommend_from_a_comparison(studies, tmp_path, tiny_model_dir):
    studies.results["compare"].check()
    out = studies.as_written
    task = json.loads((out / "study.json").read_text())["base"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    expected, _ = pick([{**r, "method": r["variant"]} for r in rows])
    options = {"model": tiny_model_dir, "task": task["task"], "train_file": task["train_file"]}
    rec = recommend(tmp_path / "rec", [str(out)], log=lambda _: None, **options)
    assert rec.method == expected["variant"]
    assert rec.lab_method == "p_tuning"  # 36 training examples: the lab's few-data branch
    assert {e["method"] for e in rec.evidence} == {"prompt_tuning", "lora"}
    text = (tmp_path / "rec" / "recommendation.md").read_text()
    assert f"--method {rec.method}" in text and "lab's decision tree says **p_tuning**" in text
    assert "was not measured" in text  # the tree's choice was not among the measured methods


def test_pick_breaks_ties_by_trainable_share():
    rows = [{"method": "full", "test_mean": 0.90, "test_std": 0.02, "trainable_percent": 100.0, "train_seconds": 9},
            {"method": "lora", "test_mean": 0.89, "test_std": 0.01, "trainable_percent": 0.3, "train_seconds": 5},
            {"method": "bitfit", "test_mean": 0.80, "test_std": 0.0, "trainable_percent": 0.1, "train_seconds": 4}]
    chosen, tied = pick(rows)
    assert chosen["method"] == "lora" and [r["method"] for r in tied] == ["full", "lora"]
    rows[0]["test_std"] = 0.0
    assert pick(rows)[0]["method"] == "full"  # 0.01 behind is more than the 0.005 margin


def test_the_labs_tree_and_complexity():
    assert choose_peft_method("tagging", 22_000_000, 2000)[0] == "p_tuning_v2"
    assert choose_peft_method("classification", 11_000_000_000, 2000)[0] == "prompt_tuning"
    assert choose_peft_method("classification", 22_000_000, 500)[0] == "p_tuning"
    assert choose_peft_method("classification", 22_000_000, 2000)[0] == "p_tuning_v2"
    assert choose_peft_method("causal_lm", 270_000_000, 2000)[0] == "lora"
    assert [complexity("classification", 2), complexity("classification", 5), complexity("tagging", 9)] == \
        ["simple", "medium", "complex"]


@pytest.mark.parametrize("head", ["causal_lm", "seq2seq"])
def test_generation_tasks_get_the_generation_advice(head):
    """A head that writes its answers (capability ``generates``) gets the generation branch at every model and
    data size, not the NLU advice its name alone used to miss."""
    for model_size, data_size in ((22_000_000, 500), (220_000_000, 200_000), (11_000_000_000, 2000)):
        method, reason = choose_peft_method(head, model_size, data_size)
        assert (method, reason.split(":")[0]) == ("lora", "generation"), (head, model_size, data_size)
    assert complexity(head, 0) == "complex"


def test_the_labs_tree_reads_head_capabilities():
    from ptune.heads import HEAD_KINDS

    assert choose_peft_method("span_qa", 22_000_000, 500)[0] == "p_tuning_v2"  # a span, not one label
    assert choose_peft_method("verbalizer", 22_000_000, 500)[0] == "p_tuning"  # one label, like classification
    assert choose_peft_method(HEAD_KINDS["tagging"], 22_000_000, 500)[0] == "p_tuning_v2"  # a HeadKind itself
    assert complexity("multiple_choice_lm", 4) == complexity("span_qa", 0) == "complex"
    with pytest.raises(ConfigError, match="head kind 'generation'"):  # task types that are no head kind
        choose_peft_method("generation", 22_000_000, 500)


def test_plans_refuse_bad_input():
    assert parse_seeds(3, 13) == (13, 14, 15) and parse_seeds("1,7", 13) == (1, 7)
    for bad in (0, "1,1", "a"):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad, 13)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        compare_plan("lora,nope", (1,), {})
    with pytest.raises(ConfigError, match="no method in --methods has this option"):
        compare_plan("lora,bitfit", (1,), {"method_options": {"encoder": "mlp"}})
    with pytest.raises(ConfigError, match="option=v1,v2"):
        sweep_plan("num_virtual_tokens", (1,), {})
    with pytest.raises(ConfigError, match="neither a training option nor an option of method lora"):
        sweep_plan("encoder=none,mlp", (1,), {"method": "lora"})
    with pytest.raises(ConfigError, match="no prompt encoder"):
        ablate_plan((1,), {"method": "lora"})
    with pytest.raises(ConfigError, match="unknown ablation"):
        ablate_plan((1,), {}, "no_head")
    plan = compare_plan("p_tuning,lora", (1,), {"method_options": {"num_virtual_tokens": 4}})
    assert [v.method_options for v in plan.variants] == [{"num_virtual_tokens": 4}, {}]
    plan = compare_plan("p_tuning,lora:lr=5e-3:r=16", (1,), {})  # a method's own settings after colons
    assert [(v.name, v.options, v.method_options) for v in plan.variants] == [
        ("p_tuning", {"method": "p_tuning"}, {}), ("lora:lr=5e-3:r=16", {"method": "lora", "lr": 5e-3}, {"r": 16})]
    with pytest.raises(ConfigError, match="neither a training option nor an option of lora"):
        compare_plan("lora:encoder=mlp", (1,), {})
    with pytest.raises(ConfigError, match="METHOD:option=value"):
        compare_plan("lora:lr", (1,), {})


@pytest.mark.parametrize("config", [ptune.PromptTuningConfig(num_virtual_tokens=0),
                                    ptune.PTuningConfig(num_virtual_tokens=0),
                                    ptune.PTuningV2Config(num_virtual_tokens=0),
                                    ptune.PrefixTuningConfig(num_virtual_tokens=0)], ids=lambda c: c.method)
def test_zero_virtual_tokens_is_the_frozen_base_and_head(config, tokenizer):
    from conftest import tiny_base

    model = ptune.apply(tiny_base("bert"), config, head=ptune.HeadConfig("classification", num_labels=3),
                        tokenizer=tokenizer).eval()
    assert model.trainable_parameters()[0] == 32 * 3 + 3
    assert model.spec.template.num_virtual_tokens == 0
    enc = ptune.TemplateEncoder(model.template, tokenizer, max_length=16)
    batch = ptune.batching.collate([enc.encode({"text": "a goal"})], pad_id=tokenizer.pad_token_id)
    with model.disable_adapter():
        plain = model(**batch).logits
    assert (model(**batch).logits == plain).all()
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=0 means no virtual tokens|must not contain \[P\] markers"):
        ptune.apply(tiny_base("bert"), config, head=ptune.HeadConfig("classification", num_labels=3),
                    template="[P:2] {text}", tokenizer=tokenizer)


def test_max_minutes_stops_the_run_and_still_evaluates(tmp_path, tiny_model_dir, toy_task):
    from ptune.engine import TrainConfig, train

    cfg = TrainConfig(model=tiny_model_dir, task=toy_task["task"], train_file=toy_task["train_file"],
                      validation_file=toy_task["validation_file"], test_file=toy_task["test_file"],
                      method="lora", epochs=50, batch_size=4, max_minutes=1e-6, progress=False,
                      output_dir=str(tmp_path / "run"))
    summary = train(cfg)
    assert summary["steps"] == 1 and summary["best_step"] == 1
    assert summary["stopped"].startswith("time budget") and summary["test"] is not None
