"""Detection metrics against brute-force definitions and hand-computed values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from thrifty.core.metrics import accuracy_f1, average_precision, roc_auc, roc_curve, threshold_max_accuracy


def brute_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, size=40).astype(float)  # many ties
    y = rng.integers(0, 2, size=40)
    assert roc_auc(s, y) == pytest.approx(brute_auc(s, y))


def test_auroc_extremes_and_errors():
    y = np.array([0, 0, 1, 1])
    assert roc_auc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert roc_auc([1, 1, 1, 1], y) == 0.5
    with pytest.raises(ValueError, match="both"):
        roc_auc([1, 2], [1, 1])
    with pytest.raises(ValueError, match="length"):
        roc_auc([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([np.nan, 1], [0, 1])


def test_average_precision_hand_computed():
    # ranked: 1 (pos), 2 (neg), 3 (pos), 4 (neg): AP = 1/2 * 1 + 1/2 * 2/3
    s = [0.9, 0.8, 0.7, 0.6]
    y = [1, 0, 1, 0]
    assert average_precision(s, y) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([0.9, 0.1], [1, 0]) == 1.0
    # a tie between a positive and a negative at the top counts as one threshold: precision 1/2
    assert average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)


def test_roc_curve_endpoints_and_area():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=200), rng.integers(0, 2, size=200)
    s = s + y
    fpr, tpr, thr = roc_curve(s, y)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(s, y))


def test_threshold_from_validation_and_accuracy_f1():
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 0, 1, 1, 1])
    t = threshold_max_accuracy(s, y)
    assert 0.3 < t <= 0.7
    assert accuracy_f1(s, y, t) == (1.0, 1.0)
    acc, f1 = accuracy_f1(s, y, 0.75)  # predicts 2 of 3 positives, no false positives
    assert acc == pytest.approx(5 / 6)
    assert f1 == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
