"""Metric functions: accuracy, macro-F1, entity-level P/R/F1 (seqeval). Which head reports which is the head's
business (``ptune.heads``: each head kind lists its metrics as ``MetricSpec``s)."""

from __future__ import annotations

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
