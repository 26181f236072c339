"""The span-QA head: windows over long contexts, answers as character spans, SQuAD EM / F1.

On a tiny random BERT with MiniLM's tokenizer: windows overlap and an answer that crosses a window
boundary is labelled in a window that holds it whole; labelled tokens map back to the exact answer
characters (unicode, whitespace that differs); EM / F1 match the official script's formulas on
hand-checked cases; a record scores the same alone or padded in a batch; a 2-step run trains,
evaluates and predicts from JSONL files; bad records fail in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import liven, tiny_base, train_steps

import ptune
from ptune.batching import collate
from ptune.data import Task, load_builtin, load_records
from ptune.errors import ConfigError, DataError
from ptune.heads.span_qa import END, NULL, START, window_bounds
from ptune.metrics import normalize_answer, squad_exact, squad_f1, squad_scores

CTX = ("Paris is the capital of France. Berlin is the capital of Germany, and Zürich is a city in Switzerland. "
       "São Paulo is the largest city of Brazil.")


def qa(question, answer=None, context=CTX, start=None):
    answers = {"text": [], "answer_start": []}
    if answer is not None:
        answers = {"text": [answer], "answer_start": [context.index(answer.strip()) if start is None else start]}
    return {"question": question, "context": context, "answers": answers}


RECORDS = [qa("capital of germany?", "Berlin"), qa("where is zürich?", "Switzerland"),
           qa("largest city of brazil?", "São Paulo"), qa("what is the capital of spain?")]


def qa_task(**kw) -> Task:
    kw = {"allow_no_answer": True, "max_length": 24, **kw}
    return Task(name="qa", head="span_qa", text_fields=("question", "context"), label_field="answers", **kw)


def encode(tokenizer, task, records, template="{question} [SEP] {context}", labelled=True):
    enc = ptune.TemplateEncoder(template, tokenizer, max_length=task.max_length)
    out = []
    for i, r in enumerate(records):
        rec = json.loads(json.dumps(r))
        task.validate_record(rec, f"record {i}")
        out.append(task.kind.encode(task, enc, rec, labelled))
    return out


def labelled_span(window):
    """(start position, end position) the window's labels mark, or None when it is labelled 'no answer'."""
    starts = [p for p, c in enumerate(window.labels) if c > 0 and c & START]
    ends = [p for p, c in enumerate(window.labels) if c > 0 and c & END]
    return None if starts == [NULL] else (starts[0], ends[0])


def answer_of(window, span, context):
    return context[window.offsets[span[0]][0]:window.offsets[span[1]][1]]


# ------------------------------------------------------------------------------------ metrics

def test_normalisation_is_squads():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  ") == ""


@pytest.mark.parametrize("gold, pred, em, f1", [
    ("Paris", "paris.", 1.0, 1.0),
    ("the cat sat", "a cat sat down", 0.0, 0.8),  # P 2/3, R 1
    ("go go stop", "go stop stop", 0.0, 2 / 3),  # token counts: common = min per token
    ("Denver Broncos", "Broncos", 0.0, 2 / 3),  # P 1, R 1/2
    ("", "", 1.0, 1.0),  # no answer predicted for no answer
    ("", "Paris", 0.0, 0.0),
    ("Paris", "", 0.0, 0.0),
    ("1,000 people", "1000 people", 1.0, 1.0),  # punctuation is dropped inside numbers too
])
def test_exact_and_f1_match_the_reference_formulas(gold, pred, em, f1):
    assert squad_exact(gold, pred) == em
    assert squad_f1(gold, pred) == pytest.approx(f1)


