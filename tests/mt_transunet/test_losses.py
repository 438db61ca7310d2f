"""The card's loss tests: ramp values, masked vs unmasked images, consistency, optional terms, failure modes."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from thrifty.methods.mt_transunet.losses import (
    ac_loss,
    att_loss,
    cls_ce,
    consistency_loss,
    cs_loss,
    ds_loss,
    mt_loss,
    ramp_weight,
    release_seg_ce,
    resize_mask,
    sdf_loss,
    seg_ce,
)

B, H, G, HEADS, LAYERS, C = 4, 16, 4, 2, 3, 3


def _batch(seed: int = 0, *, requires_grad: bool = True):
    """A fake model output and targets: images 0-1 masked, 2-3 not."""
    gen = torch.Generator().manual_seed(seed)
    n = G * G + 1
    out = SimpleNamespace(
        cls_logits=torch.randn(B, C, generator=gen),
        seg_logits=torch.randn(B, 2, H, H, generator=gen),
        sdf=torch.tanh(torch.randn(B, 1, H, H, generator=gen)),
        ds_logits=torch.randn(B, 2, G, G, generator=gen),
        attentions=[torch.randn(B, HEADS, n, n, generator=gen).softmax(-1) for _ in range(LAYERS)],
    )
    if requires_grad:
        for name in ("cls_logits", "seg_logits", "sdf", "ds_logits"):
            getattr(out, name).requires_grad_(True)
        for a in out.attentions:
            a.requires_grad_(True)
    masks = (torch.rand(B, H, H, generator=gen) > 0.5).long()
    sdf_gt = torch.rand(B, H, H, generator=gen) * 2 - 1
    has_mask = torch.tensor([True, True, False, False])
    labels = torch.randint(0, C, (B,), generator=gen)
    return out, dict(masks=masks, sdf_gt=sdf_gt, has_mask=has_mask, labels=labels)


FULL = dict(use_seg=True, use_cls=True, use_dual=True, ramp=0.7, att_weight=0.3, cs_weight=0.2, ac_weight=0.1,
            ds_weight=0.4)  # fmt: skip


def test_ramp_values():
    assert ramp_weight(0) == pytest.approx(math.exp(-5)) == pytest.approx(0.0067, abs=1e-4)
    assert ramp_weight(40) == 1.0 and ramp_weight(100) == 1.0 and ramp_weight(-3) == ramp_weight(0)
    assert ramp_weight(20) == pytest.approx(math.exp(-5 * 0.25))
    values = [ramp_weight(e) for e in torch.linspace(0, 40, 41).tolist()]
    assert all(b > a for a, b in itertools.pairwise(values))
    assert ramp_weight(3, length=0) == 1.0 and ramp_weight(5, length=10) == pytest.approx(math.exp(-5 * 0.25))


def test_seg_ce_perfect_and_uniform():
    masks = (torch.rand(2, 8, 8) > 0.5).long()
    has = torch.tensor([True, True])
    perfect = F.one_hot(masks, 2).permute(0, 3, 1, 2).float() * 40 - 20
    assert float(seg_ce(perfect, masks, has)) < 1e-6
    assert float(seg_ce(torch.zeros(2, 2, 8, 8), masks, has)) == pytest.approx(math.log(2))


def test_seg_ce_without_masked_images_is_attached_zero():
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    loss = seg_ce(logits, torch.zeros(2, 8, 8), torch.tensor([False, False]))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_release_seg_ce_is_a_width_softmax_halved():
    masks = (torch.rand(2, 8, 8) > 0.5).long()
    has = torch.tensor([True, True])
    # uniform logits: log_softmax over the width is -ln 8 everywhere; each pixel has one target of 1 over 2 channels
    assert float(release_seg_ce(torch.zeros(2, 2, 8, 8), masks, has)) == pytest.approx(math.log(8) / 2)


def test_consistency_zero_when_seg_matches_sdf_and_large_when_flipped():
    inside = torch.zeros(2, 8, 8, dtype=torch.bool)
    inside[:, 2:6, 2:6] = True
    sdf = torch.where(inside, -0.5, 0.5)[:, None]
    matched = torch.stack((~inside, inside), 1).float() * 40 - 20
    assert float(consistency_loss(matched, sdf, on="probs")) < 1e-8
    assert float(consistency_loss(-matched, sdf, on="probs")) > 0.99
    # the release compares with raw logits: a soft mask of exactly 0/1 is matched by logits 0/1
    assert float(consistency_loss(torch.stack((~inside, inside), 1).float(), sdf, on="logits")) < 1e-8
    assert float(consistency_loss(matched, sdf, on="logits")) > 100


def test_consistency_probs_differs_from_logits_and_rejects_other_modes():
    out, _ = _batch()
    a = consistency_loss(out.seg_logits, out.sdf, on="probs")
    b = consistency_loss(out.seg_logits, out.sdf, on="logits")
    assert not torch.isclose(a, b)
    with pytest.raises(ValueError):
        consistency_loss(out.seg_logits, out.sdf, on="softmax")


def test_consistency_reaches_both_heads():
    out, _ = _batch()
    sdf = (torch.rand(B, 1, H, H) * 2e-3 - 1e-3).requires_grad_(True)  # near the boundary, where σ(-1500 x) moves
    consistency_loss(out.seg_logits, sdf).backward()
    assert out.seg_logits.grad.abs().sum() > 0 and sdf.grad.abs().sum() > 0


def test_sdf_loss_uses_masked_images_only():
    pred = torch.zeros(2, 1, 4, 4)
    gt = torch.stack((torch.full((4, 4), 0.5), torch.full((4, 4), float("nan"))))
    assert float(sdf_loss(pred, gt, torch.tensor([True, False]))) == pytest.approx(0.25)


def test_cls_ce_matches_cross_entropy():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(cls_ce(logits, labels), F.cross_entropy(logits, labels))
    assert not torch.allclose(cls_ce(logits, labels, label_smoothing=0.1), F.cross_entropy(logits, labels))


def test_unmasked_images_masks_and_sdf_change_nothing():
    out, t = _batch()
    base = mt_loss(out, **t, **FULL).floats()
    t2 = dict(t)
    t2["masks"] = t["masks"].clone()
    t2["masks"][2:] = 1 - t2["masks"][2:]
    t2["sdf_gt"] = t["sdf_gt"].clone()
    t2["sdf_gt"][2:] = float("nan")
    assert mt_loss(out, **t2, **FULL).floats() == base
    t2["masks"][0] = 1 - t2["masks"][0]  # a masked image's mask does count
    changed = mt_loss(out, **t2, **FULL).floats()
    assert all(changed[k] != base[k] for k in ("seg", "att", "ds"))


def test_unmasked_images_still_feed_cls_and_consistency():
    out, t = _batch()
    base = mt_loss(out, **t, **FULL).floats()
    out2, _ = _batch()
    out2.cls_logits = out.cls_logits.detach().clone()
    out2.cls_logits[3] += torch.tensor([3.0, -2.0, 1.0])
    out2.sdf = out.sdf.detach().clone()
    out2.sdf[3] = -out2.sdf[3]
    changed = mt_loss(out2, **t, **FULL).floats()
    assert changed["cls"] != base["cls"] and changed["cons"] != base["cons"]
    assert changed["seg"] == base["seg"] and changed["sdf"] == base["sdf"]


def test_cls_only_is_exactly_weighted_cls_ce():
    out, t = _batch()
    parts = mt_loss(out, **t, use_seg=False, use_cls=True, use_dual=False, ramp=1.0, cls_weight=0.25)
    assert torch.equal(parts.total, 0.25 * F.cross_entropy(out.cls_logits, t["labels"]))
    assert all(v == 0.0 for k, v in parts.floats().items() if k not in ("total", "cls"))
    parts.total.backward()
    assert out.cls_logits.grad is not None
    assert out.seg_logits.grad is None and out.sdf.grad is None and out.ds_logits.grad is None


def test_default_total_matches_the_formula():
    out, t = _batch()
    p = mt_loss(out, **t, use_seg=True, use_cls=True, use_dual=True, ramp=0.3)
    expected = p.seg + 0.3 * p.cons + 5.0 * p.sdf + 0.25 * p.cls
    assert torch.allclose(p.total, expected)
    assert p.att == 0 and p.cs == 0 and p.ac == 0 and p.ds == 0


@pytest.mark.parametrize(
    ("flags", "used", "unused"),
    [
        (dict(use_seg=True, use_cls=False, use_dual=False), {"seg_logits"}, {"sdf", "cls_logits", "ds_logits"}),
        (dict(use_seg=True, use_cls=True, use_dual=False), {"seg_logits", "cls_logits"}, {"sdf", "ds_logits"}),
        (dict(use_seg=True, use_cls=False, use_dual=True), {"seg_logits", "sdf"}, {"cls_logits", "ds_logits"}),
        (dict(use_seg=False, use_cls=False, use_dual=False, ds_weight=1.0), {"ds_logits"}, {"seg_logits", "sdf"}),
    ],
)
def test_gradients_reach_used_inputs_only(flags, used, unused):
    out, t = _batch()
    sdf_leaf = (torch.rand(B, 1, H, H) * 2e-3 - 1e-3).requires_grad_(True)
    out.sdf = sdf_leaf
    mt_loss(out, **t, ramp=1.0, **flags).total.backward()
    for name in used:
        assert getattr(out, name).grad is not None and getattr(out, name).grad.abs().sum() > 0, name
    for name in unused:
        assert getattr(out, name).grad is None, name
    assert all(a.grad is None for a in out.attentions)


def test_optional_terms_reach_the_attention_maps():
    out, t = _batch()
    mt_loss(out, **t, use_seg=False, use_cls=False, use_dual=False, ramp=1.0, att_weight=1.0).total.backward()
    assert out.attentions[0].grad.abs().sum() > 0 and out.attentions[-1].grad is None
    out, t = _batch()
    mt_loss(out, **t, use_seg=False, use_cls=False, use_dual=False, ramp=1.0, cs_weight=1.0).total.backward()
    assert out.attentions[-1].grad.abs().sum() > 0 and out.seg_logits.grad.abs().sum() > 0


def _uniform_attention(b: int, g: int) -> torch.Tensor:
    n = g * g + 1
    return torch.full((b, 2, n, n), 1.0 / n)


def test_att_loss_uniform_attention():
    g = 4
    masks = torch.zeros(3, 8, 8)
    masks[:, :4, :] = 1  # top half lesion: 8 of 16 grid cells outside
    has = torch.tensor([True, True, False])
    value = att_loss(_uniform_attention(3, g), masks, has)
    assert float(value) == pytest.approx(2 * 8 / (g * g + 1))
    assert float(att_loss(_uniform_attention(3, g), masks, torch.tensor([False] * 3))) == 0.0


def test_att_loss_uses_the_first_map_in_mt_loss():
    out, t = _batch()
    p = mt_loss(out, **t, use_seg=False, use_cls=False, use_dual=False, ramp=1.0, att_weight=1.0)
    assert torch.equal(p.att, att_loss(out.attentions[0], t["masks"], t["has_mask"]))
    assert not torch.equal(p.att, att_loss(out.attentions[-1], t["masks"], t["has_mask"]))


def test_cs_and_ac_known_values():
    b, g = 2, 4
    n = g * g
    attn = _uniform_attention(b, g)
    a_hat = (1 / (n + 1)) / (b * n / (n + 1) + 1e-3)  # the per-cell normalised attention
    seg = torch.zeros(b, 2, 8, 8)  # uniform foreground logit -> target 1/n per cell, foreground probability 0.5
    assert float(cs_loss(attn, seg)) == pytest.approx(b * n * (a_hat - 1 / n) ** 2, rel=1e-5)
    assert float(ac_loss(attn, seg)) == pytest.approx(-b * n * a_hat * 0.5, rel=1e-5)


def test_cs_resizes_the_foreground_logit_bilinearly():
    g = 4
    seg = torch.randn(1, 2, 8, 8)
    attn = _uniform_attention(1, g)
    a_hat = (1 / (g * g + 1)) / (g * g / (g * g + 1) + 1e-3)
    target = F.avg_pool2d(seg[:, 1:2], 2).flatten(1).softmax(1)  # 8 -> 4 bilinear (align_corners=False) = 2×2 mean
    assert float(cs_loss(attn, seg)) == pytest.approx(float(((a_hat - target) ** 2).sum()), rel=1e-5)


def test_ds_loss_known_values_and_nearest_resize():
    masks = torch.zeros(2, 8, 8)
    masks[:, ::2, ::2] = 1  # nearest 8 -> 4 picks the even pixels: all foreground
    assert torch.equal(resize_mask(masks, 4), torch.ones(2, 4, 4))
    has = torch.tensor([True, False])
    assert float(ds_loss(torch.zeros(2, 2, 4, 4), masks, has)) == pytest.approx(math.log(2))
    logits = torch.zeros(2, 2, 4, 4)
    logits[:, 1] = 30.0
    assert float(ds_loss(logits, masks, has)) < 1e-6


def test_all_terms_off_raises():
    out, t = _batch()
    with pytest.raises(ValueError, match="every loss term is off"):
        mt_loss(out, **t, use_seg=False, use_cls=False, use_dual=False, ramp=1.0)


def test_non_finite_total_raises_naming_the_term():
    out, t = _batch(requires_grad=False)
    out.cls_logits[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="cls=nan"):
        mt_loss(out, **t, use_seg=True, use_cls=True, use_dual=True, ramp=1.0)
    # a NaN in an unused term's input is harmless
    assert math.isfinite(mt_loss(out, **t, use_seg=True, use_cls=False, use_dual=True, ramp=1.0).floats()["total"])


def test_floats_lists_every_term():
    out, t = _batch()
    values = mt_loss(out, **t, **FULL).floats()
    assert set(values) == {"total", "seg", "sdf", "cons", "cls", "att", "cs", "ac", "ds"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values())


def test_seg_ce_form_selects_the_release_term():
    out, t = _batch(requires_grad=False)
    flags = dict(use_seg=True, use_cls=False, use_dual=False, ramp=0.0)
    channel = mt_loss(out, **t, **flags).seg
    release = mt_loss(out, **t, **flags, seg_ce_form="release").seg
    assert float(channel) == pytest.approx(float(seg_ce(out.seg_logits, t["masks"], t["has_mask"])))
    assert float(release) == pytest.approx(float(release_seg_ce(out.seg_logits, t["masks"], t["has_mask"])))
    assert float(channel) != pytest.approx(float(release))
    with pytest.raises(ValueError, match="seg_ce_form"):
        mt_loss(out, **t, **flags, seg_ce_form="width")
