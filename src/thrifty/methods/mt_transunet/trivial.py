"""Trivial baselines of the MT-TransUNet recipe (the claim protocol's first step).

* Segmentation, training-free: **colour distance to the skin**. The skin colour is the median of the image's
  outer ring (the lesion rarely touches the border); each pixel's RGB distance to it is smoothed and split by
  Otsu's threshold, holes are filled and the connected component nearest the image centre is kept. A lesion that
  differs from its skin only by colour is solved by this; the miniature must leave the network room above it.
* Classification, fitted on the training labels: **a colour histogram** (``bins``³ joint RGB bins over the whole
  image, normalised) fed to a multinomial logistic regression. The generator's classes differ in their colours,
  so this is a strong cue; the network must beat it on AUC.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.linear_model import LogisticRegression


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance over ``bins`` cut points)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def colour_threshold_masks(images: np.ndarray, *, ring: float = 0.08, smooth: float = 1.0) -> np.ndarray:
    """Binary lesion masks (N, H, W) for ``images`` uint8 (N, H, W, 3), with no training (module docstring)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (N, H, W, 3), got {images.shape}")
    n, h, w, _ = images.shape
    r = max(1, round(ring * min(h, w)))
    border = np.ones((h, w), dtype=bool)
    border[r:-r, r:-r] = False
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        img = images[i].astype(np.float64)
        skin = np.median(img[border], axis=0)
        dist = ndimage.gaussian_filter(np.linalg.norm(img - skin, axis=-1), smooth)
        if np.ptp(dist) < 1e-6:  # a flat image: no pixel differs from the skin (Otsu would keep everything)
            continue
        fg = ndimage.binary_fill_holes(dist > _otsu(dist.ravel()))
        labelled, count = ndimage.label(fg)
        if count == 0:
            continue
        # the component whose pixels lie nearest the centre on average
        d_centre = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
        means = ndimage.mean(d_centre, labelled, index=np.arange(1, count + 1))
        out[i] = labelled == 1 + int(np.argmin(means))
    return out


def colour_histograms(images: np.ndarray, *, bins: int = 4) -> np.ndarray:
    """(N, bins³) normalised joint RGB histograms of ``images`` uint8 (N, H, W, 3)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (N, H, W, 3), got {images.shape}")
    q = (images.astype(np.int64) * bins) // 256  # (N, H, W, 3) in [0, bins)
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    n = len(images)
    hist = np.zeros((n, bins**3))
    for i in range(n):
        hist[i] = np.bincount(codes[i].ravel(), minlength=bins**3)
    return hist / hist.sum(1, keepdims=True)


class HistogramClassifier:
    """Multinomial logistic regression on :func:`colour_histograms` (the trivial classification baseline)."""

    def __init__(self, *, bins: int = 4, c: float = 10.0, seed: int = 0) -> None:
        self.bins = bins
        self.model = LogisticRegression(C=c, max_iter=2000, random_state=seed)

    def fit(self, images: np.ndarray, labels: np.ndarray) -> HistogramClassifier:
        self.model.fit(colour_histograms(images, bins=self.bins), np.asarray(labels))
        return self

    def predict_proba(self, images: np.ndarray, num_classes: int = 3) -> np.ndarray:
        """(N, num_classes) probabilities; classes absent from training get 0."""
        p = self.model.predict_proba(colour_histograms(images, bins=self.bins))
        out = np.zeros((len(p), num_classes))
        out[:, self.model.classes_] = p
        return out
