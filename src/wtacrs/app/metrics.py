"""GLUE metrics in plain Python: accuracy, F1, Matthews correlation, Pearson and Spearman.

Each agrees with its scikit-learn / SciPy namesake (``accuracy_score``, ``f1_score``, ``matthews_corrcoef``,
``pearsonr``, ``spearmanr``); the tests recompute them from their definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: GLUE's score per task (what the paper's tables average): the mean of the listed metrics, times 100.
TASK_SCORE = {
    "accuracy": ("accuracy",),
    "matthews": ("matthews",),
    "f1_accuracy": ("f1", "accuracy"),
    "pearson_spearman": ("pearson", "spearman"),
}


def _check_pair(preds: Sequence, labels: Sequence) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"preds and labels must have the same length; got {len(preds)} and {len(labels)}")
    if not preds:
        raise ValueError("preds and labels must not be empty")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Share of ``preds`` equal to ``labels``."""
    _check_pair(preds, labels)
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)


def f1(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2·TP / (2·TP + FP + FN); 0 when there is no positive at all."""
    _check_pair(preds, labels)
    tp = sum(int(p) == positive and int(y) == positive for p, y in zip(preds, labels))
    fp = sum(int(p) == positive and int(y) != positive for p, y in zip(preds, labels))
    fn = sum(int(p) != positive and int(y) == positive for p, y in zip(preds, labels))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K); 0 when either side is constant."""
    _check_pair(preds, labels)
    classes = sorted({int(v) for v in preds} | {int(v) for v in labels})
    n = len(labels)
    correct = sum(int(p) == int(y) for p, y in zip(preds, labels))
    pred_count = {c: 0 for c in classes}
    true_count = {c: 0 for c in classes}
    for p, y in zip(preds, labels):
        pred_count[int(p)] += 1
        true_count[int(y)] += 1
    cov_pt = correct * n - sum(pred_count[c] * true_count[c] for c in classes)
    cov_pp = n * n - sum(v * v for v in pred_count.values())
    cov_tt = n * n - sum(v * v for v in true_count.values())
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant."""
    _check_pair(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank (as ``scipy.stats.rankdata``)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            result[i] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the tie-averaged ranks."""
    _check_pair(x, y)
    return pearson(ranks(x), ranks(y))


def compute(score: str, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """Every metric GLUE reports for a task whose score kind is ``score`` (a key of ``TASK_SCORE``), plus
    ``score``: their mean times 100, the number the paper's tables show."""
    if score not in TASK_SCORE:
        raise ValueError(f"score must be one of {sorted(TASK_SCORE)}; got {score!r}")
    functions = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}
    if score == "accuracy":
        result = {"accuracy": accuracy(preds, labels)}
    elif score == "matthews":
        result = {"matthews": matthews(preds, labels), "accuracy": accuracy(preds, labels)}
    else:
        result = {name: functions[name](preds, labels) for name in TASK_SCORE[score]}
    result["score"] = 100 * sum(result[name] for name in TASK_SCORE[score]) / len(TASK_SCORE[score])
    return result
