"""PE CAD stage-1 VGG16 (``thrifty.methods.pe_cad.vgg``) and DRN-A-50 / DRN-D-54 (``thrifty.methods.pe_cad.drn``):
published parameter counts, the architectures' strides and dilations, shapes, gradients, seeding, Genesis
restoration, and the ``build_backbone`` / recipe-config switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.core.registry import load_config
from thrifty.methods.pe_cad import stage1 as S
from thrifty.methods.pe_cad import train as recipe
from thrifty.methods.pe_cad.drn import DRNA50, DRND54, DRNBottleneck
from thrifty.methods.pe_cad.pretrain import pretrain_restoration
from thrifty.methods.pe_cad.vgg import VGG16

SMALL = 0.125  # width multiplier for the fast checks


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def on_meta(cls: type[nn.Module], **kwargs) -> nn.Module:
    """A full-size model without allocating its weights (parameter counting only)."""
    with torch.device("meta"):
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# sizes, against published figures and an independent count from the architecture description


def _bn(c: int) -> int:
    return 2 * c


def _conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout  # every DRN conv is bias-free


def _bottleneck_stage(cin: int, planes: int, blocks: int) -> tuple[int, int]:
    """Parameters of ``blocks`` ResNet bottlenecks (1x1 - 3x3 - 1x1, x4 expansion, BN after each conv; a 1x1
    projection + BN on the first, whose input width always differs here). Dilation and stride cost nothing."""
    out = 4 * planes
    one = _conv(1, cin, planes) + _conv(3, planes, planes) + _conv(1, planes, out) + _bn(planes) * 2 + _bn(out)
    first = one + _conv(1, cin, out) + _bn(out)
    rest = (blocks - 1) * (one - _conv(1, cin, planes) + _conv(1, out, planes))
    return first + rest, out


def _drn_d_54_by_hand(num_classes: int) -> int:
    """fyu's DRN-D-54 from its description: layer0 conv7x7 3->16, layer1 conv3x3 16->16, layer2 conv3x3 16->32
    (each + BN), bottleneck layers of 3, 4, 6, 3 blocks on 64, 128, 256, 512 planes, layer7 conv3x3 2048->512,
    layer8 conv3x3 512->512 (each + BN), then a 1x1-conv classifier with bias."""
    n = _conv(7, 3, 16) + _bn(16) + _conv(3, 16, 16) + _bn(16) + _conv(3, 16, 32) + _bn(32)
    cin = 32
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        stage, cin = _bottleneck_stage(cin, planes, blocks)
        n += stage
    n += _conv(3, cin, 512) + _bn(512) + _conv(3, 512, 512) + _bn(512)
    return n + 512 * num_classes + num_classes


def test_vgg16_parameter_counts_match_torchvision_and_keras() -> None:
    # torchvision vgg16 / vgg16_bn with the 1000-class classifier
    assert S.count_parameters(on_meta(VGG16, num_classes=1000, head="mlp")) == 138_357_544
    assert S.count_parameters(on_meta(VGG16, num_classes=1000, head="mlp", batch_norm=True)) == 138_365_992
    release = on_meta(VGG16)
    # Keras VGG16(include_top=False): 14,714,688; the release's head Linear(25088, 1)
    assert S.count_parameters(release.body) == 14_714_688
    assert release.feature_dim == 25_088 and release.map_channels == 512
    assert S.count_parameters(release) == 14_714_688 + 25_088 + 1
    assert sum(isinstance(m, nn.Conv2d) for m in release.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in release.modules()) == 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in release.modules())  # torchvision's vgg16 has no BN


def test_drn_parameter_counts_match_resnet50_and_the_drn_readme() -> None:
    # DRN-A-50 only re-wires ResNet-50: torchvision resnet50 has 25,557,032 parameters (fyu/drn README: 25.6M)
    assert S.count_parameters(on_meta(DRNA50, num_classes=1000)) == 25_557_032
    d54 = S.count_parameters(on_meta(DRND54, num_classes=1000))
    assert d54 == _drn_d_54_by_hand(1000) == 35_809_176
    assert round(d54 / 1e5) == 358  # fyu/drn README: 35.8M
    # the release's heads: Linear(2048, 1) and Conv2d(512, 1, 1)
    assert S.count_parameters(on_meta(DRNA50)) == 25_557_032 - 2049 * 1000 + 2049
    assert S.count_parameters(on_meta(DRND54)) == _drn_d_54_by_hand(1)


def _dilations(layer: nn.Module) -> list[int]:
    return [m.dilation[0] for m in layer.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] == 3]


def test_drn_a_50_dilates_layers_3_and_4_after_their_first_block() -> None:
    m = on_meta(DRNA50)
    assert [len(layer) for layer in m.layers] == [3, 4, 6, 3]
    assert _dilations(m.layers[0]) == [1] * 3 and _dilations(m.layers[1]) == [1] * 4
    assert _dilations(m.layers[2]) == [1] + [2] * 5  # fyu's DRN_A: the first block of a layer is undilated
    assert _dilations(m.layers[3]) == [1] + [4] * 2
    strides = [max(c.stride[0] for c in layer.modules() if isinstance(c, nn.Conv2d)) for layer in m.layers]
    assert strides == [1, 2, 1, 1]


def test_drn_d_54_layout() -> None:
    m = on_meta(DRND54)
    convs = [c for c in m.stem if isinstance(c, nn.Conv2d)]  # layers 0-2
    assert [(c.kernel_size[0], c.stride[0], c.out_channels) for c in convs] == [(7, 1, 16), (3, 1, 16), (3, 2, 32)]
    blocks = [sum(isinstance(b, DRNBottleneck) for b in layer) for layer in m.layers]
    assert blocks == [3, 4, 6, 3, 0, 0]  # layers 3-6 residual, 7-8 plain convolutions
    assert _dilations(m.layers[0]) == [1] * 3 and _dilations(m.layers[1]) == [1] * 4
    assert _dilations(m.layers[2]) == [2] * 6 and _dilations(m.layers[3]) == [4] * 3  # every block (new_level=False)
    assert _dilations(m.layers[4]) == [2] and _dilations(m.layers[5]) == [1]  # degridding
    assert m.feature_dim == m.map_channels == 512


# ----------------------------------------------------------------------------------------------------------------
# interface


@pytest.mark.parametrize(("cls", "dim", "stride"), [(VGG16, 64 * 49, 32), (DRNA50, 256, 8), (DRND54, 64, 8)])
def test_shapes_at_small_width(cls: type[nn.Module], dim: int, stride: int) -> None:
    m = cls(width=SMALL).eval()
    assert (m.feature_dim, m.map_stride) == (dim, stride)
    x = torch.rand(2, 3, 64, 64, generator=gen())
    with torch.no_grad():
        f = m.features(x)
        assert f.shape == (2, dim)
        logits = m(x)
        assert logits.shape == (2,)
        assert torch.allclose(logits, m.classify(f), atol=1e-6)
        fmap = m.feature_map(x)
        assert fmap.shape == (2, m.map_channels, 64 // stride, 64 // stride)
        assert (fmap >= 0).all()
        assert cls(width=SMALL, num_classes=3).eval()(x).shape == (2, 3)
        assert cls(width=SMALL, in_channels=1).eval()(x[:, :1]).shape == (2,)
    feats, probs = S.extract_features(m, x, batch_size=1)
    assert feats.shape == (2, dim) and torch.allclose(feats, f, atol=1e-5)
    assert torch.allclose(probs, torch.sigmoid(logits), atol=1e-5)


def test_vgg16_heads_and_pooling() -> None:
    x = torch.rand(2, 3, 64, 64, generator=gen())
    with torch.no_grad():
        m = VGG16(width=SMALL).eval()
        fmap = m.feature_map(x)  # 2x2: the adaptive pool repeats cells to 7x7, as torchvision
        assert torch.allclose(m.features(x), F.adaptive_avg_pool2d(fmap, 7).flatten(1))
        gap = VGG16(width=SMALL, pool_size=1).eval()
        assert gap.feature_dim == 64 and gap.features(x).shape == (2, 64)
        mlp = VGG16(width=SMALL, head="mlp").eval()
        assert mlp.feature_dim == 512 and mlp.features(x).shape == (2, 512) and mlp(x).shape == (2,)
        assert (mlp.features(x) >= 0).all()  # after the second hidden ReLU
        bn = VGG16(width=SMALL, batch_norm=True)
        assert sum(isinstance(b, nn.BatchNorm2d) for b in bn.modules()) == 13
    with pytest.raises(ValueError):
        VGG16(head="conv")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        VGG16(width=0)


@pytest.mark.parametrize("name", ["vgg16", "drn_a_50", "drn_d_54"])
def test_genesis_restoration_runs_on_the_feature_map(name: str) -> None:
    m = S.build_backbone(name, image_size=32, seed=0, width=SMALL)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = pretrain_restoration(m, torch.rand(4, 3, 32, 32, generator=gen()), steps=1, batch_size=4, seed=0)
    assert len(res.losses) == 1 and torch.isfinite(torch.tensor(res.losses)).all()
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# the stage-1 switch and the recipe config, at full width


@pytest.mark.parametrize(
    ("name", "cls", "dim", "stride"),
    [("vgg16", VGG16, 25_088, 32), ("drn_a_50", DRNA50, 2048, 8), ("drn_d_54", DRND54, 512, 8)],
)
def test_full_backbones_through_builder_and_config(name: str, cls: type[nn.Module], dim: int, stride: int) -> None:
    assert name in S.FULL_BACKBONES
    _, cfg = load_config("pe_cad", "smoke", [f"stage1.cnn={name}"])  # passes the config's validation
    assert cfg.stage1.cnn == name and recipe.backbone_spec(cfg, "cnn") == (name, {})
    m = recipe.build_stage1_model(cfg, "cnn", seed=0)
    assert type(m) is cls and (m.feature_dim, m.map_stride) == (dim, stride)
    ref = S.build_backbone(name, image_size=cfg.stage1.image_size, seed=0)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    x = torch.rand(1, 3, 32, 32, generator=gen())
    m.eval()
    with torch.no_grad():
        assert m.features(x).shape == (1, dim) and m(x).shape == (1,)


def test_config_rejects_unknown_cnn() -> None:
    with pytest.raises(ValueError, match=r"stage1\.cnn"):
        load_config("pe_cad", "smoke", ["stage1.cnn=vgg19"])
