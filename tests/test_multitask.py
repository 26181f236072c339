"""One adapter, several tasks (Python API): mixed-task batches, per-task tables and gradients, ensembles.

A mixed-task batch must give each row exactly what that task's model gives it alone (the body runs
once, each row reads its own prompt table and its own head), every per-task table or encoder must
receive gradient when its task is in the batch (and none when it is not), and an ensemble of K
identical prompts must equal one prompt.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from cases import method_config, methods
from conftest import tiny_base

import ptune
from ptune.data import Task
from ptune.engine.build import encode_records, make_encoder
from ptune.engine.evaluate import make_batch, make_multitask_batch
from ptune.errors import ConfigError
from ptune.multitask import MultiTaskModel, TaskPart, apply_multitask

CLS = Task(name="topic", head="classification", labels=("sport", "food"))
NER = Task(name="ner", head="tagging", text_fields=("tokens",), label_field="tags", labels=("O", "B-per", "B-loc"))
VERB = Task(name="mood", head="verbalizer", labels=("good", "bad"), template="{text} It was {mask}.")
RECORDS = {
    "topic": [{"text": "the team won the cup", "label": "sport"}, {"text": "bake the bread slowly", "label": "food"},
              {"text": "a late goal", "label": "sport"}],
    "ner": [{"tokens": ["alice", "went", "to", "paris"], "tags": ["B-per", "O", "O", "B-loc"]},
            {"tokens": ["bob", "likes", "rome", "and", "fresh", "pasta"], "tags": ["B-per", "O", "B-loc", "O", "O", "O"]}],
    "mood": [{"text": "what a lovely day", "label": "good"}, {"text": "the food was cold", "label": "bad"},
             {"text": "terrible service", "label": "bad"}],
}

# tests/cases.py: methods with a prompt table per task, and the weight-side methods, whose one update all tasks
# share. A config with its own template (P-Tuning's infix) would give every task one set of fields: P-Tuning
# runs with its prompts first, one encoder shared by the tasks or one each.
TABLES = methods(lambda c: c.task_tables and getattr(c.config(), "template", None) is None,
                 variants=("p_tuning-mlp", "p_tuning-per_task"))
SHARED = methods(lambda c: c.weight_side and c.base_4bit != "only")
CONFIGS = TABLES + SHARED


def config_for(method: str, n: int):
    return method_config(method, num_tasks=n) if method in TABLES else method_config(method)


def perturb(model, scale=0.3, seed=0):
    """Move every trainable tensor off its initialisation (LoRA's B starts at zero, heads are random)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def build(method, tokenizer, tasks=(CLS, NER, VERB), share=False):
    heads = {"classification": ptune.HeadConfig("classification", num_labels=2, dropout=0.0),
             "tagging": ptune.HeadConfig("tagging", num_labels=3, dropout=0.0),
             "verbalizer": ptune.HeadConfig("verbalizer", dropout=0.0)}
    parts = [TaskPart(t, dataclasses.replace(heads[t.head]), t.template or "{%s}" % t.text_fields[0], 32)
             for t in tasks]
    shared = share or method in SHARED
    n = 1 if shared else len(tasks)
    base = tiny_base("bert", "masked_lm" if any(t.head == "verbalizer" for t in tasks) else "backbone")
    model = apply_multitask(base, config_for(method, n), parts, tokenizer=tokenizer, share_prompt=shared)
    perturb(model)
    return model.eval()


def encoded(model, tokenizer):
    examples = []
    for t, view in enumerate(model.views):
        ex = encode_records(view.spec.task, make_encoder(view, tokenizer, 32), RECORDS[view.spec.task.name])
        for e in ex:
            e.task = t
        examples += ex
    return examples


def mixed_order(n, seed=0):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


@pytest.mark.parametrize("method", CONFIGS)
def test_mixed_batch_equals_each_task_alone(method, tokenizer):
    model = build(method, tokenizer)
    examples = encoded(model, tokenizer)
    order = mixed_order(len(examples))
    batch = make_multitask_batch(examples, order, tokenizer.pad_token_id, "cpu", 3)
    with torch.no_grad():
        out = model(**batch)
        expected_loss = 0.0
        for t, view in enumerate(model.views):
            idx = [i for i in order if examples[i].task == t]
            alone_batch = make_batch(examples, idx, tokenizer.pad_token_id, "cpu")
            alone = view(**alone_batch)
            expected_loss += alone.loss * len(idx) / len(order)
            mixed = out.logits[t]
            for j, i in enumerate(idx):
                n = len(examples[i].encoded.input_ids)
                a, m = alone.logits[j], mixed[j]
                if a.dim() == 2:  # per-token: compare the row's real positions
                    a, m = a[:n], m[:n]
                torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected_loss, atol=1e-5, rtol=1e-5)
    # the tasks really differ: the same text through another task's prompt gives other hidden states
    if method not in SHARED:
        view0, view1 = model.views[0], model.views[1]
        ids = batch["input_ids"][:1]
        vi = batch["virtual_index"][:1]
        with torch.no_grad():
            h0 = view0.hidden_states(ids, virtual_index=vi, task_ids=torch.tensor([0]))
            h1 = view1.hidden_states(ids, virtual_index=vi, task_ids=torch.tensor([1]))
        assert not torch.allclose(h0, h1)


