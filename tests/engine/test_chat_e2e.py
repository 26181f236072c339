"""Each generation data format end to end on a tiny random causal LM whose tokenizer has a chat template,
in fresh processes (train with nothing but --model and --train-file -> eval -> generate; every format's run
is trained in one process and read back in another, tests/cli_batch.py), and the bad
input the formats bring: each refused in one line naming the record or option, exit 2, nothing written."""

from __future__ import annotations

import json
import math

import pytest
from cli_batch import run_batch

from ptune.cli import main

from conftest import tiny_base

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")

PAIRS = [("what is the capital of france", "paris"), ("what is the capital of italy", "rome"),
         ("what is the capital of spain", "madrid"), ("what is the capital of peru", "lima")]
RECORDS = {
    "chat": [{"messages": [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": q},
                           {"role": "assistant", "content": a}]} for q, a in PAIRS],
    "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in PAIRS],
    "alpaca": [{"instruction": "answer the question", "input": q, "output": a} for q, a in PAIRS],
    "chatglm": [{"prompt": q, "response": a, "history": [["hello", "hi"]]} for q, a in PAIRS],
}


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-chat-gpt2")
    tiny_base("gpt2", "causal_lm").save_pretrained(path)
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return str(path)


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def runs(chat_model_dir, tmp_path_factory) -> dict[str, dict]:
    """Each format's run trained in one fresh process, then evaluated and generated from in another that never
    held them (tests/cli_batch.py): format -> its run folder and each command's Result."""
    root = tmp_path_factory.mktemp("chat-runs")
    cases = {fmt: {"run": root / fmt / "run"} for fmt in sorted(RECORDS)}
    train = [["train", "--model", chat_model_dir, "--train-file", write(root / f"{fmt}.jsonl", RECORDS[fmt] * 3),
              "--max-steps", "2", "--batch-size", "4", "--no-progress", "--output-dir", str(case["run"])]
             for fmt, case in cases.items()]
    for case, result in zip(cases.values(), run_batch(train, workdir=root)):
        case["train"] = result
    read = [argv for case in cases.values() for argv in (
        ["eval", str(case["run"]), "--split", "validation"],
        ["generate", str(case["run"]), "what is the capital of chile", "--max-new-tokens", "3"])]
    results = iter(run_batch(read, workdir=root))
    for case in cases.values():
        case["eval"], case["generate"] = next(results), next(results)
    return cases


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_each_format_trains_evaluates_and_generates(runs, fmt):
    case, run = runs[fmt], runs[fmt]["run"]
    done = case["train"].check()
    assert "11 train / 1 validation examples" in done.stdout  # a seeded tenth held out (no --validation-file)
    spec = json.loads((run / "best" / "adapter_config.json").read_text())
    assert spec["task"]["format"] == fmt and spec["task"]["head"] == "causal_lm"
    assert 0 < json.loads((run / "summary.json").read_text())["best_validation_loss"] < 20

    metrics = json.loads(case["eval"].check().stdout)
    assert math.isfinite(metrics["loss"]) and metrics["perplexity"] > 1

    done = case["generate"].check()
    assert len(done.stdout.strip().splitlines()) == 1


def _refused(capsys, args, run) -> str:
    assert main(args + ["--max-steps", "1", "--no-progress", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptune: error: ") and "\n" not in err
    assert not run.exists()  # nothing written
    return err


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 3: the conversation has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "line 3: messages[0] has unknown role 'bot'"),
    ({"instruction": "hi", "output": "x"}, "line 3: a alpaca record in a file of chat records (line 1)"),
])
def test_bad_records_are_refused_naming_the_record(chat_model_dir, tmp_path, capsys, bad, message):
    data = write(tmp_path / "chat.jsonl", RECORDS["chat"][:2] + [bad] + RECORDS["chat"][2:])
    err = _refused(capsys, ["train", "--model", chat_model_dir, "--train-file", data], tmp_path / "run")
    assert f"chat.jsonl {message}" in err


def test_chat_data_on_a_tokenizer_without_a_chat_template(tiny_gpt2_dir, tmp_path, capsys):
    data = write(tmp_path / "chat.jsonl", RECORDS["chat"] * 2)
    err = _refused(capsys, ["train", "--model", tiny_gpt2_dir, "--train-file", data], tmp_path / "run")
    assert "chat records (format chat) are rendered with the tokenizer's chat template" in err and "has none" in err


def test_a_response_longer_than_max_target_length(chat_model_dir, tmp_path, capsys):
    data = write(tmp_path / "chat.jsonl", RECORDS["chat"] * 2)
    err = _refused(capsys, ["train", "--model", chat_model_dir, "--train-file", data, "--max-target-length", "1"],
                   tmp_path / "run")
    assert "longer than max_target_length=1 (--max-target-length)" in err


def test_chat_data_needs_a_causal_lm(tiny_model_dir, tmp_path, capsys):
    data = write(tmp_path / "chat.jsonl", RECORDS["chat"] * 2)
    err = _refused(capsys, ["train", "--model", tiny_model_dir, "--train-file", data], tmp_path / "run")
    assert "holds chat records, which train a causal LM" in err
