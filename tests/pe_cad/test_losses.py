"""The RSNA competition-weighted BCE: hand-computed values, ln 2 at probability ½, padding, weights, normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.methods.pe_cad.losses import (
    DEFAULT_IMAGE_WEIGHT,
    image_weights,
    resolve_exam_weights,
    rsna_weighted_bce,
    rsna_weighted_log_loss,
)
from thrifty.methods.pe_cad.stage2 import EXAM_LABELS, Stage2Output

LN2 = math.log(2.0)


def _bce(z: float, y: float) -> float:
    """BCE-with-logits by hand: log(1 + e^z) − y·z."""
    return math.log1p(math.exp(z)) - y * z


def _hand_case(*, requires_grad: bool = False):
    """One exam, L = 4, three valid slices (labels 1, 0, 0), the padded row holding a large logit and label 1."""
    slice_logits = torch.tensor([[2.0, -1.0, 0.0, 50.0]], requires_grad=requires_grad)
    exam_logits = torch.zeros(1, 9)
    exam_logits[0, 0] = 1.0
    exam_logits.requires_grad_(requires_grad)
    out = Stage2Output(slice_logits=slice_logits, exam_logits=exam_logits, attention=torch.zeros(1, 4))
    slice_labels = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    exam_labels = torch.tensor([[0.0, 0, 1, 1, 0, 1, 0, 0, 0]])
    valid = torch.tensor([[True, True, True, False]])
    return out, slice_labels, exam_labels, valid


SLICE_BCE = _bce(2.0, 1.0) + _bce(-1.0, 0.0) + _bce(0.0, 0.0)
EXAM_BCE = [_bce(1.0, 0.0)] + [LN2] * 8


def test_hand_computed_metric_value():
    out, ys, ye, valid = _hand_case()
    parts = rsna_weighted_bce(out, ys, ye, valid)
    w = DEFAULT_IMAGE_WEIGHT / 3  # one positive slice out of three
    image_num, image_den = w * SLICE_BCE, 3 * w
    exam_num, exam_den = sum(EXAM_BCE) / 9, 1.0  # uniform ω_k = 1/9
    assert parts.total.item() == pytest.approx((image_num + exam_num) / (image_den + exam_den), rel=1e-6)
    assert parts.image.item() == pytest.approx(SLICE_BCE / 3, rel=1e-6)
    assert parts.exam.item() == pytest.approx(sum(EXAM_BCE) / 9, rel=1e-6)
    assert float(parts.image_weight_sum) == pytest.approx(DEFAULT_IMAGE_WEIGHT)
    assert float(parts.exam_weight_sum) == pytest.approx(1.0)
    torch.testing.assert_close(parts.per_label, torch.tensor(EXAM_BCE))


def test_hand_computed_release_value_and_length_adjustment():
    out, ys, ye, valid = _hand_case()
    w = DEFAULT_IMAGE_WEIGHT / 3
    parts = rsna_weighted_bce(out, ys, ye, valid, normalisation="release")
    assert parts.image.item() == pytest.approx(w * SLICE_BCE / 3, rel=1e-6)  # Σ w·BCE / #valid rows
    assert parts.exam.item() == pytest.approx(sum(EXAM_BCE) / 9, rel=1e-6)
    assert parts.total.item() == pytest.approx(parts.image.item() + parts.exam.item(), rel=1e-6)
    # 8 original slices fitted to L = 4: the image weight doubles (S / L), the ratio is the original one
    adj = rsna_weighted_bce(out, ys, ye, valid, num_slices=torch.tensor([8]), positive_ratio=torch.tensor([1 / 3]))
    expected = (2 * w * SLICE_BCE + sum(EXAM_BCE) / 9) / (2 * 3 * w + 1.0)
    assert adj.total.item() == pytest.approx(expected, rel=1e-6)
    short = rsna_weighted_bce(out, ys, ye, valid, num_slices=torch.tensor([3]))
    assert short.total.item() == pytest.approx(float(rsna_weighted_bce(out, ys, ye, valid).total), rel=1e-7)


@pytest.mark.parametrize("normalisation", ["metric", "release"])
def test_uniform_predictions_give_ln2(normalisation):
    gen = torch.Generator().manual_seed(0)
    b, n = 5, 12
    valid = torch.arange(n) < torch.tensor([12, 3, 7, 1, 12])[:, None]
    out = Stage2Output(slice_logits=torch.zeros(b, n), exam_logits=torch.zeros(b, 9), attention=torch.zeros(b, n))
    ys = (torch.rand(b, n, generator=gen) > 0.5).float()
    ye = (torch.rand(b, 9, generator=gen) > 0.5).float()
    weights = {name: float(i + 1) for i, name in enumerate(EXAM_LABELS)}
    parts = rsna_weighted_bce(out, ys, ye, valid, exam_weights=weights, num_slices=torch.tensor([30, 3, 7, 1, 12]),
                              normalisation=normalisation)  # fmt: skip
    if normalisation == "metric":
        assert parts.total.item() == pytest.approx(LN2, rel=1e-6)
        assert parts.image.item() == pytest.approx(LN2, rel=1e-6)
        assert parts.exam.item() == pytest.approx(LN2, rel=1e-6)
    else:
        assert parts.exam.item() == pytest.approx(LN2 * sum(weights.values()), rel=1e-6)


def test_padded_slices_contribute_nothing():
    out, ys, ye, valid = _hand_case(requires_grad=True)
    ref = rsna_weighted_bce(out, ys, ye, valid)
    ref.total.backward()
    assert out.slice_logits.grad[0, 3] == 0
    assert torch.all(out.slice_logits.grad[0, :3] != 0)
    for pad_logit, pad_label in ((-1e4, 1.0), (float("nan"), 0.0), (float("inf"), 0.5)):
        logits = out.slice_logits.detach().clone()
        logits[0, 3] = pad_logit
        logits.requires_grad_(True)
        labels = ys.clone()
        labels[0, 3] = pad_label
        poisoned = Stage2Output(slice_logits=logits, exam_logits=out.exam_logits.detach(), attention=out.attention)
        parts = rsna_weighted_bce(poisoned, labels, ye, valid)
        assert parts.total.item() == pytest.approx(ref.total.item(), rel=1e-7)
        parts.total.backward()
        assert logits.grad[0, 3] == 0 and torch.isfinite(logits.grad).all()


def test_exam_weights_follow_the_label_names():
    out, ys, ye, valid = _hand_case()
    only_negative = {name: 0.0 for name in EXAM_LABELS} | {"negative_exam_for_pe": 1.0}
    parts = rsna_weighted_bce(out, ys, ye, valid, exam_weights=only_negative, image_weight=0.0)
    assert parts.total.item() == pytest.approx(EXAM_BCE[0], rel=1e-6)
    as_list = rsna_weighted_bce(out, ys, ye, valid, exam_weights=[1.0] + [0.0] * 8, image_weight=0.0)
    assert as_list.total.item() == pytest.approx(EXAM_BCE[0], rel=1e-6)
    torch.testing.assert_close(resolve_exam_weights(None, 9), torch.full((9,), 1 / 9))
    with pytest.raises(ValueError, match="missing"):
        resolve_exam_weights({"negative_exam_for_pe": 1.0}, 9)
    with pytest.raises(ValueError, match="unknown"):
        resolve_exam_weights({**dict.fromkeys(EXAM_LABELS, 1.0), "pe_present_on_image": 1.0}, 9)
    with pytest.raises(ValueError, match="expected 9"):
        resolve_exam_weights([1.0] * 8, 9)
    with pytest.raises(ValueError, match=">= 0"):
        resolve_exam_weights([-1.0] + [1.0] * 8, 9)
    with pytest.raises(ValueError, match="normalisation"):
        rsna_weighted_bce(out, ys, ye, valid, normalisation="mean")


def test_image_weight_zero_trains_on_exam_labels_only():
    out, ys, ye, valid = _hand_case(requires_grad=True)
    parts = rsna_weighted_bce(out, ys, ye, valid, image_weight=0.0)
    parts.total.backward()
    assert torch.all(out.slice_logits.grad == 0)
    assert parts.total.item() == pytest.approx(sum(EXAM_BCE) / 9, rel=1e-6)


def test_negative_exams_have_no_image_weight():
    out, _, ye, valid = _hand_case()
    parts = rsna_weighted_bce(out, torch.zeros(1, 4), ye, valid)
    assert float(parts.image_weight_sum) == 0 and parts.image.item() == 0
    assert parts.total.item() == pytest.approx(sum(EXAM_BCE) / 9, rel=1e-6)


def test_positive_ratio_defaults_to_the_valid_label_mean():
    ys = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    torch.testing.assert_close(image_weights(ys, valid, image_weight=1.0), torch.tensor([0.5, 0.25]))
    given = image_weights(ys, valid, image_weight=2.0, positive_ratio=torch.tensor([0.1, 0.2]),
                          num_slices=torch.tensor([2, 12]))  # fmt: skip
    torch.testing.assert_close(given, torch.tensor([0.2, 0.4 * 3]))


def test_parts_average_their_bces():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 9, generator=gen), torch.randn(2, 9, generator=gen)
    sa, sb = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    ys, ye = (torch.rand(2, 6, generator=gen) > 0.5).float(), (torch.rand(2, 9, generator=gen) > 0.5).float()
    valid = torch.ones(2, 6, dtype=torch.bool)
    kw = dict(positive_ratio=torch.tensor([0.5, 0.5]))

    def single(s, e):
        return rsna_weighted_bce(Stage2Output(s, e, torch.zeros(2, 6)), ys, ye, valid, **kw)

    both = Stage2Output(sa, a, torch.zeros(2, 6), slice_logits_parts=torch.stack((sa, sb), 1),
                        exam_logits_parts=torch.stack((a, b), 1))  # fmt: skip
    parts = rsna_weighted_bce(both, ys, ye, valid, **kw)
    pa, pb = single(sa, a), single(sb, b)  # the metric is linear in the BCEs at fixed weights
    assert parts.total.item() == pytest.approx(0.5 * (pa.total.item() + pb.total.item()), rel=1e-6)


def test_original_resolution_metric_matches_the_batch_loss_on_padded_exams():
    gen = torch.Generator().manual_seed(3)
    lengths, n = [5, 9, 2], 10
    valid = torch.arange(n) < torch.tensor(lengths)[:, None]
    ys = (torch.rand(3, n, generator=gen) > 0.6).float() * valid
    ys[2] = 0  # a negative exam
    ye = (torch.rand(3, 9, generator=gen) > 0.5).float()
    out = Stage2Output(torch.randn(3, n, generator=gen), torch.randn(3, 9, generator=gen), torch.zeros(3, n))
    weights = {name: 0.05 * (i + 1) for i, name in enumerate(EXAM_LABELS)}
    batch = rsna_weighted_bce(out, ys, ye, valid, exam_weights=weights)
    metric = rsna_weighted_log_loss(
        [out.slice_logits[i, :s].sigmoid() for i, s in enumerate(lengths)],
        [ys[i, :s] for i, s in enumerate(lengths)],
        out.exam_logits.sigmoid(),
        ye,
        exam_weights=weights,
    )
    assert metric == pytest.approx(batch.total.item(), rel=1e-5)


def test_floats_names_the_labels():
    out, ys, ye, valid = _hand_case()
    floats = rsna_weighted_bce(out, ys, ye, valid).floats()
    assert {"total", "image", "exam", "image_weight_sum", "exam_weight_sum"} <= floats.keys()
    assert floats["exam/negative_exam_for_pe"] == pytest.approx(EXAM_BCE[0], rel=1e-6)