@pytest.mark.parametrize("method", TABLES)
def test_every_task_table_gets_gradient_from_its_rows_only(method, tokenizer):
    model = build(method, tokenizer).train()
    examples = encoded(model, tokenizer)
    present = [i for i, e in enumerate(examples) if e.task in (0, 2)]  # no row of task 1
    batch = make_multitask_batch(examples, present, tokenizer.pad_token_id, "cpu", 3)
    model(**batch).loss.backward()
    for name in model.adapter.task_tables:
        grad = model.adapter.get_parameter(name).grad
        norms = grad.flatten(1).norm(dim=1)
        assert norms[0] > 0 and norms[2] > 0, f"{name}: a task in the batch got no gradient"
        if method != "prefix_tuning":  # prefix tuning's shared MLP mixes tables only through its weights
            assert norms[1] == 0, f"{name}: the absent task's table moved"
    if hasattr(model.adapter, "encoders"):
        got = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
               for enc in model.adapter.encoders]
        assert got == [True, False, True]
    for t, name in enumerate(model.names):
        grads = [p.grad for p in model.head[name].parameters()]
        if grads:
            assert all((g is not None and g.abs().sum() > 0) == (t != 1) for g in grads)


def test_shared_prompt_has_one_table_and_per_task_heads(tokenizer):
    model = build("p_tuning_v2", tokenizer, share=True)
    assert model.method_config.num_tasks == 1 and model.spec.prompt_index == (0, 0, 0)
    assert set(model.head.keys()) == {"topic", "ner", "mood"}


def test_multitask_save_load_round_trip(tokenizer, tmp_path):
    model = build("p_tuning-per_task", tokenizer)
    ptune.save_adapter(model, tmp_path / "a")
    back = ptune.load_adapter(tmp_path / "a", base=tiny_base("bert", "masked_lm"), tokenizer=tokenizer).eval()
    assert isinstance(back, MultiTaskModel) and back.names == model.names
    examples = encoded(model, tokenizer)
    batch = make_multitask_batch(examples, mixed_order(len(examples)), tokenizer.pad_token_id, "cpu", 3)
    with torch.no_grad():
        for a, b in zip(model(**batch).logits, back(**batch).logits):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_multitask_refusals(tokenizer):
    parts = [TaskPart(CLS, ptune.HeadConfig("classification", num_labels=2)),
             TaskPart(dataclasses.replace(CLS, name="other"), ptune.HeadConfig("classification", num_labels=2))]
    base = tiny_base("bert")
    with pytest.raises(ConfigError, match="need num_tasks=2"):
        apply_multitask(base, ptune.PTuningV2Config(num_virtual_tokens=2), parts)
    with pytest.raises(ConfigError, match="same number of virtual tokens"):
        apply_multitask(base, ptune.PTuningConfig(num_tasks=2), [
            parts[0], dataclasses.replace(parts[1], template="[P:5] {text}")], tokenizer=tokenizer)
    same = [parts[0], dataclasses.replace(parts[1], task=CLS)]
    with pytest.raises(ptune.PtuneError, match="task names must differ"):
        apply_multitask(base, ptune.PTuningV2Config(num_virtual_tokens=2, num_tasks=2), same)


def ensemble_model(tokenizer, K=3, method="prompt_tuning"):
    cfg = (ptune.PromptTuningConfig(num_virtual_tokens=3, num_tasks=K) if method == "prompt_tuning"
           else ptune.PTuningV2Config(num_virtual_tokens=3, num_tasks=K))
    model = ptune.apply(tiny_base("bert"), cfg, head=ptune.HeadConfig("classification", num_labels=2, dropout=0.0),
                        tokenizer=tokenizer, labels=["sport", "food"], ensemble=K)
    perturb(model)
    enc = ptune.TemplateEncoder(model.template, tokenizer)
    rows = [enc.encode({"text": r["text"]}) for r in RECORDS["topic"]]
    return model.eval(), ptune.batching.collate(rows, pad_id=tokenizer.pad_token_id, targets=[0, 1, 0])


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_v2"])
def test_ensemble_of_identical_prompts_equals_one_prompt(method, tokenizer):
    model, batch = ensemble_model(tokenizer, method=method)
    name = model.adapter.task_tables[0]
    table = model.adapter.get_parameter(name)
    with torch.no_grad():
        table[1:] = table[:1]
        ensemble = model(**batch)
        model.member = 0
        one = model(**batch)
        model.member = None
    torch.testing.assert_close(ensemble.logits, one.logits.log_softmax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ensemble.loss, one.loss, atol=1e-5, rtol=1e-5)


def test_ensemble_averages_member_probabilities_in_one_pass(tokenizer):
    model, batch = ensemble_model(tokenizer)
    with torch.no_grad():
        out = model(**batch)
        probs = []
        for k in range(3):
            model.member = k
            probs.append(model(**batch).logits.softmax(-1))
        model.member = None
    assert out.members.shape == (3, 3, 2)
    torch.testing.assert_close(out.logits.exp(), torch.stack(probs).mean(0), atol=1e-5, rtol=1e-5)
    for k in range(3):  # the replicated rows score each member exactly as that member alone
        torch.testing.assert_close(out.members[:, k].softmax(-1), probs[k], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(probs[0], probs[1])  # members start apart (seed + k)


def test_ensemble_needs_matching_tables(tokenizer):
    with pytest.raises(ConfigError, match="num_tasks=3"):
        ptune.apply(tiny_base("bert"), ptune.PromptTuningConfig(num_virtual_tokens=3), ensemble=3,
                    tokenizer=tokenizer, labels=["a", "b"])
