"""--report-to: what the trackers wrote, read back with each tracker's own reader.

One tiny run reports to TensorBoard, MLflow and (when it is installed) W&B in offline mode: it trains one epoch,
then is resumed for a second, so every check also sees the two sessions land in the same tracker run. The
numbers are held to metrics.jsonl's, which the trackers mirror.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
from pathlib import Path

import pytest

from conftest import FOOD, SPORT
from ptune.cli import main
from ptune.engine import TrainConfig, train
from ptune.engine.tracking import TRACKERS, parse_tags, trackers_to_start, tracked_values
from ptune.errors import ConfigError

WANDB = importlib.util.find_spec("wandb") is not None
pytest.importorskip("tensorboard", reason="the tracking tests read TensorBoard files: ./install.sh test")
pytest.importorskip("mlflow", reason="the tracking tests read an MLflow store: ./install.sh test")


def toy_files(folder: Path) -> dict[str, str]:
    rows = [(t, "sport") for t in SPORT] + [(t, "food") for t in FOOD]
    out = {}
    for split, data in (("train", rows * 3), ("validation", rows), ("test", rows)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(data)
        out[f"{split}_file"] = str(folder / f"{split}.csv")
    (folder / "task.yaml").write_text("name: toy\ntask_type: classification\nlabels: [sport, food]\n"
                                      "label_words: {sport: sports, food: food}\nmax_length: 32\n")
    return {"task": str(folder / "task.yaml"), **out}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir):
    """A run reporting to every tracker installed: one epoch (5 steps), then resumed for a second (steps 6-10)."""
    folder = tmp_path_factory.mktemp("tracked")
    trackers = "tensorboard,mlflow" + (",wandb" if WANDB else "")
    options = dict(model=tiny_model_dir, method="p_tuning_v2", method_options={"num_virtual_tokens": 4},
                   batch_size=8, lr=5e-3, eval_every=2, log_every=1, progress=False, precision="fp32",
                   output_dir=str(folder / "run"), report_to=trackers, tracking_tags="study=tiny,variant=v2",
                   **toy_files(folder))
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        train(TrainConfig(epochs=1, **options))
        summary = train(TrainConfig(epochs=2, resume=True, **options))
    run = folder / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"run": run, "rows": rows, "summary": summary, "ids": json.loads((run / "tracking" / "ids.json").read_text())}


def jsonl(rows: list[dict], split: str | None, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]


def same_series(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float = 1e-12) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


def test_metrics_jsonl_is_what_the_trackers_mirror(tracked):
    rows = tracked["rows"]
    assert [s for s, _ in jsonl(rows, None, "loss")] == list(range(1, 11))  # both sessions, every step
    assert [s for s, _ in jsonl(rows, "validation", "accuracy")] == [2, 4, 6, 8, 10]
    assert [s for s, _ in jsonl(rows, "test", "accuracy")] == [5, 10]  # each session ends with a test
    assert all(r["samples_per_second"] > 0 for r in rows if r.get("split") is None)


def test_tensorboard_holds_every_step_and_the_hyperparameters(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder = tracked["run"] / "tracking" / tracked["ids"]["tensorboard"]
    events = EventAccumulator(str(folder))
    events.Reload()  # both sessions' event files

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    rows = tracked["rows"]
    for tag, split, key in (("train/loss", None, "loss"), ("train/lr", None, "lr"),
                            ("validation/accuracy", "validation", "accuracy"), ("validation/macro_f1", "validation",
                                                                                 "macro_f1"),
                            ("test/accuracy", "test", "accuracy")):
        same_series(scalars(tag), jsonl(rows, split, key), rel=1e-6)  # float32 in the file
    assert [s for s, _ in scalars("train/samples_per_second")] == list(range(1, 11))
    (hparams_dir,) = [p for p in folder.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*"))]
    written = EventAccumulator(str(hparams_dir))
    written.Reload()
    content = written.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(5e-3)
    assert hparams["method_options.num_virtual_tokens"].number_value == 4
    assert hparams["spec.method"].string_value == "p_tuning_v2"  # the resolved spec
    assert hparams["spec.head.kind"].string_value == "classification"
    assert hparams["trainable_parameters"].number_value == tracked["summary"]["trainable_parameters"]
    assert hparams["tag.study"].string_value == "tiny" and hparams["tag.variant"].string_value == "v2"


def test_mlflow_keeps_one_run_across_the_resume(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked['run'] / 'tracking' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "ptune"]
    (run,) = client.search_runs([experiment.experiment_id])  # the resumed session went on in the same run
    assert run.info.run_id == tracked["ids"]["mlflow"] and run.info.status == "FINISHED"
    assert run.info.run_name == str(tracked["run"])
    assert run.data.tags["study"] == "tiny" and run.data.tags["variant"] == "v2"
    params = run.data.params
    assert params["lr"] == "0.005" and params["method"] == "p_tuning_v2" and params["spec.method"] == "p_tuning_v2"
    assert params["epochs"] == "1"  # the hyperparameters the run started with; the resume is in config.json's history
    rows = tracked["rows"]
    for metric, split, key in (("train/loss", None, "loss"), ("validation/accuracy", "validation", "accuracy"),
                               ("test/macro_f1", "test", "macro_f1")):
        same_series(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)),
                    jsonl(rows, split, key))
    assert len(client.get_metric_history(run.info.run_id, "train/samples_per_second")) == 10


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, part, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records


@pytest.mark.skipif(not WANDB, reason="wandb is not installed (./install.sh track)")
def test_wandb_offline_run_files_hold_both_sessions(tracked):
    folders = sorted((tracked["run"] / "tracking" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # one per session, the same run id: `wandb sync` uploads them as one run
    history: dict[int, dict] = {}
    config, run_ids, tags = {}, set(), set()
    for folder in folders:
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(int(items["_step"]), {}).update(items)
            elif kind == "config":
                config.update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in record.config.update})
            elif kind == "run":
                run_ids.add(record.run.run_id)
                tags.update(record.run.tags)
    assert run_ids == {tracked["ids"]["wandb"]}
    assert {"study=tiny", "variant=v2"} <= tags
    assert config["lr"] == 5e-3 and config["spec.method"] == "p_tuning_v2"
    rows = tracked["rows"]
    same_series([(s, history[s]["train/loss"]) for s in sorted(history)], jsonl(rows, None, "loss"))
    same_series([(s, h["validation/accuracy"]) for s, h in sorted(history.items()) if "validation/accuracy" in h],
                jsonl(rows, "validation", "accuracy"))


def test_tracker_names_per_task_metrics_and_tags():
    """Multi-task rows keep each task's metric apart; bad values are refused with the fix."""
    row = {"step": 4, "epoch": 1, "split": "validation", "bbc/accuracy": 0.5, "wnut/f1": 0.25, "mean_score": 0.375}
    assert tracked_values(row) == {"validation/bbc/accuracy": 0.5, "validation/wnut/f1": 0.25,
                                   "validation/mean_score": 0.375}
    assert tracked_values({"step": 1, "epoch": 0, "loss": 0.7, "lr": 1e-3}) == {
        "train/epoch": 0, "train/loss": 0.7, "train/lr": 1e-3}
    assert parse_tags("study=sweep,variant=lr=0.001") == {"study": "sweep", "variant": "lr=0.001"}
    for bad in ({"report_to": "tensorbord"}, {"report_to": "none,mlflow"}, {"report_to": "all,wandb"},
                {"tracking_tags": "study"}, {"tracking_project": " "}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)
    assert TrainConfig().report_to == "none" and trackers_to_start("none") == ()
    assert trackers_to_start("MLflow, tensorboard") == ("mlflow", "tensorboard")


