"""Segmentation/classification metrics on hand-computed cases, and the release's augmentation invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thrifty.methods.mt_transunet.augment import augment
from thrifty.methods.mt_transunet.metrics import (
    attention_in_lesion,
    classification_metrics,
    segmentation_metrics,
    sensitivity_specificity,
    threshold_at_specificity,
)


def test_segmentation_metrics_known_values():
    target = np.zeros((1, 4, 4), bool)
    target[0, :2, :2] = True  # 4 lesion pixels
    pred = np.zeros((1, 4, 4), bool)
    pred[0, :2, :3] = True  # 6 predicted: tp 4, fp 2, fn 0, tn 10
    m = segmentation_metrics(pred, target)
    assert m["jaccard"] == pytest.approx(100 * 4 / 6)
    assert m["dice"] == pytest.approx(100 * 8 / 10)
    assert m["accuracy"] == pytest.approx(100 * 14 / 16)
    assert m["sensitivity"] == pytest.approx(100.0)
    assert m["specificity"] == pytest.approx(100 * 10 / 12)


def test_segmentation_metrics_average_per_image():
    target = np.zeros((2, 4, 4), bool)
    target[:, :2, :2] = True
    pred = target.copy()
    pred[1] = False  # image 0 perfect (Jaccard 1), image 1 empty (Jaccard 0)
    assert segmentation_metrics(pred, target)["jaccard"] == pytest.approx(50.0)


def test_segmentation_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        segmentation_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))


def test_classification_metrics_known_values():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1],
                      [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])  # fmt: skip
    m = classification_metrics(probs, labels)
    # melanoma scores: positives 0.9, 0.4; negatives 0.1, 0.6, 0.1, 0.2 -> 7 of 8 pairs ordered (0.4 < 0.6)
    assert m["melanoma_auc"] == pytest.approx(100 * 7 / 8)
    # SK scores: positives 0.8, 0.3; negatives 0.05, 0.5, 0.1, 0.1 -> 7 of 8
    assert m["sk_auc"] == pytest.approx(100 * 7 / 8)
    assert m["mean_auc"] == pytest.approx(100 * 7 / 8)
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)  # argmax: 0, 1, 1, 0, 2, 2
    assert m["balanced_accuracy"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)


def test_classification_auc_nan_when_class_absent():
    m = classification_metrics(np.full((3, 3), 1 / 3), np.array([2, 2, 2]))
    assert np.isnan(m["melanoma_auc"]) and np.isnan(m["mean_auc"])


def _square_batch(b: int = 6, s: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    masks = torch.zeros(b, s, s, dtype=torch.long)
    masks[:, 8:20, 10:26] = 1
    images = torch.rand(b, 3, s, s)
    images[:, 0] = masks.float()  # the red channel carries the mask: image and mask must move together
    return images, masks


def test_augment_moves_image_and_mask_together_and_keeps_masks_binary():
    images, masks = _square_batch()
    out_i, out_m = augment(images, masks, generator=torch.Generator().manual_seed(0), crop_prob=1.0)
    assert out_i.shape == images.shape and out_m.shape == masks.shape and out_m.dtype == masks.dtype
    assert set(out_m.unique().tolist()) <= {0, 1}
    # where the mask is 1 the red channel is high (bilinear blurs only the edge)
    inside = out_i[:, 0][out_m.bool()]
    assert inside.mean() > 0.8


def test_augment_flips_only_without_crop_preserve_area_and_content():
    images, masks = _square_batch()
    out_i, out_m = augment(images, masks, generator=torch.Generator().manual_seed(1), crop_prob=0.0)
    assert torch.equal(out_m.sum((1, 2)), masks.sum((1, 2)))
    assert torch.allclose(out_i.sum((2, 3)), images.sum((2, 3)))  # flips permute pixels
    assert not torch.equal(out_m, masks)  # some image was flipped (the square is off-centre)


def test_augment_crop_enlarges_the_lesion():
    images, masks = _square_batch()
    _, out_m = augment(images, masks, generator=torch.Generator().manual_seed(2), crop_prob=1.0, flip=False)
    assert (out_m.sum((1, 2)) >= masks.sum((1, 2))).all()
    assert (out_m.sum((1, 2)) > masks.sum((1, 2))).any()


def test_augment_is_deterministic_under_a_seed():
    images, masks = _square_batch()
    a = augment(images, masks, generator=torch.Generator().manual_seed(3))
    b = augment(images, masks, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_augment_refuses_mismatched_masks():
    with pytest.raises(ValueError, match="masks"):
        augment(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 9), generator=torch.Generator())


def test_threshold_at_specificity_reaches_it_on_the_data_it_was_chosen_on():
    rng = np.random.default_rng(0)
    scores = rng.random(200)
    positive = rng.random(200) < 0.3
    for spec in (0.5, 0.82, 0.89, 0.95):
        thr = threshold_at_specificity(scores, positive, spec)
        _, achieved = sensitivity_specificity(scores, positive, thr)
        assert achieved >= 100 * spec - 1e-9
        # the smallest such threshold: one negative less below it would miss the target
        neg = np.sort(scores[~positive])
        k = int(np.ceil(spec * len(neg)))
        assert thr > neg[k - 1] and (k == len(neg) or thr <= neg[k])


def test_sensitivity_specificity_known_values():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    positive = np.array([True, True, True, False, False, False])
    assert sensitivity_specificity(scores, positive, 0.5) == pytest.approx((100 * 2 / 3, 100 * 2 / 3))


def test_attention_in_lesion_uniform_attention_scores_the_lesion_share():
    g, n = 4, 3
    attn = np.full((n, 2, 1 + g * g, 1 + g * g), 1 / (1 + g * g))
    masks = np.zeros((n, 16, 16), bool)
    masks[:, :8, :8] = True  # a quarter of the tokens
    assert attention_in_lesion(attn, masks) == pytest.approx(25.0)
    focused = np.zeros_like(attn)
    focused[:, :, 0, 1] = 1.0  # all CLS attention on token (0, 0), inside the lesion
    assert attention_in_lesion(focused, masks) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="attention"):
        attention_in_lesion(attn[:, :, :4, :4], masks)  # 3 tokens: no square grid