def test_scores_take_the_best_gold_and_treat_no_answer_as_empty():
    got = squad_scores(["the Broncos", "", "Denver", "x"], [["Denver Broncos", "Broncos"], [], ["Denver Broncos"],
                                                           ["the"]])  # "the" normalises to nothing: no answer
    assert got["exact_match"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert got["f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)


# ------------------------------------------------------------------------------------ windows

def test_window_bounds_overlap_and_cover_every_token():
    assert window_bounds(10, 4, 0) == [(0, 4), (2, 6), (4, 8), (6, 10)]  # default step: half a window
    assert window_bounds(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert window_bounds(10, 4, 9) == [(0, 4), (4, 8), (8, 10)]  # a stride beyond the window is capped
    assert window_bounds(3, 4, 0) == [(0, 3)]


def test_an_answer_across_a_window_boundary_is_labelled_where_it_is_whole(tokenizer):
    task = qa_task(max_length=24, doc_stride=6)
    context = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
               "sixteen seventeen eighteen nineteen twenty")
    # 21 tokens of room beside "[CLS] which numbers ? [SEP] ... [SEP]": windows of 18 context tokens, 6 apart
    [ex] = encode(tokenizer, task, [qa("which numbers?", "seventeen eighteen nineteen", context)])
    windows = ex.encoded.choices
    assert len(windows) >= 2 and all(len(w.input_ids) <= 24 for w in windows)
    holders = []
    for w in windows:
        context_words = [context[a:b] for a, b in (o for o in w.offsets if o is not None)]
        span = labelled_span(w)
        whole = all(x in context_words for x in ("seventeen", "eighteen", "nineteen"))
        if span is None:
            assert not whole  # no-answer only where the answer is not whole
        else:
            assert whole and answer_of(w, span, context) == "seventeen eighteen nineteen"
            holders.append(w)
    assert holders
    # the first window holds part of the answer only (it crosses its end): labelled "no answer"
    first_words = [context[a:b] for a, b in (o for o in windows[0].offsets if o is not None)]
    assert len(first_words) == 18 and labelled_span(windows[0]) is None
    assert "seventeen" in first_words and "eighteen" in first_words and "nineteen" not in first_words
    # consecutive windows overlap by window - stride tokens
    firsts = [next(o for o in w.offsets if o is not None)[0] for w in windows]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)


def test_unicode_and_whitespace_answers_map_to_exact_characters(tokenizer):
    task = qa_task(max_length=64)
    context = "Trains leave São Paulo for Zürich.  The trip via New\nYork is long."
    records = [qa("from where?", "São Paulo", context), qa("to where?", "Zürich", context),
               # the answer's own spacing differs from the context's; answer_start points at a leading space
               qa("via?", "New York", context, start=context.index("New")),
               qa("via what?", " New  York ", context, start=context.index("New") - 1)]
    got = []
    for ex in encode(tokenizer, task, records):
        [w] = ex.encoded.choices
        got.append(answer_of(w, labelled_span(w), context))
    assert got == ["São Paulo", "Zürich", "New\nYork", "New\nYork"]
    assert squad_exact("New York", "New\nYork") == 1.0


def test_question_and_prompt_tokens_are_never_candidates(tokenizer):
    task = qa_task(max_length=80)
    [ex] = encode(tokenizer, task, [RECORDS[0]], template="[P:3] {question} [SEP] {context}")
    [w] = ex.encoded.choices
    cand = [p for p, off in enumerate(w.offsets) if off is not None]
    assert all(w.virtual_index[p] == -1 for p in cand)
    assert tokenizer.convert_ids_to_tokens(w.input_ids[cand[0]]) == "paris"  # the first context token
    assert all(w.labels[p] == -100 for p in range(len(w.labels)) if p not in cand and p != NULL)


def test_decode_picks_the_best_valid_span_over_windows(tokenizer):
    task = qa_task(max_length=24, max_answer_length=3)
    [ex] = encode(tokenizer, task, [RECORDS[2]], labelled=False)
    windows = ex.encoded.choices
    assert len(windows) >= 2
    T = max(len(w.input_ids) for w in windows)
    row = torch.zeros(len(windows), T, 2)
    last = windows[-1]
    cand = [p for p, off in enumerate(last.offsets) if off is not None]
    ps = next(p for p in cand if CTX[last.offsets[p][0]:].startswith("São"))
    pe = next(p for p in cand if CTX[:last.offsets[p][1]].endswith("Paulo"))
    row[-1, ps, 0] = row[-1, pe, 1] = 5.0
    row[-1, pe + 1, 0] = 9.0  # a start after every good end: start <= end rules it out
    row[0, cand[0] if windows[0] is last else 1, 1] = -1.0
    got = task.kind.decode(task, ex, row)
    assert got["answer"] == "São Paulo" and CTX[got["start"]:got["end"]] == "São Paulo"
    assert 0.0 < got["score"] < 1.0
    row[:, NULL] = 20.0  # "no answer" scores higher everywhere
    assert task.kind.decode(task, ex, row)["answer"] == ""
    strict = qa_task(max_length=24, max_answer_length=3, allow_no_answer=False)
    assert strict.kind.decode(strict, ex, row)["answer"] == "São Paulo"


def test_padding_invariance_and_loss(tokenizer):
    task = qa_task(max_length=24)
    torch.manual_seed(0)
    model = ptune.apply(liven(tiny_base("bert")), ptune.PTuningConfig(num_virtual_tokens=2),
                        head=ptune.HeadConfig("span_qa", dropout=0.0), tokenizer=tokenizer,
                        template=task.kind.task_template(task), task=task).eval()
    examples = encode(tokenizer, task, RECORDS, template=model.template)
    batch = collate([e.encoded for e in examples], pad_id=0)
    counts = [len(e.encoded.choices) for e in examples]
    assert batch["input_ids"].shape[0] == sum(counts) and batch["labels"].shape == batch["input_ids"].shape
    with torch.no_grad():
        together = model(**batch).logits
        assert together.shape[:2] == (len(RECORDS), max(counts)) and together.shape[-1] == 2
        for j, ex in enumerate(examples):
            alone = model(**collate([ex.encoded], pad_id=0)).logits[0]
            for w, win in enumerate(ex.encoded.choices):
                n = len(win.input_ids)
                torch.testing.assert_close(alone[w, :n], together[j, w, :n], atol=1e-5, rtol=1e-4)
            assert torch.isinf(together[j, counts[j]:]).all()
    rows = task.kind.rows(together, None, [0] * len(examples))
    assert [r.shape[0] for r in rows] == counts
    losses = train_steps(model.train(), batch, steps=8, lr=5e-2)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------ records and files

@pytest.mark.parametrize("record, match", [
    (qa("q?", "Berlin", start=3), r"answer 'Berlin' is not in the context at answer_start 3"),
    (qa("q?", "Berlin", start=10_000), "outside the"),
    ({**qa("q?"), "answers": {"text": ["Paris"], "answer_start": []}}, "as many answer_start offsets"),
    ({**qa("q?"), "answers": {"text": ["Paris"], "answer_start": ["0"]}}, "must be an integer"),
    ({**qa("q?"), "answers": "Paris"}, "must be"),
    ({"question": "q?", "context": CTX}, "missing answers field 'answers'"),
    ({"question": "q?", "context": "", "answers": {"text": [], "answer_start": []}}, "text field 'context' is empty"),
])
def test_bad_records_fail_in_one_line(tmp_path, record, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_records(path, task=qa_task())
    assert "line 2" in str(e.value) and "\n" not in str(e.value)


def test_unanswerable_needs_allow_no_answer(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(RECORDS[3]) + "\n")
    with pytest.raises(DataError, match="allow_no_answer: true"):
        load_records(path, task=qa_task(allow_no_answer=False))
    with pytest.raises(ConfigError, match=r"text_fields: \[question, context\]"):
        load_records(path, task=Task(name="qa", head="span_qa", label_field="answers"))


def test_squad_json_is_flattened(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "Geo", "paragraphs": [{"context": CTX, "qas": [
        {"id": "a", "question": "capital of france?", "answers": [{"text": "Paris", "answer_start": 0}],
         "is_impossible": False},
        {"id": "b", "question": "capital of spain?", "answers": [], "plausible_answers": [
            {"text": "Paris", "answer_start": 0}], "is_impossible": True}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    recs = load_records(path, task=qa_task())
    assert [r["id"] for r in recs] == ["a", "b"]
    assert recs[0]["answers"] == {"text": ["Paris"], "answer_start": [0]} and recs[0]["context"] == CTX
    assert recs[1]["answers"] == {"text": [], "answer_start": []} and recs[1]["title"] == "Geo"
    with pytest.raises(DataError, match="allow_no_answer"):
        load_records(path, task=qa_task(allow_no_answer=False))


def test_template_and_config_are_checked(tokenizer):
    task = qa_task()
    assert task.kind.task_template(task) == "{question} [SEP] {context}"
    with pytest.raises(ConfigError, match="no {mask} slot"):
        ptune.apply(tiny_base("bert"), ptune.LoraConfig(r=2), head=ptune.HeadConfig("span_qa"), tokenizer=tokenizer,
                    template="{question} {context} {mask}", task=task)
    with pytest.raises(ConfigError, match="two outputs"):
        ptune.HeadConfig("span_qa", num_labels=3)
    with pytest.raises(ConfigError, match="doc_stride"):
        qa_task(doc_stride=-1)


# ------------------------------------------------------------------------------------ the engine

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def test_engine_train_eval_predict(tiny_model_dir, tmp_path):
    from ptune.engine import Run, TrainConfig, train

    task_file = tmp_path / "qa.yaml"
    task_file.write_text("name: qa\nhead: span_qa\ntext_fields: [question, context]\nlabel_field: answers\n"
                         "allow_no_answer: true\nmax_length: 24\n")
    files = {k: write_jsonl(tmp_path / f"{k}.jsonl", RECORDS * (2 if k == "train" else 1))
             for k in ("train", "validation", "test")}
    cfg = TrainConfig(model=tiny_model_dir, task=str(task_file), train_file=files["train"],
                      validation_file=files["validation"], test_file=files["test"], method="p_tuning_v2",
                      method_options={"num_virtual_tokens": 2}, max_steps=2, batch_size=4, eval_every=2,
                      progress=False, precision="fp32", output_dir=str(tmp_path / "run"))
    summary = train(cfg)
    assert summary["steps"] == 2
    assert set(summary["test"]) >= {"exact_match", "f1"} and 0.0 <= summary["test"]["f1"] <= 1.0
    run = Run(tmp_path / "run")
    assert run.evaluate("test") == pytest.approx(summary["test"])  # windows regrouped per record, as in training
    preds = run.predict([{"question": r["question"], "context": r["context"]} for r in RECORDS])
    assert len(preds) == len(RECORDS)
    for p in preds:
        assert set(p) >= {"answer", "start", "score"} and 0.0 <= p["score"] <= 1.0
        if p["answer"]:
            assert CTX[p["start"]:p["start"] + len(p["answer"])] == p["answer"]
        else:
            assert p["start"] is None
    with pytest.raises(DataError, match="not plain text"):
        run.predict(["just a text"])


def test_ensemble_and_multitask_are_refused(tiny_model_dir, tokenizer, tmp_path):
    from ptune.engine import TrainConfig, train
    from ptune.multitask import TaskPart, apply_multitask

    task_file = tmp_path / "qa.yaml"
    task_file.write_text("name: qa\nhead: span_qa\ntext_fields: [question, context]\nlabel_field: answers\n"
                         "allow_no_answer: true\n")
    data = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    cfg = TrainConfig(model=tiny_model_dir, task=str(task_file), train_file=data, validation_file=data,
                      method="prompt_tuning", ensemble=2, max_steps=1, progress=False, output_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="without --ensemble"):
        train(cfg)
    parts = [TaskPart(qa_task(), ptune.HeadConfig("span_qa"), "{question} [SEP] {context}"),
             TaskPart(Task(name="c", labels=("a", "b")), ptune.HeadConfig("classification", num_labels=2))]
    with pytest.raises(ConfigError, match="task of its own"):
        apply_multitask(tiny_base("bert"), ptune.PromptTuningConfig(num_virtual_tokens=2, num_tasks=2), parts,
                        tokenizer=tokenizer)


# ------------------------------------------------------------------------------------ the built-in task

def test_geo_qa_is_deterministic_split_by_country_and_answers_are_spans():
    from ptune.data.geo_qa import load_geo_qa

    task, splits = load_geo_qa(13)
    assert task.kind.name == "span_qa" and task.allow_no_answer
    subjects = {k: {r["subject"] for r in v} for k, v in splits.items()}
    assert not subjects["train"] & subjects["validation"] and not subjects["train"] & subjects["test"]
    assert not subjects["validation"] & subjects["test"]
    for name, records in splits.items():
        for i, r in enumerate(records):
            for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
                assert r["context"][start:start + len(text)] == text
            task.validate_record(dict(r), f"{name} {i}")
        unanswerable = sum(not r["answers"]["text"] for r in records)
        assert 0.1 < unanswerable / len(records) < 0.5
    fr = [r for v in splits.values() for r in v if r["subject"] == "France" and r["field"] == "capital"]
    assert not fr or fr[0]["answers"]["text"] in ([], ["Paris"])  # real facts
    again = load_builtin("geo-qa", seed=13)[1]  # the registered built-in task
    assert again["test"][:5] == splits["test"][:5]
