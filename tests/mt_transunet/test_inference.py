"""Test-time augmentation and the release's random resize: exact inverses, invariances, shapes."""

from __future__ import annotations

import pytest
import torch

from thrifty.methods.mt_transunet.augment import random_resize
from thrifty.methods.mt_transunet.inference import VIEWS, infer
from thrifty.methods.mt_transunet.model import MTOutput


class PixelModel(torch.nn.Module):
    """Segments by the red channel and classifies by the mean colour: every view and scale must agree."""

    def forward(self, x: torch.Tensor) -> MTOutput:
        fg = (x[:, :1] - 0.5) * 20
        seg = torch.cat([-fg, fg], 1)
        cls = x.mean((2, 3))
        b, _, h, w = x.shape
        return MTOutput(cls_logits=cls, seg_logits=seg, sdf=torch.zeros(b, 1, h, w), ds_logits=torch.zeros(b, 2, 1, 1),
                        attentions=[])  # fmt: skip


class CornerModel(PixelModel):
    """Marks the top-left quadrant whatever the image: orientation-dependent, so views disagree."""

    def forward(self, x: torch.Tensor) -> MTOutput:
        out = super().forward(x)
        fg = torch.full_like(out.seg_logits[:, :1], -10.0)
        h, w = x.shape[-2:]
        fg[..., : h // 2, : w // 2] = 10.0
        out.seg_logits = torch.cat([-fg, fg], 1)
        return out


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    x[:, 0] = 0.0
    x[:, 0, 3:9, 5:12] = 1.0  # an off-centre lesion in the red channel
    return x


def test_views_are_exact_inverses():
    x = torch.rand(2, 1, 6, 6)
    for fwd, inv in VIEWS:
        assert torch.equal(inv(fwd(x)), x)
    assert len({tuple(fwd(x).flatten().tolist()) for fwd, _ in VIEWS}) == 6  # six distinct views


def test_plain_inference_shapes_and_probabilities():
    seg, cls = infer(PixelModel(), _images(), batch_size=2)
    assert seg.shape == (3, 16, 16) and cls.shape == (3, 3)
    assert ((seg >= 0) & (seg <= 1)).all() and abs(cls.sum(1) - 1).max() < 1e-5


def test_views_of_an_equivariant_model_change_nothing():
    x = _images()
    plain = infer(PixelModel(), x)
    tta = infer(PixelModel(), x, views=True)
    assert abs(plain[0] - tta[0]).max() < 1e-5 and abs(plain[1] - tta[1]).max() < 1e-5


def test_views_are_mapped_back_before_averaging():
    seg, _ = infer(CornerModel(), _images(), views=True)
    # each view marks its own top-left quadrant; mapped back, the identity lands on the top-left, the half-turn on
    # the bottom-right (one view each), the quarter-turns and flips on the other two corners (two views each).
    # Unmapped, all six would mark the top-left.
    tl, tr, bl, br = seg[0, :8, :8].mean(), seg[0, :8, 8:].mean(), seg[0, 8:, :8].mean(), seg[0, 8:, 8:].mean()
    assert abs(tl - br) < 1e-6 and abs(tr - bl) < 1e-6
    assert tr > tl
    # logits are averaged before the softmax (the release sums them): +10 in 2 views, -10 in 4 -> mean -10/3
    assert tr == pytest.approx(float(torch.sigmoid(torch.tensor(2 * -10 / 3))), rel=1e-4)


def test_multi_scale_returns_the_input_side():
    seg, cls = infer(PixelModel(), _images(), sizes=[16, 24, 32])
    assert seg.shape == (3, 16, 16) and cls.shape == (3, 3)
    inside = seg[:, 4:8, 6:11].min()
    outside = seg[:, 12:, :4].max()
    assert inside > 0.9 and outside < 0.1


def test_random_resize_resizes_the_batch_and_keeps_masks_binary():
    images = torch.rand(4, 3, 16, 16)
    masks = torch.zeros(4, 16, 16, dtype=torch.long)
    masks[:, 4:12, 4:12] = 1
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        i, m = random_resize(images, masks, sizes=[16, 24, 32], generator=gen)
        assert i.shape[-1] == m.shape[-1] and i.shape[0] == 4 and m.dtype == masks.dtype
        assert set(m.unique().tolist()) <= {0, 1}
        frac = m.float().mean().item()
        assert abs(frac - 0.25) < 0.05  # the lesion keeps its share of the image
        seen.add(i.shape[-1])
    assert seen == {16, 24, 32}
    same = random_resize(images, masks, sizes=[], generator=gen)
    assert same[0] is images and same[1] is masks


def test_class_logits_are_averaged_over_views_and_summed_over_scales():
    x = _images()
    _, plain = infer(PixelModel(), x)
    _, two_scales = infer(PixelModel(), x, sizes=[16, 16], views=True)
    logits = x.mean((2, 3))
    assert abs(plain - logits.softmax(1).numpy()).max() < 1e-5
    assert abs(two_scales - (2 * logits).softmax(1).numpy()).max() < 1e-5  # the release's Σ over scales
