"""Metric functions: accuracy, macro-F1, entity-level P/R/F1 (seqeval), SQuAD exact match / token F1, and the
generation metrics ROUGE-1/2/L (``rouge-score``) and BLEU-4 (``sacrebleu``). Which head reports which is the
head's business (``ptune.heads``: each head kind lists its metrics as ``MetricSpec``s)."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Sequence


def accuracy(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    return sum(p == r for p, r in zip(preds, refs)) / max(len(refs), 1)


def macro_f1(preds: Sequence[Any], refs: Sequence[Any], labels: Sequence[Any] | None = None) -> float:
    """Per-class F1 averaged over the classes present in refs or preds (or the given labels)."""
    classes = list(labels) if labels is not None else sorted(set(refs) | set(preds), key=str)
    classes = [c for c in classes if c in set(refs) | set(preds)]
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(preds, refs))
        fp = sum(p == c and r != c for p, r in zip(preds, refs))
        fn = sum(p != c and r == c for p, r in zip(preds, refs))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


def entity_scores(preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score

    p, r = [list(x) for x in preds], [list(x) for x in refs]
    return {"precision": float(precision_score(r, p, zero_division=0)),
            "recall": float(recall_score(r, p, zero_division=0)),
            "f1": float(f1_score(r, p, zero_division=0))}


# SQuAD's answer normalisation and scores, as the official v2.0 evaluation script computes them
# (per question: the max over its gold answers; a question with no gold answer has the gold "").
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a / an / the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def squad_f1(gold: str, pred: str) -> float:
    """Token F1 between normalised answers; 1 when both are empty (no answer), 0 when only one is."""
    gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_scores(preds: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 (in [0, 1]) over questions; ``golds[i]``: question i's gold answers, gold answers
    that normalise to nothing are dropped and none left means the gold is "" (unanswerable), as the v2.0 script."""
    em = f1 = 0.0
    for pred, answers in zip(preds, golds):
        answers = [a for a in answers if normalize_answer(a)] or [""]
        em += max(squad_exact(a, pred) for a in answers)
        f1 += max(squad_f1(a, pred) for a in answers)
    n = max(len(preds), 1)
    return {"exact_match": em / n, "f1": f1 / n}


# Scores of generated text against one reference each, as ChatGLM's P-Tuning v2 recipe reports them (its
# ROUGE-1/2/L and BLEU-4), computed by the standard packages. Every value is in [0, 1].
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "bleu4")


def rouge_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures over the pairs (``rouge-score``: lowercased, split on
    non-alphanumerics, Porter-stemmed, as its ``use_stemmer=True``; an empty text scores 0)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(preds, refs):
        got = scorer.score(ref, pred)  # (target, prediction)
        for key in totals:
            totals[key] += got[key].fmeasure
    n = max(len(refs), 1)
    return {key: value / n for key, value in totals.items()}


def bleu4(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 (``sacrebleu``'s defaults: 13a tokenisation, n-gram counts summed over the corpus,
    brevity penalty over the summed lengths, exponential smoothing of empty n-gram orders), in [0, 1]."""
    import sacrebleu

    if not refs:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score) / 100


def generation_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L (mean F-measure) and corpus BLEU-4 of ``preds`` against ``refs`` (one reference each)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    return {**rouge_scores(preds, refs), "bleu4": bleu4(preds, refs)}
