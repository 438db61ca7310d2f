"""Dilated residual networks DRN-A-50 and DRN-D-54, two of the PE CAD release's stage-1 backbones.

Written from a reading of, with no code copied:

* Yu, Koltun & Funkhouser, *Dilated Residual Networks* (CVPR 2017, arXiv 1705.09914) and its code ``fyu/drn``
  ``drn.py`` (``Bottleneck``, ``DRN`` with ``arch='D'``, ``DRN_A``, ``drn_a_50``, ``drn_d_54``) and ``README.md``
  (the parameter table: DRN-A-50 25.6M, DRN-D-54 35.8M).
* ``Nahid1992/CAD_PE`` ``first_stage/drn_copiedModel.py``: fyu's ``drn.py`` with one change, ``DRN_A.avgpool``
  ``nn.AvgPool2d(28, stride=1)`` → ``nn.AdaptiveAvgPool2d((1, 1))``; and ``first_stage/train1.py``
  ``transferLearningModels``: ``"drn_a_50"`` → ``drn_a_50(pretrained)`` with ``fc = nn.Linear(2048, 1)``;
  ``"drn_d_54"`` → ``drn_d_54(pretrained)`` with ``fc = nn.Conv2d(512, 1, kernel_size=1)``. (Its wrapper classes
  ``DRN_A_50`` / ``DRN_D_54`` call a ``features`` method the DRN classes do not have and are never used.)
  ``save_features1.py`` has no DRN branch.

The architectures (``Bottleneck`` is ResNet's 1x1 - 3x3 - 1x1 with expansion 4, the stride and the dilation on the
3x3 conv, BN after each conv, a conv1x1/stride - BN shortcut when the shape changes):

* **DRN-A-50** (:class:`DRNA50`): ResNet-50 with the strides of layers 3 and 4 removed and dilation instead.
  conv7x7/2 (64) - BN - ReLU - MaxPool 3x3/2, then bottleneck layers of 3, 4, 6, 3 blocks (64, 128, 256, 512
  planes) with strides 1, 2, 1, 1; in layers 3 and 4 every block *after the first* has dilation 2 (layer 3) or 4
  (layer 4) and the first has none (fyu's ``DRN_A._make_layer`` builds the first block without dilation). Output
  stride 8, 2048 channels; global average pooling, Linear. Same parameters as ResNet-50: 25,557,032 with 1000
  classes.
* **DRN-D-54** (:class:`DRND54`): channels (16, 32, 64, 128, 256, 512, 512, 512), layers [1, 1, 3, 4, 6, 3, 1, 1].
  layer0 conv7x7 (16, stride 1) - BN - ReLU; layer1 conv3x3 (16) - BN - ReLU; layer2 conv3x3/2 (32) - BN - ReLU;
  layers 3-6 bottlenecks of 3, 4, 6, 3 blocks (64, 128, 256, 512 planes), layers 3 and 4 with stride 2, layer 5
  with dilation 2 and layer 6 with dilation 4 in *every* block (``new_level=False``); the degridding layers 7
  (conv3x3, dilation 2, 2048 → 512) and 8 (conv3x3, 512) - BN - ReLU, without residual connections. Output stride
  8, 512 channels; pooling, then the 1x1-conv classifier. 35,809,176 parameters with 1000 classes (README: 35.8M).
* Initialisation as fyu's: every conv weight N(0, 2 / (k² · out_channels)) (= ``kaiming_normal_(mode="fan_out",
  nonlinearity="relu")``), BN weight 1 / bias 0; the classifier, which the release replaces, keeps PyTorch's default
  initialisation (a fresh ``nn.Conv2d(512, 1, 1)`` and ``nn.Linear(512, 1)`` draw from the same distribution).

Deviations (deliberate):

* DRN-D-54's pooling: fyu's ``DRN`` (and the release, which leaves it unchanged) average-pools with a fixed
  ``AvgPool2d(28)`` (kernel and stride 28), built for 224² inputs (a 28² map at stride 8), and flattens the
  1x1-conv classifier's output. At the release's 576² the map is 72², the pool leaves a 2x2 grid and the model
  returns 4 logits per image, which ``BCEWithLogitsLoss(logits.view(-1), labels)`` rejects. Here, as for
  DRN-A-50 (whose pool the release itself made adaptive), the map is *globally* average-pooled (identical at 224²)
  and the classifier is ``nn.Linear(512, num_classes)`` (a 1x1 conv on a 1x1 map; its weight is the conv's
  reshaped). ``out_map`` / ``out_middle`` (segmentation outputs) are not offered; ``feature_map`` gives the map.
* ``width`` scales every channel count (``round(c * width)``, at least 1; a bottleneck's output stays 4x its
  planes) and ``in_channels`` the first conv's input, for tests and small runs; the default 1.0 is the release's
  network.
* No ImageNet weights (the release loads torchvision's ResNet-50 weights into DRN-A-50 and fyu's ``drn_d_54``
  weights); parameter names differ from fyu's (DRN-A: ``stem`` for ``conv1`` / ``bn1``, ``layers.k`` for
  ``layer{k+1}``; DRN-D: ``stem`` for ``layer0``-``layer2``, ``layers.k`` for ``layer{k+3}``; ``branch`` /
  ``shortcut`` inside a bottleneck, ``head`` for ``fc``), so those checkpoints would need a key map.
* ``forward`` returns logits squeezed to ``(N,)`` when ``num_classes == 1``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from thrifty.methods.pe_cad.pooled import PooledBackbone

__all__ = ["DRNA50", "DRND54", "DRNBottleneck"]

_EXPANSION = 4
_A_LAYERS = (3, 4, 6, 3)  # fyu's drn_a_50 = ResNet-50's block counts
_D_LAYERS = (1, 1, 3, 4, 6, 3, 1, 1)  # fyu's drn_d_54: conv layers 1-2, bottleneck layers 3-6, conv layers 7-8
_D_CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)


def _conv_bn_relu(cin: int, cout: int, *, kernel_size: int = 3, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    """conv (no bias, 'same' padding for odd kernels) - BN - ReLU, as a list of modules."""
    pad = dilation * (kernel_size // 2)
    return [
        nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class DRNBottleneck(nn.Module):
    """ResNet bottleneck with the stride and the dilation on its 3x3 conv: relu(branch(x) + shortcut(x)), branch
    = conv1x1 (planes) - BN - ReLU - conv3x3/stride, dilation d (planes) - BN - ReLU - conv1x1 (4·planes) - BN,
    shortcut = identity, or conv1x1/stride - BN when the width or the resolution changes.

    x: (N, in_channels, H, W) → (N, 4·planes, ⌈H/stride⌉, ⌈W/stride⌉)."""

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out = planes * _EXPANSION
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        if stride != 1 or in_channels != out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


def _bottleneck_layer(
    in_channels: int, planes: int, blocks: int, *, stride: int = 1, dilation: int = 1, first_dilation: int = 1
) -> nn.Sequential:
    """``blocks`` bottlenecks; the first carries the stride and ``first_dilation``, the others ``dilation``.
    (N, in_channels, H, W) → (N, 4·planes, ⌈H/stride⌉, ⌈W/stride⌉)."""
    mods = [DRNBottleneck(in_channels, planes, stride=stride, dilation=first_dilation)]
    mods += [DRNBottleneck(planes * _EXPANSION, planes, dilation=dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*mods)


class _DRN(PooledBackbone):
    """The shared stage-1 interface: ``feature_map`` = ``layers(stem(x))`` at stride 8, ``features`` = its global
    average, ``classify`` = Linear. Subclasses build ``stem``, ``layers`` and call :meth:`_finish`."""

    stem: nn.Module
    layers: nn.Sequential

    def _finish(self, out_channels: int, num_classes: int) -> None:
        for m in self.modules():  # fyu's initialisation (before the head, which the release replaces)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.head = nn.Linear(out_channels, num_classes)
        self.num_classes = num_classes
        self.feature_dim = out_channels
        self.map_channels = out_channels
        self.map_stride = 8

    def feature_map(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, map_channels, ⌈H/8⌉, ⌈W/8⌉)."""
        return self.layers(self.stem(x))


