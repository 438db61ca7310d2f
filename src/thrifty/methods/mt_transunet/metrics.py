"""Metrics of the MT-TransUNet recipe (arXiv 2112.01767), as the ISIC-2017 challenge reports them.

Segmentation: Jaccard, Dice, pixel accuracy, sensitivity and specificity of the thresholded lesion mask,
computed per image and averaged over images (the challenge's convention). Classification: melanoma-vs-rest and
seborrheic-keratosis-vs-rest AUC (and their mean, the selection score of the classification task), the
three-class accuracy and balanced accuracy, and the two binary accuracies at the arg-max decision.
"""

from __future__ import annotations

import numpy as np

from thrifty.core.metrics import roc_auc


def segmentation_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Per-image averages (in %) of Jaccard, Dice, accuracy, sensitivity and specificity.

    ``pred``, ``target``: (N, H, W) binary (bool or {0, 1}). An image whose target and prediction are both empty
    scores Jaccard and Dice 100 (nothing to find, nothing found); sensitivity is averaged over images with a
    lesion, specificity over images with background.
    """
    pred = np.asarray(pred).astype(bool)
    target = np.asarray(target).astype(bool)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"expected predictions and masks (N, H, W) of one shape, got {pred.shape} and {target.shape}")
    axes = (1, 2)
    tp = (pred & target).sum(axes).astype(np.float64)
    fp = (pred & ~target).sum(axes).astype(np.float64)
    fn = (~pred & target).sum(axes).astype(np.float64)
    tn = (~pred & ~target).sum(axes).astype(np.float64)
    union = tp + fp + fn
    jaccard = np.where(union > 0, tp / np.maximum(union, 1), 1.0)
    dice = np.where(union > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
    pos, neg = tp + fn, tn + fp
    sens = (tp / np.maximum(pos, 1))[pos > 0]
    spec = (tn / np.maximum(neg, 1))[neg > 0]
    return {
        "jaccard": 100 * float(jaccard.mean()),
        "dice": 100 * float(dice.mean()),
        "accuracy": 100 * float(((tp + tn) / (tp + tn + fp + fn)).mean()),
        "sensitivity": 100 * float(sens.mean()) if len(sens) else float("nan"),
        "specificity": 100 * float(spec.mean()) if len(spec) else float("nan"),
    }


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``probs`` (N, 3) class probabilities (melanoma, seborrheic keratosis, nevus), ``labels`` (N,) -> metrics (%).

    ``melanoma_auc`` / ``sk_auc``: one-vs-rest AUC (NaN when a class is absent or alone); ``mean_auc`` their mean;
    ``accuracy`` / ``balanced_accuracy`` of the three-class arg-max; ``melanoma_accuracy`` / ``sk_accuracy`` of
    the binary decision "arg-max is that class"."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if probs.ndim != 2 or probs.shape[0] != len(labels):
        raise ValueError(f"expected probabilities (N, C) for N labels, got {probs.shape} and {labels.shape}")
    out: dict[str, float] = {}
    for key, c in (("melanoma", 0), ("sk", 1)):
        y = (labels == c).astype(int)
        out[f"{key}_auc"] = 100 * roc_auc(probs[:, c], y) if 0 < y.sum() < len(y) else float("nan")
    aucs = [v for v in (out["melanoma_auc"], out["sk_auc"]) if np.isfinite(v)]
    out["mean_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    pred = probs.argmax(1)
    out["accuracy"] = 100 * float((pred == labels).mean())
    recalls = [float((pred[labels == c] == c).mean()) for c in range(probs.shape[1]) if (labels == c).any()]
    out["balanced_accuracy"] = 100 * float(np.mean(recalls))
    out["melanoma_accuracy"] = 100 * float(((pred == 0) == (labels == 0)).mean())
    out["sk_accuracy"] = 100 * float(((pred == 1) == (labels == 1)).mean())
    return out


def threshold_at_specificity(scores: np.ndarray, positive: np.ndarray, specificity: float) -> float:
    """The smallest score threshold whose specificity (share of negatives scored below it) reaches
    ``specificity``; chosen on validation, then applied to test (the ISIC-2017 challenge reports sensitivity at
    fixed specificities)."""
    scores = np.asarray(scores, dtype=np.float64)
    neg = np.sort(scores[~np.asarray(positive, dtype=bool)])
    if not len(neg):
        raise ValueError("threshold_at_specificity needs at least one negative")
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must be in [0, 1], got {specificity}")
    k = min(len(neg), max(1, int(np.ceil(specificity * len(neg) - 1e-9))))  # negatives that must lie below it
    return float(np.nextafter(neg[k - 1], np.inf))


def sensitivity_specificity(scores: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) in % of the decision ``score >= threshold``."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    pred = scores >= threshold
    sens = 100 * float(pred[positive].mean()) if positive.any() else float("nan")
    spec = 100 * float((~pred[~positive]).mean()) if (~positive).any() else float("nan")
    return sens, spec


def attention_in_lesion(attention: np.ndarray, masks: np.ndarray) -> float:
    """The mean share (%) of the CLS token's attention to the patches that falls on the lesion.

    ``attention`` (N, heads, 1+g², 1+g²) softmax weights of one layer (CLS at index 0); ``masks`` (N, H, W) binary,
    reduced to the g×g token grid by nearest-neighbour sampling of each token's centre. Images without a lesion are
    skipped; a uniform attention scores the lesion's share of the tokens."""
    attention = np.asarray(attention, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    n_tok = attention.shape[-1] - 1
    g = round(n_tok**0.5)
    if g * g != n_tok or attention.shape[0] != masks.shape[0]:
        raise ValueError(f"expected (N, heads, 1+g², 1+g²) attention for N masks, got {attention.shape}, {masks.shape}")
    a = attention.mean(1)[:, 0, 1:]  # (N, g²) head-averaged CLS -> patches
    a = a / a.sum(1, keepdims=True)
    h, w = masks.shape[1:]
    rows = ((np.arange(g) + 0.5) * h / g).astype(int)
    cols = ((np.arange(g) + 0.5) * w / g).astype(int)
    grid = masks[:, rows][:, :, cols].reshape(len(masks), -1)  # (N, g²)
    keep = grid.any(1)
    if not keep.any():
        return float("nan")
    return 100 * float((a[keep] * grid[keep]).sum(1).mean())
