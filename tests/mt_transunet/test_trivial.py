"""The trivial baselines of the MT-TransUNet recipe on hand-made images: the training-free colour-threshold
segmenter finds a dark lesion on light skin (and nothing on a flat image); the colour-histogram classifier separates
two colour classes and gives 0 to a class it never saw; bad shapes are clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from thrifty.methods.mt_transunet.metrics import classification_metrics
from thrifty.methods.mt_transunet.trivial import HistogramClassifier, colour_histograms, colour_threshold_masks

SKIN = (222, 184, 160)
LESION = (96, 58, 40)


def disc(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def paint(mask: np.ndarray, *, skin=SKIN, lesion=LESION, noise: float = 3.0, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image (H, W, 3): ``lesion`` colour on ``mask``, ``skin`` elsewhere, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    img = np.where(mask[..., None], np.array(lesion, float), np.array(skin, float))
    img = img + rng.normal(0.0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ------------------------------------------------------------------------------------------- segmentation


def test_colour_threshold_finds_a_dark_disc_on_light_skin():
    truth = np.stack([disc(48, 24, 24, 10), disc(48, 20, 28, 13), disc(48, 26, 21, 6)])
    images = np.stack([paint(m, seed=i) for i, m in enumerate(truth)])
    masks = colour_threshold_masks(images)
    assert masks.shape == truth.shape and masks.dtype == bool
    for i in range(len(truth)):
        assert iou(masks[i], truth[i]) > 0.85, i


def test_colour_threshold_fills_holes_and_keeps_the_central_lesion():
    truth = disc(48, 24, 24, 11)
    centre_spot = disc(48, 24, 24, 3)  # a light (milia-like) spot inside the lesion: a hole to fill
    img = paint(truth)
    img[centre_spot] = SKIN
    img[disc(48, 4, 43, 2.5)] = LESION  # a dark speck near the corner, away from the centre
    mask = colour_threshold_masks(img[None])[0]
    assert iou(mask, truth) > 0.85
    assert mask[24, 24]  # the hole is filled
    assert not mask[4, 43]  # only the component nearest the centre is kept


def test_colour_threshold_on_a_flat_image_is_empty():
    images = np.stack([np.full((32, 32, 3), SKIN, np.uint8), np.zeros((32, 32, 3), np.uint8)])
    masks = colour_threshold_masks(images)
    assert masks.shape == (2, 32, 32) and not masks.any()
    assert colour_threshold_masks(np.zeros((0, 16, 16, 3), np.uint8)).shape == (0, 16, 16)


@pytest.mark.parametrize("shape", [(32, 32, 3), (2, 32, 32), (2, 32, 32, 4), (2, 3, 32, 32)])
def test_colour_threshold_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        colour_threshold_masks(np.zeros(shape, np.uint8))


# ----------------------------------------------------------------------------------------- classification


def two_colour_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Brown lesions (class 2, nevus) and blue-grey ones (class 0, melanoma) of random size on skin."""
    rng = np.random.default_rng(seed)
    labels = np.tile([0, 2], n // 2)
    images = []
    for i, y in enumerate(labels):
        m = disc(24, 12 + rng.uniform(-2, 2), 12 + rng.uniform(-2, 2), rng.uniform(4, 8))
        colour = (70, 80, 110) if y == 0 else (140, 90, 50)
        images.append(paint(m, lesion=colour, skin=SKIN, noise=4.0, seed=seed * 1000 + i))
    return np.stack(images), labels


def test_histogram_classifier_separates_two_colour_classes():
    x, y = two_colour_classes(20, seed=0)
    xt, yt = two_colour_classes(20, seed=1)
    clf = HistogramClassifier(seed=0).fit(x, y)
    p = clf.predict_proba(xt)
    assert p.shape == (20, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    assert (p[:, 1] == 0).all()  # seborrheic keratosis never seen in training
    assert (p.argmax(1) == yt).all()
    assert classification_metrics(p, yt)["melanoma_auc"] == pytest.approx(100.0)
    # a fixed seed and data give the same model
    np.testing.assert_array_equal(HistogramClassifier(seed=0).fit(x, y).predict_proba(xt), p)


def test_histogram_classifier_gives_absent_classes_zero_with_other_class_counts():
    x, y = two_colour_classes(8, seed=2)
    p = HistogramClassifier().fit(x, np.where(y == 0, 1, 0)).predict_proba(x, num_classes=4)
    assert p.shape == (8, 4) and (p[:, 2:] == 0).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)


def test_colour_histograms_are_normalised_joint_rgb_bins():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, :2] = (255, 0, 0)  # half red, half black
    h = colour_histograms(img, bins=2)
    assert h.shape == (1, 8)
    np.testing.assert_allclose(h[0], [0.5, 0, 0, 0, 0.5, 0, 0, 0])
    assert colour_histograms(np.zeros((3, 5, 5, 3), np.uint8)).shape == (3, 64)


@pytest.mark.parametrize("shape", [(4, 24, 24), (4, 24, 24, 4)])
def test_histogram_classifier_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        HistogramClassifier().fit(np.zeros(shape, np.uint8), np.array([0, 2, 0, 2]))
    clf = HistogramClassifier().fit(*two_colour_classes(4, seed=3))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        clf.predict_proba(np.zeros(shape, np.uint8))