def _channels(width: float) -> Callable[[int], int]:
    """The channel-count scaling: c → max(1, round(c · width))."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return lambda c: max(1, round(c * width))


class DRNA50(_DRN):
    """DRN-A-50 (fyu's ``drn_a_50``): ResNet-50 with layers 3-4 dilated (2, 4) instead of strided.

    x: (N, in_channels, H, W) → ``feature_map`` (N, 2048·width, ⌈H/8⌉, ⌈W/8⌉) = layer 4's output,
    ``features`` (N, 2048·width) = its global average, ``classify`` / ``forward`` logits (N,) when
    ``num_classes == 1``, else (N, num_classes)."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        ch = _channels(width)
        c0 = ch(64)
        self.stem = nn.Sequential(
            *_conv_bn_relu(in_channels, c0, kernel_size=7, stride=2), nn.MaxPool2d(3, stride=2, padding=1)
        )
        stages, cin = [], c0
        for planes, blocks, stride, dilation in zip((64, 128, 256, 512), _A_LAYERS, (1, 2, 1, 1), (1, 1, 2, 4)):
            stages.append(_bottleneck_layer(cin, ch(planes), blocks, stride=stride, dilation=dilation))
            cin = ch(planes) * _EXPANSION
        self.layers = nn.Sequential(*stages)
        self._finish(cin, num_classes)


class DRND54(_DRN):
    """DRN-D-54 (fyu's ``drn_d_54``): conv stem (layers 0-2), bottleneck layers 3-6 with layers 5-6 dilated (2, 4),
    and the degridding conv layers 7-8 (dilation 2, then 1; no residuals).

    x: (N, in_channels, H, W) → ``feature_map`` (N, 512·width, ⌈H/8⌉, ⌈W/8⌉) = layer 8's output,
    ``features`` (N, 512·width) = its global average, ``classify`` / ``forward`` logits (N,) when
    ``num_classes == 1``, else (N, num_classes)."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        layers = _D_LAYERS
        ch = _channels(width)
        c = [ch(k) for k in _D_CHANNELS]
        stem = _conv_bn_relu(in_channels, c[0], kernel_size=7)  # layer0
        cin = c[0]
        for k, stride in ((0, 1), (1, 2)):  # layers 1-2: plain conv layers, the first conv of each carries the stride
            for i in range(layers[k]):
                stem += _conv_bn_relu(cin, c[k], stride=stride if i == 0 else 1)
                cin = c[k]
        self.stem = nn.Sequential(*stem)
        stages: list[nn.Module] = []
        for k, stride, dilation in ((2, 2, 1), (3, 2, 1), (4, 1, 2), (5, 1, 4)):  # layers 3-6
            stages.append(
                _bottleneck_layer(cin, c[k], layers[k], stride=stride, dilation=dilation, first_dilation=dilation)
            )
            cin = c[k] * _EXPANSION
        for k, dilation in ((6, 2), (7, 1)):  # layers 7-8: degridding, no residuals
            convs: list[nn.Module] = []
            for _ in range(layers[k]):
                convs += _conv_bn_relu(cin, c[k], dilation=dilation)
                cin = c[k]
            stages.append(nn.Sequential(*convs))
        self.layers = nn.Sequential(*stages)
        self._finish(cin, num_classes)
