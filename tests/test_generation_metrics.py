"""ROUGE-1/2/L and BLEU-4 of generated text against values worked out by hand (ptune.metrics), and the pieces
of evaluation by generation that need no model: stop strings, references, the chat template's end of turn."""

from __future__ import annotations

import math

import pytest

from ptune.data import Task
from ptune.engine.generation import cut_at_stops, end_of_turn_ids, prompt_text, reference
from ptune.metrics import GENERATION_METRICS, bleu4, generation_scores, rouge_scores

REF = "police arrest man after bank raid"  # 6 words
SHORT = "police arrest man after bank"  # its first 5 words


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


def test_rouge_of_a_prefix_by_hand():
    # unigrams: 5 of the prediction's 5 in the 6 of the reference; bigrams 4 of 4 in 5; LCS 5
    got = rouge_scores([SHORT], [REF])
    assert got["rouge1"] == pytest.approx(f1(5 / 5, 5 / 6))  # 10/11
    assert got["rouge2"] == pytest.approx(f1(4 / 4, 4 / 5))  # 8/9
    assert got["rougeL"] == pytest.approx(f1(5 / 5, 5 / 6))


def test_rouge_counts_repeats_stems_and_order():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    got = rouge_scores([pred], [ref])
    assert got["rouge1"] == pytest.approx(5 / 6)  # the x2, cat, on, mat of 6 each side
    assert got["rouge2"] == pytest.approx(3 / 5)  # "the cat", "on the", "the mat" of 5 each side
    assert got["rougeL"] == pytest.approx(5 / 6)  # LCS "the cat on the mat"
    # stemming (rouge-score's Porter stemmer): "rises" ~ "rise", "prices" ~ "price"; case is ignored
    assert rouge_scores(["Oil Prices Rises"], ["oil price rise"])["rouge1"] == pytest.approx(1.0)
    # ROUGE-L follows order where ROUGE-1 does not: "b a" vs "a b" share both words, LCS 1
    got = rouge_scores(["bank raid"], ["raid bank"])
    assert got["rouge1"] == pytest.approx(1.0) and got["rougeL"] == pytest.approx(0.5)


def test_rouge_is_the_mean_over_pairs_and_zero_for_empty_text():
    got = rouge_scores([SHORT, ""], [REF, REF])
    assert got["rouge1"] == pytest.approx((10 / 11 + 0) / 2)
    assert rouge_scores([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_bleu4_brevity_penalty_by_hand():
    # every n-gram of the 5-word prediction is in the reference: precisions 1, BP = exp(1 - 6/5)
    assert bleu4([SHORT], [REF]) == pytest.approx(math.exp(1 - 6 / 5), abs=1e-9)
    assert bleu4([REF], [REF]) == pytest.approx(1.0)


def test_bleu4_smooths_an_empty_order_by_hand():
    # p1 5/6, p2 3/5, p3 1/4, p4 0/3 -> exp smoothing: 1 / (2 * 3); equal lengths, no penalty
    got = bleu4(["the cat sat on the mat"], ["the cat is on the mat"])
    assert got == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-9)


def test_bleu4_sums_ngram_counts_over_the_corpus():
    # pair 1: 4/4, 3/3, 2/2, 1/1 (identical, 4 words); pair 2: 5/5, 4/4, 3/3, 2/2 (SHORT vs REF)
    # corpus: 9/9 ... every precision 1; lengths 9 hypothesis vs 10 reference -> BP = exp(1 - 10/9)
    got = bleu4(["stocks rise in tokyo", SHORT], ["stocks rise in tokyo", REF])
    assert got == pytest.approx(math.exp(1 - 10 / 9), abs=1e-9)
    # a mean of sentence BLEUs would differ: (1 + exp(-0.2)) / 2
    assert got != pytest.approx((1 + math.exp(1 - 6 / 5)) / 2, abs=1e-3)


def test_generation_scores_holds_every_metric_in_unit_range():
    got = generation_scores([SHORT, "nothing alike"], [REF, "markets fall"])
    assert tuple(got) == GENERATION_METRICS
    assert all(0 <= v <= 1 for v in got.values())
    with pytest.raises(ValueError):
        generation_scores(["a"], [])


def test_predictions_are_cut_at_the_tasks_stop_strings():
    assert cut_at_stops("  Oil prices rise\nThe price of oil", ["\n"]) == "Oil prices rise"
    assert cut_at_stops("\n\nOil prices rise\nmore", ["\n"]) == "Oil prices rise"  # leading whitespace first
    assert cut_at_stops("a. b## c", ["##", ". "]) == "a"  # the earliest stop wins
    assert cut_at_stops(" as is ", []) == "as is"


def test_reference_and_input_of_each_record_form():
    task = Task(name="t", head="causal_lm", text_fields=("text",), target_field="target")
    rec = {"text": "the body", "target": " The headline"}
    assert reference(task, rec) == "The headline" and prompt_text(task, rec) == "the body"
    chat = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": " a2 "}]}
    assert reference(task, chat) == "a2" and prompt_text(task, chat) == "q2"


def test_end_of_turn_is_read_from_the_chat_template(tokenizer):
    assert end_of_turn_ids(tokenizer) == []  # MiniLM's tokenizer: no chat template
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
    assert end_of_turn_ids(tok) == [tok.sep_token_id]
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_ids(tok) == []  # a plain line break is no token to stop at


def test_gemma_chat_turns_end_at_end_of_turn():
    pytest.importorskip("gguf")
    from ptune.models import load_tokenizer

    try:
        tok = load_tokenizer("gemma")
    except Exception as e:  # noqa: BLE001 - the packaged Gemma is an optional extra
        pytest.skip(f"packaged Gemma not installed: {e}")
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<end_of_turn>")] == [106]
