"""The multiple-choice head: one score per (question, choice) row, softmax over a record's choices.

On a tiny random BERT: a record scores the same alone as in a batch with records of more choices
(padded choice slots are -inf and change nothing); gradients reach only trainable tensors; a run
trains, evaluates and predicts end to end from a JSONL file; bad records fail in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import liven, tiny_base, train_steps

import ptune
from ptune.batching import collate
from ptune.data import Task, load_records
from ptune.errors import ConfigError, DataError

RECORDS = [
    {"question": "the capital of france is", "choices": ["paris", "rome"], "label": 0},
    {"question": "water boils at", "choices": ["one hundred degrees", "zero", "minus forty", "ten"], "label": "zero"},
    {"question": "a cat says", "choices": ["meow", "woof", "moo"], "label": 2},
]


def mc_task(**kw) -> Task:
    return Task(name="mc", head="multiple_choice", text_fields=("question",), **kw)


def build(tokenizer, config=None, template="{question} {choice}"):
    torch.manual_seed(0)
    task = mc_task()
    model = ptune.apply(liven(tiny_base("bert")), config or ptune.PTuningConfig(num_virtual_tokens=2),
                        head=ptune.HeadConfig("multiple_choice", dropout=0.0), tokenizer=tokenizer,
                        template=template, task=task)
    enc = ptune.TemplateEncoder(model.template, tokenizer)
    examples = []
    for i, r in enumerate(RECORDS):
        rec = dict(r)
        task.validate_record(rec, f"record {i}")
        examples.append(task.kind.encode(task, enc, rec, True))
    return model.eval(), task, examples


def batch_of(examples):
    return collate([e.encoded for e in examples], pad_id=0, targets=[e.target for e in examples])


def test_padding_invariance(tokenizer):
    model, _, examples = build(tokenizer)
    batch = batch_of(examples)
    assert batch["input_ids"].shape[0] == 2 + 4 + 3  # only real choices reach the body
    assert batch["choice_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    with torch.no_grad():
        together = model(**batch).logits
        assert together.shape == (3, 4)
        for j, ex in enumerate(examples):
            alone = model(**batch_of([ex])).logits
            n = len(ex.record["choices"])
            assert alone.shape == (1, n)
            torch.testing.assert_close(alone[0], together[j, :n], atol=1e-5, rtol=1e-4)
            assert torch.isinf(together[j, n:]).all() and (together[j, n:] < 0).all()
        # the same record twice with other records in another order: same scores
        again = model(**batch_of([examples[2], examples[0]])).logits
        torch.testing.assert_close(again[1, :2], together[0, :2], atol=1e-5, rtol=1e-4)
        # probabilities over real choices sum to one; padded slots get exactly zero
        probs = together.softmax(-1)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))
        assert probs[0, 2:].eq(0).all()


def test_loss_and_gradients_reach_only_trainable_parameters(tokenizer):
    model, _, examples = build(tokenizer)
    batch = batch_of(examples)
    model.train()
    out = model(**batch)
    want = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])
    assert torch.isfinite(out.loss) and float(out.loss.detach()) == pytest.approx(float(want.detach()))
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and grads <= trainable
    assert any(n.startswith("head.") for n in grads) and any(n.startswith("adapter.") for n in grads)
    assert all(p.grad is None for p in model.base.parameters())
    losses = train_steps(model, batch, steps=8, lr=5e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("config", [ptune.PromptTuningConfig(num_virtual_tokens=2), ptune.LoraConfig(r=2),
                                    ptune.PTuningV2Config(num_virtual_tokens=2)], ids=lambda c: c.method)
def test_every_method_sees_plain_rows(tokenizer, config):
    model, _, examples = build(tokenizer, config)
    with torch.no_grad():
        together = model(**batch_of(examples)).logits
        alone = model(**batch_of(examples[1:2])).logits
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("record, match", [
    ({"question": "q", "choices": ["a", "b"], "label": "c"}, "'c' is not among the choices"),
    ({"question": "q", "choices": ["a", "b"], "label": 2}, "label 2 is not an index of its 2 choices"),
    ({"question": "q", "choices": [], "label": 0}, "must be a list of at least two choices"),
    ({"question": "q", "choices": "a b", "label": 0}, "must be a list of at least two choices"),
    ({"question": "q", "choices": ["a", ""], "label": 0}, "every choice must be non-empty text"),
    ({"question": "q", "choices": ["a", "a"], "label": 0}, "duplicate choices"),
    ({"choices": ["a", "b"], "label": 0}, "missing text field 'question'"),
    ({"question": "q", "choices": ["a", "b"]}, "missing label field 'label'"),
])
def test_bad_records_fail_in_one_line(tmp_path, record, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_records(path, task=mc_task())
    assert "line 2" in str(e.value) and "\n" not in str(e.value)


def test_question_field_hint(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(DataError, match=r"text_fields: \[question\]"):
        load_records(path, task=Task(name="mc", head="multiple_choice"))  # text_fields left at its default


def test_template_and_config_are_checked(tokenizer):
    with pytest.raises(ConfigError, match=r"needs a \{choice\} field"):
        build(tokenizer, template="{question}")
    with pytest.raises(ConfigError, match="one output"):
        ptune.HeadConfig("multiple_choice", num_labels=3)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_engine_train_eval_predict(tiny_model_dir, tmp_path):
    from ptune.engine import Run, TrainConfig, train

    task_file = tmp_path / "mc.yaml"
    task_file.write_text("name: mc\nhead: multiple_choice\ntext_fields: [question]\nmax_length: 32\n")
    data = [dict(r) for r in RECORDS] * 2
    cfg = TrainConfig(model=tiny_model_dir, task=str(task_file), train_file=write_jsonl(tmp_path / "train.jsonl", data),
                      validation_file=write_jsonl(tmp_path / "val.jsonl", RECORDS),
                      test_file=write_jsonl(tmp_path / "test.jsonl", RECORDS), method="p_tuning",
                      method_options={"num_virtual_tokens": 2}, max_steps=2, batch_size=4, eval_every=2,
                      progress=False, precision="fp32", output_dir=str(tmp_path / "run"))
    summary = train(cfg)
    assert summary["steps"] == 2
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    run = Run(tmp_path / "run")
    assert run.evaluate("test") == pytest.approx(summary["test"])  # reloaded adapter scores the same
    preds = run.predict([{"question": "a dog says", "choices": ["woof", "meow", "quack"]},
                         {"question": "q", "choices": ["x", "y"]}])
    assert preds[0]["label"] in ("woof", "meow", "quack") and preds[0]["label"] == ["woof", "meow", "quack"][preds[0]["index"]]
    assert list(preds[0]["probabilities"]) == ["woof", "meow", "quack"]
    assert sum(preds[0]["probabilities"].values()) == pytest.approx(1.0)
    assert max(preds[0]["probabilities"], key=preds[0]["probabilities"].get) == preds[0]["label"]
    assert len(preds[1]["probabilities"]) == 2
    with pytest.raises(DataError, match="not plain text"):
        run.predict(["just a text"])


def test_ensemble_and_multitask_are_refused(tiny_model_dir, tokenizer, tmp_path):
    from ptune.engine import TrainConfig, train
    from ptune.multitask import TaskPart, apply_multitask

    task_file = tmp_path / "mc.yaml"
    task_file.write_text("name: mc\nhead: multiple_choice\ntext_fields: [question]\n")
    data = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    cfg = TrainConfig(model=tiny_model_dir, task=str(task_file), train_file=data, validation_file=data,
                      method="prompt_tuning", ensemble=2, max_steps=1, progress=False, output_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="without --ensemble"):
        train(cfg)
    parts = [TaskPart(mc_task(), ptune.HeadConfig("multiple_choice"), "{question} {choice}"),
             TaskPart(Task(name="c", labels=("a", "b")), ptune.HeadConfig("classification", num_labels=2))]
    with pytest.raises(ConfigError, match="task of its own"):
        apply_multitask(tiny_base("bert"), ptune.PromptTuningConfig(num_virtual_tokens=2, num_tasks=2), parts,
                        tokenizer=tokenizer)


# --- multiple_choice_lm: a causal LM's own log-probability of each choice's tokens (no new weights)

def lm_model(tokenizer, config=None, pooling="auto"):
    from ptune.methods.manual import ManualConfig

    torch.manual_seed(0)
    task = Task(name="mc", head="multiple_choice_lm", text_fields=("question",))
    base = liven(tiny_base("gpt2", "causal_lm"))
    model = ptune.apply(base, config or ManualConfig(), head=ptune.HeadConfig("multiple_choice_lm", pooling=pooling),
                        tokenizer=tokenizer, template="{question} {choice}", task=task)
    enc = ptune.TemplateEncoder(model.template, tokenizer, causal=True)
    examples = []
    for r in RECORDS:
        rec = dict(r)
        task.validate_record(rec, "record")
        examples.append(task.kind.encode(task, enc, rec, True))
    return model.eval(), examples


def test_lm_scores_are_the_choice_log_probabilities(tokenizer):
    model, examples = lm_model(tokenizer)
    with torch.no_grad():
        got = model(**batch_of(examples)).logits
        rec = examples[1].record
        for c, choice in enumerate(rec["choices"]):  # by hand: [CLS] question, then the choice's tokens
            prompt = tokenizer(rec["question"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[tokenizer.cls_token_id, *prompt, *answer]])
            logp = model.base(input_ids=ids).logits[0].log_softmax(-1)
            start = 1 + len(prompt)
            want = sum(float(logp[start + i - 1, t]) for i, t in enumerate(answer))
            assert float(got[1, c]) == pytest.approx(want, abs=1e-4)
    mean_model, _ = lm_model(tokenizer, pooling="mean")
    with torch.no_grad():
        mean = mean_model(**batch_of(examples)).logits
    n = len(tokenizer(" " + rec["choices"][2], add_special_tokens=False)["input_ids"])
    assert n > 1 and float(mean[1, 2]) == pytest.approx(float(got[1, 2]) / n, abs=1e-5)


def test_lm_scoring_padding_invariance_and_training(tokenizer):
    model, examples = lm_model(tokenizer, ptune.PromptTuningConfig(num_virtual_tokens=2))
    batch = batch_of(examples)
    assert "choice_tokens" in batch and batch["labels"].tolist() == [0, 1, 2]
    with torch.no_grad():
        together = model(**batch).logits
        for j, ex in enumerate(examples):
            n = len(ex.record["choices"])
            torch.testing.assert_close(model(**batch_of([ex])).logits[0], together[j, :n], atol=1e-5, rtol=1e-4)
    losses = train_steps(model, batch, steps=6, lr=5e-2)
    assert losses[-1] < losses[0]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("adapter.") for n in trainable)  # the head adds no weights


def test_lm_scoring_refuses_encoders_and_misplaced_choice(tokenizer):
    from ptune.methods.manual import ManualConfig

    with pytest.raises(ConfigError, match="use the multiple_choice head"):
        ptune.apply(tiny_base("bert", "masked_lm"), ManualConfig(), head=ptune.HeadConfig("multiple_choice_lm"),
                    tokenizer=tokenizer, template="{question} {choice}")
    with pytest.raises(ConfigError, match=r"must end with its one \{choice\}"):
        ptune.apply(tiny_base("gpt2", "causal_lm"), ManualConfig(), head=ptune.HeadConfig("multiple_choice_lm"),
                    tokenizer=tokenizer, template="{choice} is {question}")


def test_zero_shot_on_a_multiple_choice_task_scores_with_the_lm(tokenizer, tmp_path):
    from ptune.engine import Run, TrainConfig

    model_dir = tmp_path / "tiny-gpt2"
    liven(tiny_base("gpt2", "causal_lm")).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    task_file = tmp_path / "mc.yaml"
    task_file.write_text("name: mc\nhead: multiple_choice\ntext_fields: [question]\n")
    run = Run.zero_shot(TrainConfig(model=str(model_dir), task=str(task_file), progress=False,
                                    test_file=write_jsonl(tmp_path / "test.jsonl", RECORDS)))
    assert run.model.head_config.kind == "multiple_choice_lm"
    metrics = run.evaluate("test")
    preds = run.predict([{k: v for k, v in r.items() if k != "label"} for r in RECORDS])
    gold = ["paris", "zero", "moo"]
    assert metrics["accuracy"] == pytest.approx(sum(p["label"] == g for p, g in zip(preds, gold)) / 3)
    assert preds[1]["label"] in RECORDS[1]["choices"] and len(preds[1]["probabilities"]) == 4
