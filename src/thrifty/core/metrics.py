"""Binary detection metrics shared by recipes: AUROC, AUPRC, ROC curve, validation-chosen thresholds.

Scores are "higher = more positive (anomalous)"; labels are 0/1. AUROC is the Mann–Whitney statistic (ties
count one half); AUPRC is average precision (step-wise, as scikit-learn's ``average_precision_score``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


def _check(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(np.int64)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return s, y


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Probability that a random positive scores above a random negative (ties ½)."""
    s, y = _check(scores, labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative examples")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Σ_k (R_k − R_{k−1}) P_k over distinct score thresholds, highest first."""
    s, y = _check(scores, labels)
    if y.sum() == 0:
        raise ValueError("average precision needs at least one positive")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds (decreasing), starting at (0, 0)."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / max(y.sum(), 1)]
    fpr = np.r_[0.0, fp / max((1 - y).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, s[last]]


def threshold_max_accuracy(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The threshold t (predict positive when score ≥ t) with the best accuracy on these (validation) scores.

    Among equally accurate thresholds the midpoint between neighbouring distinct scores is returned.
    """
    s, y = _check(scores, labels)
    cand = np.unique(s)
    mids = np.r_[cand[0] - 1.0, (cand[:-1] + cand[1:]) / 2, cand[-1] + 1.0]
    acc = [((s >= t).astype(int) == y).mean() for t in mids]
    return float(mids[int(np.argmax(acc))])


def accuracy_f1(scores: Sequence[float], labels: Sequence[int], threshold: float) -> tuple[float, float]:
    """Accuracy and F1 of ``score ≥ threshold`` as the positive prediction."""
    s, y = _check(scores, labels)
    pred = (s >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return float((pred == y).mean()), float(f1)
