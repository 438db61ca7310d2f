"""Xception and SeXception (Xception + squeeze-and-excitation), the PE CAD release's stage-1 backbones.

Written here from a reading of, with no code copied:

* Chollet, *Xception: Deep Learning with Depthwise Separable Convolutions* (CVPR 2017, arXiv 1610.02357), in the
  common PyTorch port by tstandley / Cadene that the PE CAD release ships twice, as ``first_stage/
  xception_copiedModel.py`` and ``first_stage/pretrainedmodels/xception.py`` of ``Nahid1992/CAD_PE`` (the two
  differ only in where the ImageNet weights are loaded from).
* ``Nahid1992/CAD_PE`` ``first_stage/save_features1.py``: ``SEModule`` and ``convert_to_SE_Xception`` (how
  SeXception is made from that Xception) and the ``backboneName == "sexception"`` / ``"xception"`` branches (the
  head is replaced by ``Linear(2048, 1)``; ``features, logits = model(images)``).

The architecture, as the release builds it:

* **Entry flow.** conv3x3/2 (32, no padding) - BN - ReLU, conv3x3 (64, no padding) - BN - ReLU, then three
  residual blocks to 128, 256 and 728 channels, each of two separable convolutions and a MaxPool 3x3/2 (padding
  1), with a conv1x1/2 - BN shortcut. The first of them does not begin with a ReLU.
* **Middle flow.** Eight residual blocks at 728 channels, each ReLU - SepConv - BN three times, identity shortcut.
* **Exit flow.** One residual block 728 -> 728 -> 1024 (the widening on its *second* separable convolution), MaxPool
  3x3/2, conv1x1/2 - BN shortcut; then SepConv 1536 - BN - ReLU, SepConv 2048 - BN - ReLU, global average pooling
  (the 2048-d penultimate features) and the linear head.
* A separable convolution is a depthwise 3x3 conv followed by a pointwise 1x1 conv, both without bias, and *no*
  BN or ReLU between them (the port's ``SeparableConv2d``); every block's residual branch is
  ``[ReLU - SepConv - BN] x reps`` with the ReLU *before* each convolution (pre-activation, as in Chollet's
  Keras code), so the shortcut sees the un-rectified input.
* **SeXception** (``convert_to_SE_Xception(model, reduction_ratio=16)``): an SE module is appended to the
  residual branch of *every one of the 12 blocks* (entry 3, middle 8, exit 1), after the branch's last BN and,
  in the strided blocks, after its MaxPool, i.e. before the shortcut is added (SE-ResNet's placement). The SE
  module is Cadene's ``SEModule``: global average pool, conv1x1 C -> C // 16 (with bias), ReLU, conv1x1
  C // 16 -> C (with bias), sigmoid, channel-wise rescaling of the branch. The exit-flow separable convolutions
  after the last block get no SE. The release initialises both SE convolutions' weights N(0, 0.01) and their
  biases to 0 (so a freshly converted SE gates every channel by about 0.5); done here too.
* Other weights keep PyTorch's default initialisation (the port's He initialisation is commented out).

At full width with a 1000-class head :class:`Xception` has 22,855,952 trainable parameters (Keras' ``Xception``:
22,910,480 in all, of which 54,528 are the BN moving statistics); with the release's 1-output head 20,809,001,
and :class:`SeXception` adds 739,445 SE parameters (21,548,446).

Deviations (deliberate):

* ``width`` scales every channel count (``round(c * width)``, at least 1) and ``in_channels`` the stem's input,
  for tests and small runs; the default 1.0 is the release's network. The SE bottleneck is ``max(1, C // r)``
  (the release's ``C // r`` at full width).
* The classification head is ``head`` (the release's ``last_linear``) and, as every stage-1 backbone here,
  ``forward`` returns the logits squeezed to ``(N,)`` when ``num_classes == 1`` (the release applies
  ``logits.view(-1)`` in its loss).
* No ImageNet weights are loaded (the release loads Cadene's Xception weights, or its own SeXception weights with
  ``strict=False``), and the parameter names differ from the port's (``blocks.k.branch`` for ``block{k+1}.rep``,
  ``shortcut`` for ``skip`` / ``skipbn``, ``se.reduce`` / ``se.expand`` for ``fc1`` / ``fc2``), so those
  checkpoints would need a key map.
* Unverified: both release scripts import ``xception_f`` from ``xception_copiedModel``, which the released file
  does not define (it has ``xception``); that it returns ``(pooled ReLU features, logits)`` is inferred from
  ``save_features1.py``'s ``features, logits = model(images)`` and the port's ``logits``.
"""

from __future__ import annotations

from torch import Tensor, nn

from thrifty.methods.pe_cad.pooled import PooledBackbone

__all__ = ["SeXception", "SeparableConv2d", "SqueezeExcite", "Xception", "XceptionBlock"]

# the release's channel counts (Cadene's ``Xception.__init__``)
_STEM = (32, 64)
_ENTRY = (128, 256, 728)
_MIDDLE = 728
_MIDDLE_BLOCKS = 8
_EXIT_BLOCK = 1024
_EXIT = (1536, 2048)


