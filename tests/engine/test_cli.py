"""The ptune command: a full train -> predict -> eval round, and one-line errors for user mistakes."""

from __future__ import annotations

import json

import pytest
from cli_batch import run_batch

from ptune.cli import main


def test_train_predict_eval(tiny_model_dir, toy_task, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
            "--validation-file", toy_task["validation_file"], "--test-file", toy_task["test_file"],
            "--method", "p_tuning", "--template", "[P:2] {text} [P:1]", "--encoder", "mlp", "--epochs", "1",
            "--batch-size", "8", "--no-progress", "--output-dir", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "trainable" in text and f"adapter: {out / 'best'}" in text
    saved = json.loads((out / "config.json").read_text())
    assert saved["method_options"] == {"encoder": "mlp"} and saved["template"] == "[P:2] {text} [P:1]"
    assert main(["predict", str(out), "the team won the match", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["label"] in ("sport", "food")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert main(["eval", str(out), "--split", "test"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(capsys.readouterr().out) == pytest.approx(summary["test"])  # the run's own test numbers


USER_ERRORS = [
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--batch-size", "0"], "batch_size=0 is invalid"),
    (["train", "--model", "/no/such/model", "--max-steps", "1"], "/no/such/model"),
    (["train", "--task", "/no/such/task.yaml"], "does not exist"),
    (["predict", "/no/such/run", "hello"], "is not a finished ptune run"),
]


@pytest.fixture(scope="module")
def user_error_results(tmp_path_factory):
    """The user mistakes' commands as a shell runs them (main(), its exit code and stderr), in one fresh process
    (tests/cli_batch.py); a fresh process's own start-up output is checked by test_damaged_files'
    test_predict_in_a_fresh_process_prints_no_traceback."""
    return run_batch([args for args, _ in USER_ERRORS], workdir=tmp_path_factory.mktemp("user-errors"))


@pytest.mark.parametrize("args, message", USER_ERRORS)
def test_user_errors_are_one_line(args, message, user_error_results):
    proc = user_error_results[USER_ERRORS.index((args, message))]
    assert proc.argv == args
    assert proc.rc == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_input_via_cli_is_one_line_and_loses_nothing(tiny_model_dir, toy_task, tmp_path, capsys):
    """Each user mistake: exit 2, one line naming the problem, no traceback, existing run untouched."""
    run = tmp_path / "run"
    base = ["train", "--model", tiny_model_dir, "--task", toy_task["task"], "--validation-file",
            toy_task["validation_file"], "--max-steps", "1", "--no-progress"]
    assert main([*base, "--train-file", toy_task["train_file"], "--output-dir", str(run)]) == 0
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text,label\ngood,sport\nbad,food,extra\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text,label\ncaf\xe9,food\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("text,label\nhello,weather\n")
    blank = tmp_path / "blank.csv"
    blank.write_text('text,label\n"  ",food\n')
    cases = [
        (["--train-file", toy_task["train_file"], "--output-dir", str(run)], "already holds a run"),
        (["--train-file", str(bad_csv), "--output-dir", str(tmp_path / "o1")], "bad.csv line 3: expected 2 fields"),
        (["--train-file", str(latin), "--output-dir", str(tmp_path / "o2")], "latin.csv line 2: bytes at offset"),
        (["--train-file", str(empty), "--output-dir", str(tmp_path / "o3")], "empty.jsonl: no records"),
        (["--train-file", str(unknown), "--output-dir", str(tmp_path / "o4")], "unknown label 'weather'"),
        (["--train-file", str(blank), "--output-dir", str(tmp_path / "o5")], "text field 'text' is empty"),
        (["--train-file", toy_task["train_file"], "--method", "prompt_tuning", "--num-virtual-tokens", "-1"],
         "num_virtual_tokens=-1 must be a whole number >= 0"),
        (["--train-file", toy_task["train_file"], "--method", "p_tuning", "--template", "[P:3] about"],
         "has no input field"),
        (["--train-file", toy_task["train_file"], "--method", "p_tuning", "--template", "[P:3] {text"],
         "is never closed"),
        (["--train-file", toy_task["train_file"], "--lr", "-1"], "lr=-1 is invalid"),
    ]
    capsys.readouterr()
    for extra, message in cases:  # in-process: the same main() the console script runs
        code = main([*base, *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err[-500:])
        assert message in err, (message, err)
        assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot


def test_method_options_mean_one_thing(capsys):
    """Each method option flag has one meaning: the dropouts of the prompt encoder, of the deep prompts and of
    LoRA's branch are three flags, each in the groups of the methods it applies to; an option a method lacks is
    refused."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dropout " not in text
    p_tuning = text.split("--method p_tuning options:")[1].split("--method p_tuning_v2 options:")[0]
    assert ("--encoder-dropout NUMBER dropout on the prompt encoder's input, between its LSTM layers and between its "
            "MLP layers (after each ReLU); training only (default 0.0)") in p_tuning
    for method in ("p_tuning_v2", "prefix_tuning"):
        assert "--prefix-dropout NUMBER on the prefix keys/values" in text.split(f"--method {method} options:")[1]
    assert "--prefix-dropout" not in p_tuning and "--lora-dropout" not in p_tuning
    with pytest.raises(SystemExit):
        main(["train", "--method", "lora", "--dropout", "0.1"])
    assert main(["train", "--method", "lora", "--encoder-dropout", "0.1", "--max-steps", "1"]) == 2
    assert "lora: unknown option(s) ['encoder_dropout']" in capsys.readouterr().err


def test_every_option_has_help_from_its_field_docstring():
    """--help is generated from the config fields' docstrings: a new option without a description fails here."""
    import dataclasses

    from ptune.engine.config import TrainConfig
    from ptune.methods import METHODS
    from ptune.options import field_docs

    for cls in [TrainConfig] + [c for c, _ in METHODS.values()]:
        docs = field_docs(cls)
        assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)] == [], cls.__name__


def test_yaml_config_reads_exponent_floats_as_numbers(tmp_path):
    """``lr: 5e-4`` is how people write a learning rate; PyYAML alone reads it as the string '5e-4' (YAML 1.1)."""
    from ptune.engine import TrainConfig
    from ptune.yamlfile import load_yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 5e-4\nweight_decay: 1E-2\nwarmup_ratio: .1\nmethod: lora\nmethod_options: {lora_dropout: 5e-2}\n")
    c = TrainConfig.from_yaml(cfg)
    assert (c.lr, c.weight_decay, c.warmup_ratio, c.method_options["lora_dropout"]) == (5e-4, 1e-2, 0.1, 5e-2)
    assert load_yaml("[1e3, 3, '5e-4', 1_000, true, top:3, 1.5, -2e-5]") == [1000.0, 3, "5e-4", 1000, True, "top:3",
                                                                         1.5, -2e-05]
