"""Causal-LM training on prompt/response data, then `ptune generate` with the trained adapter."""

from __future__ import annotations

import json

from ptune.cli import main


def test_causal_lm_run_then_generate(tiny_gpt2_dir, tmp_path, capsys):
    rows = [{"text": "the capital of france is", "target": "paris"},
            {"text": "the capital of italy is", "target": "rome"}] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text("name: lm\ntask_type: causal_lm\nmax_length: 32\n")
    out = tmp_path / "run"
    args = ["train", "--model", tiny_gpt2_dir, "--task", str(tmp_path / "task.yaml"),
            "--train-file", str(tmp_path / "train.jsonl"), "--validation-file", str(tmp_path / "train.jsonl"),
            "--method", "prefix_tuning", "--num-virtual-tokens", "4", "--max-steps", "2", "--batch-size", "4",
            "--no-progress", "--output-dir", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["best_validation_loss"] < 20  # loss on the targets only, finite
    capsys.readouterr()
    assert main(["generate", str(out), "the capital of france is", "the capital of italy is",
                 "--max-new-tokens", "5"]) == 0
    first = capsys.readouterr().out.strip().splitlines()
    assert len(first) == 2 and all(line.strip() for line in first)
    assert main(["generate", str(out), "the capital of france is", "the capital of italy is",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == first  # greedy: deterministic
    # predict on a causal-LM run answers by generating, as its head kind says (HeadKind.generates)
    from ptune.engine import Run

    run = Run(out)
    got = run.predict(["the capital of france is"])
    assert got == [{"generated": run.generate(["the capital of france is"], max_new_tokens=run.encoder.max_length)[0]}]


def test_plain_text_causal_lm_puts_the_loss_on_every_real_token(tiny_gpt2_dir, tmp_path, tokenizer):
    from ptune.data import Task
    from ptune.engine.build import encode_records
    from ptune.templates import TemplateEncoder

    task = Task(name="lm", head="causal_lm", target_field="")
    enc = TemplateEncoder("[P:2] {text}", tokenizer, max_length=32, causal=True)
    (ex,) = encode_records(task, enc, [{"text": "water boils at one hundred degrees"}])
    ids, labels = ex.encoded.input_ids, ex.encoded.labels
    assert labels[1:3] == [-100, -100]  # the virtual tokens are never targets
    assert [t for t, v in zip(labels, ex.encoded.virtual_index) if v < 0] == [t for t, v in zip(
        ids, ex.encoded.virtual_index) if v < 0]
    rows = [{"text": "water boils at one hundred degrees"}, {"text": "ice melts at zero degrees"}] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text("name: lm\ntask_type: causal_lm\ntarget_field: ''\nmax_length: 32\n")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_gpt2_dir, "--task", str(tmp_path / "task.yaml"),
                 "--train-file", str(tmp_path / "train.jsonl"), "--validation-file", str(tmp_path / "train.jsonl"),
                 "--method", "prompt_tuning", "--num-virtual-tokens", "2", "--max-steps", "2", "--batch-size", "4",
                 "--no-progress", "--output-dir", str(out)]) == 0
    assert 0 < json.loads((out / "summary.json").read_text())["best_validation_loss"] < 20
