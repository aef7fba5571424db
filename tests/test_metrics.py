import math
import random

import pytest
import torch

from wtacrs.app import metrics


def test_accuracy_and_f1_by_hand():
    preds = [1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0]
    assert metrics.accuracy(preds, labels) == pytest.approx(4 / 6)
    # TP=2, FP=1, FN=1
    assert metrics.f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics.f1([0, 0], [0, 0]) == 0.0


def test_matthews_binary_matches_confusion_matrix_formula():
    rng = random.Random(0)
    labels = [rng.randint(0, 1) for _ in range(200)]
    preds = [y if rng.random() < 0.7 else 1 - y for y in labels]
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews(preds, labels) == pytest.approx(expected)


def test_matthews_multiclass_and_degenerate():
    # sklearn.metrics.matthews_corrcoef([0, 1, 2, 2, 1, 0], [0, 2, 2, 1, 1, 0]) == 0.5
    assert metrics.matthews([0, 2, 2, 1, 1, 0], [0, 1, 2, 2, 1, 0]) == pytest.approx(0.5)
    assert metrics.matthews([1, 1, 1], [0, 1, 0]) == 0.0
    assert metrics.matthews([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert metrics.matthews([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


def test_pearson_matches_torch_corrcoef():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, generator=g, dtype=torch.float64)
    y = 0.5 * x + torch.randn(100, generator=g, dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert metrics.pearson(x.tolist(), y.tolist()) == pytest.approx(expected, rel=1e-12)
    assert metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def test_ranks_average_ties_and_spearman():
    assert metrics.ranks([10.0, 20.0, 10.0, 30.0]) == [1.5, 3.0, 1.5, 4.0]
    # Monotone but non-linear: Spearman 1, Pearson below 1.
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    y = [v**3 for v in x]
    assert metrics.spearman(x, y) == pytest.approx(1.0)
    assert metrics.pearson(x, y) < 0.99
    # scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]).statistic == 0.9486832980505138
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)


@pytest.mark.parametrize(
    "score, preds, labels, expected_keys, expected_score",
    [
        ("accuracy", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy"}, 75.0),
        ("f1_accuracy", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy", "f1"}, 100 * (0.75 + 0.8) / 2),
        ("matthews", [1, 0, 1, 0], [1, 0, 1, 0], {"matthews", "accuracy"}, 100.0),
        ("pearson_spearman", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], {"pearson", "spearman"}, 100.0),
    ],
)
def test_compute_gives_glue_score(score, preds, labels, expected_keys, expected_score):
    result = metrics.compute(score, preds, labels)
    assert set(result) == expected_keys | {"score"}
    assert result["score"] == pytest.approx(expected_score)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="same length; got 2 and 3"):
        metrics.accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="must not be empty"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="score must be one of"):
        metrics.compute("bleu", [1], [1])
