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