class SeparableConv2d(nn.Module):
    """Depthwise k x k convolution then pointwise 1x1 convolution, no bias, nothing in between.

    x: (N, in_channels, H, W) → (N, out_channels, H', W') (H' = H for the default stride 1, padding k // 2)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=in_channels,
            bias=False,
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(W2 ReLU(W1 avgpool(x) + b1) + b2), W1: C -> max(1, C // reduction).

    x: (N, C, H, W) → (N, C, H, W). Both 1x1 convolutions start with weights N(0, 0.01) and zero bias (the release's
    initialisation of the SE modules it adds to Xception)."""

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)
        for conv in (self.reduce, self.expand):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.expand(self.reduce(s).relu()).sigmoid()


class XceptionBlock(nn.Module):
    """One residual block: branch ``[ReLU - SepConv - BN] x reps`` (then MaxPool 3x3/stride, then SE when asked),
    plus a shortcut (identity, or conv1x1/stride - BN when the width or the resolution changes).

    ``grow_first`` widens on the first separable conv (entry flow), otherwise on the last (the exit block);
    ``start_with_relu=False`` drops the branch's first ReLU (the first entry block, whose input is already
    rectified). x: (N, in_channels, H, W) → (N, out_channels, ⌊(H - 1) / stride⌋ + 1, ...)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        reps: int,
        stride: int = 1,
        start_with_relu: bool = True,
        grow_first: bool = True,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        # channels along the branch: widen on the first separable conv, or (exit block) on the last
        widths = [in_channels] + [out_channels] * reps if grow_first else [in_channels] * reps + [out_channels]
        layers: list[nn.Module] = []
        for k in range(reps):
            if k or start_with_relu:
                layers.append(nn.ReLU(inplace=k > 0))  # the first must leave the shortcut's input intact
            layers += [SeparableConv2d(widths[k], widths[k + 1]), nn.BatchNorm2d(widths[k + 1])]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.branch = nn.Sequential(*layers)
        self.se = SqueezeExcite(out_channels, reduction=se_reduction) if se_reduction else None
        if in_channels != out_channels or stride != 1:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.branch(x)
        if self.se is not None:
            y = self.se(y)
        return y + self.shortcut(x)


class Xception(PooledBackbone):
    """Chollet's Xception as the PE CAD release builds it (Cadene's port), behind the stage-1 backbone interface.

    x: (N, in_channels, H, W) with H, W ≥ 7 (the stem's two convolutions are unpadded) → ``feature_map``
    (N, 2048·width, h, w) = the rectified output of the last BN (h = H / 32 when H is a multiple of 32),
    ``features`` (N, 2048·width) = its global average, ``classify`` / ``forward`` logits (N,) when
    ``num_classes == 1``, else (N, num_classes). ``se_reduction`` (None: plain Xception) adds an SE module with
    that reduction to the residual branch of every block (see :class:`SeXception`).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1,
        width: float = 1.0,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")

        def ch(c: int) -> int:
            return max(1, round(c * width))

        s1, s2 = ch(_STEM[0]), ch(_STEM[1])
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, s1, 3, stride=2, bias=False),
            nn.BatchNorm2d(s1),
            nn.ReLU(inplace=True),
            nn.Conv2d(s1, s2, 3, bias=False),
            nn.BatchNorm2d(s2),
            nn.ReLU(inplace=True),
        )
        blocks, cin = [], s2
        for k, c in enumerate(ch(c) for c in _ENTRY):  # entry flow
            blocks.append(XceptionBlock(cin, c, reps=2, stride=2, start_with_relu=k > 0, se_reduction=se_reduction))
            cin = c
        for _ in range(_MIDDLE_BLOCKS):  # middle flow
            blocks.append(XceptionBlock(cin, ch(_MIDDLE), reps=3, se_reduction=se_reduction))
            cin = ch(_MIDDLE)
        blocks.append(  # exit flow
            XceptionBlock(cin, ch(_EXIT_BLOCK), reps=2, stride=2, grow_first=False, se_reduction=se_reduction)
        )
        self.blocks = nn.Sequential(*blocks)
        e1, e2 = ch(_EXIT[0]), ch(_EXIT[1])
        self.exit = nn.Sequential(
            SeparableConv2d(ch(_EXIT_BLOCK), e1),
            nn.BatchNorm2d(e1),
            nn.ReLU(inplace=True),
            SeparableConv2d(e1, e2),
            nn.BatchNorm2d(e2),
            nn.ReLU(inplace=True),  # Cadene's ``logits`` rectifies before pooling
        )
        self.head = nn.Linear(e2, num_classes)
        self.num_classes = num_classes
        self.feature_dim = e2
        self.map_channels = e2
        self.map_stride = 32

    def feature_map(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, feature_dim, h, w)."""
        return self.exit(self.blocks(self.stem(x)))


class SeXception(Xception):
    """The release's SeXception: :class:`Xception` with an SE module (reduction ``se_reduction``, 16 in the release)
    at the end of the residual branch of each of its 12 blocks. Shapes as :class:`Xception`."""

    def __init__(
        self, *, in_channels: int = 3, num_classes: int = 1, width: float = 1.0, se_reduction: int = 16
    ) -> None:
        if se_reduction < 1:
            raise ValueError(f"se_reduction must be >= 1, got {se_reduction}")
        super().__init__(in_channels=in_channels, num_classes=num_classes, width=width, se_reduction=se_reduction)