def test_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert trackers_to_start("all") == tuple(n for n in TRACKERS if n != "wandb")  # all: those installed
    assert main(["train", "--report-to", "wandb", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ptune: error: --report-to wandb needs wandb, not installed; ./install.sh track (or pip install " \
                  "'ptune[track]')", err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_study_runs_are_tagged_with_study_and_variant(tmp_path):
    from ptune.studies.plan import Study, Variant
    from ptune.studies.runner import tracked as study_tracked, tracking_env

    study = Study("sweep", {"report_to": "mlflow", "tracking_tags": "team=nlp"}, (Variant("lr=0.001", {"lr": 1e-3}),),
                  (13,), swept="lr")
    variant = study.variants[0]
    options = study_tracked(study.run_options(tmp_path / "lr", variant, 13), study, tmp_path / "lr", variant, 13)
    assert parse_tags(options["tracking_tags"]) == {"team": "nlp", "study": "lr", "study_kind": "sweep",
                                                    "variant": "lr=0.001", "seed": "13"}
    assert options["tracking_project"] == "lr"
    TrainConfig.from_dict(options)  # what the run is started with
    assert tracking_env(options, tmp_path / "lr")["MLFLOW_TRACKING_URI"].endswith("lr/tracking/mlflow.db")
    quiet = Study("sweep", {}, study.variants, (13,))
    assert "tracking_tags" not in study_tracked(quiet.run_options(tmp_path, variant, 13), quiet, tmp_path, variant, 13)


def test_readme_tracking_command_parses_to_these_options():
    """The README's --report-to line is the set-up the module's run uses (that block is not run itself)."""
    from ptune.cli import build_parser
    from ptune.options import train_values

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("ptune train --report-to"))
    args = build_parser().parse_args(line.split()[1:])
    values = train_values(args)
    assert values["report_to"] == "tensorboard,mlflow" and values["tracking_tags"] == "team=nlp"
    cfg = TrainConfig.from_dict(values)
    assert trackers_to_start(cfg.report_to) == ("tensorboard", "mlflow")
