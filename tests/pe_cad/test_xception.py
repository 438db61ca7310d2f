"""PE CAD stage-1 Xception / SeXception (``thrifty.methods.pe_cad.xception``): Chollet's parameter count, the
release's SE placement and cost, shapes, gradients, seeding, and the ``build_backbone`` switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thrifty.methods.pe_cad import stage1 as S
from thrifty.methods.pe_cad.xception import SeXception, SqueezeExcite, Xception, XceptionBlock

SMALL = 0.125  # width multiplier for the fast checks: 2048 -> 256 features


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _se_params(c: int, r: int = 16) -> int:
    """Parameters of one SE module on c channels: conv1x1 c -> c // r and back, both with bias."""
    h = c // r
    return c * h + h + h * c + c


# ----------------------------------------------------------------------------------------------------------------
# sizes


def test_xception_parameter_count_matches_chollet() -> None:
    m = Xception(num_classes=1000)
    trainable = S.count_parameters(m)
    bn_stats = sum(b.numel() for n, b in m.named_buffers() if n.endswith(("running_mean", "running_var")))
    # Keras' Xception(include_top=True): 22,910,480 params = 22,855,952 trainable + 54,528 BN moving statistics
    assert trainable == 22_855_952
    assert bn_stats == 54_528
    assert trainable + bn_stats == 22_910_480
    # the release's head: Linear(2048, 1)
    assert S.count_parameters(Xception()) == 22_855_952 - 2048 * 1000 - 1000 + 2048 + 1 == 20_809_001


def test_sexception_se_in_every_block_and_its_cost() -> None:
    x, se = Xception(), SeXception()
    assert not any(isinstance(mod, SqueezeExcite) for mod in x.modules())
    blocks = list(se.blocks)
    assert len(blocks) == 12 and all(isinstance(b, XceptionBlock) for b in blocks)  # entry 3, middle 8, exit 1
    outs = [[mod for mod in b.branch if isinstance(mod, torch.nn.BatchNorm2d)][-1].num_features for b in blocks]
    assert outs == [128, 256, 728] + [728] * 8 + [1024]
    for b, c in zip(blocks, outs):
        assert isinstance(b.se, SqueezeExcite)
        assert b.se.reduce.in_channels == c and b.se.reduce.out_channels == c // 16 and b.se.expand.out_channels == c
        assert not any(isinstance(mod, SqueezeExcite) for mod in b.branch.modules())  # after the branch's MaxPool
    assert not any(isinstance(mod, SqueezeExcite) for mod in se.exit.modules())  # none in the exit convolutions
    assert sum(isinstance(mod, SqueezeExcite) for mod in se.modules()) == 12
    extra = sum(_se_params(c) for c in outs)
    assert extra == 739_445
    assert S.count_parameters(se) == S.count_parameters(x) + extra == 21_548_446
    # the release's SE initialisation: weights N(0, 0.01), zero biases
    w = torch.cat(
        [b.se.reduce.weight.detach().flatten() for b in blocks]
        + [b.se.expand.weight.detach().flatten() for b in blocks]
    )
    assert abs(float(w.std()) - 0.01) < 5e-4 and abs(float(w.mean())) < 5e-4
    assert not any(b.se.reduce.bias.detach().any() or b.se.expand.bias.detach().any() for b in blocks)


def test_se_rescales_the_residual_branch_after_pooling() -> None:
    blk = XceptionBlock(8, 16, reps=2, stride=2, se_reduction=4).eval()
    assert isinstance(blk.branch[-1], torch.nn.MaxPool2d)
    x = torch.randn(2, 8, 9, 9, generator=gen())
    with torch.no_grad():
        y = blk(x)
        assert y.shape == (2, 16, 5, 5)
        branch, short = blk.branch(x), blk.shortcut(x)
        gate = torch.sigmoid(blk.se.expand(F.relu(blk.se.reduce(branch.mean(dim=(2, 3), keepdim=True)))))
        assert torch.allclose(y, branch * gate + short, atol=1e-6)
        blk.se.expand.bias.fill_(-50.0)  # gate closed: only the shortcut is left
        assert torch.allclose(blk(x), short, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# interface


@pytest.mark.parametrize("cls", [Xception, SeXception])
def test_shapes_at_small_width(cls: type[Xception]) -> None:
    m = cls(width=SMALL).eval()
    x = torch.rand(2, 3, 64, 64, generator=gen())
    with torch.no_grad():
        f = m.features(x)
        assert f.shape == (2, 256) and m.feature_dim == 256
        logits = m(x)
        assert logits.shape == (2,)
        assert torch.allclose(logits, m.classify(f), atol=1e-6)
        assert m.feature_map(x).shape == (2, m.map_channels, 64 // m.map_stride, 64 // m.map_stride)
        assert (m.feature_map(x) >= 0).all()  # rectified before pooling, as the release's ``logits``
        assert cls(width=SMALL, num_classes=3).eval()(x).shape == (2, 3)
        assert cls(width=SMALL, in_channels=1).eval()(x[:, :1]).shape == (2,)


# ----------------------------------------------------------------------------------------------------------------
# the stage-1 switch, at full width


@pytest.mark.parametrize(("name", "cls"), [("xception", Xception), ("sexception", SeXception)])
def test_full_backbones_through_builder(name: str, cls: type[Xception]) -> None:
    assert name in S.FULL_BACKBONES
    m = S.build_backbone(name, image_size=64, seed=0)
    assert type(m) is cls and m.feature_dim == 2048
    x = torch.rand(2, 3, 64, 64, generator=gen())
    m.eval()
    with torch.no_grad():
        f = m.features(x)
        assert f.shape == (2, 2048)  # the release's 2048-d penultimate features
        assert m(x).shape == (2,)
    feats, probs = S.extract_features(m, x, batch_size=2)
    assert feats.shape == (2, 2048) and probs.shape == (2,)
    assert torch.allclose(feats, f, atol=1e-5) and ((probs > 0) & (probs < 1)).all()
