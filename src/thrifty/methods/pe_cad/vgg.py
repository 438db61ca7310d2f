"""VGG16, one of the PE CAD release's stage-1 backbones, written here without torchvision.

Written from a reading of, with no code copied:

* ``Nahid1992/CAD_PE`` ``first_stage/train1.py``, ``transferLearningModels``: ``backboneName == "vgg16"`` builds
  torchvision's ``models.vgg16`` (ImageNet or random weights) and replaces its *whole* classifier with
  ``nn.Linear(25088, 1)``, so the logit is a linear function of the flattened 512 x 7 x 7 average-pooled map.
  ``first_stage/save_features1.py`` has the same branch.
* The architecture of torchvision's ``vgg16`` (Simonyan & Zisserman, arXiv 1409.1556, configuration "D", in
  torchvision's ``models/vgg.py``): 13 conv3x3 (padding 1, with bias) + ReLU layers in five blocks of
  ``[64, 64]``, ``[128, 128]``, ``[256] x 3``, ``[512] x 3``, ``[512] x 3`` channels, each block ending in a
  MaxPool 2x2/2 (total stride 32); ``AdaptiveAvgPool2d((7, 7))``; flatten; the ImageNet classifier Linear(25088,
  4096) - ReLU - Dropout(0.5) - Linear(4096, 4096) - ReLU - Dropout(0.5) - Linear(4096, 1000). ``vgg16`` has no
  BatchNorm (``vgg16_bn`` adds one after every conv). Initialisation as torchvision's: conv weights
  ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` and zero bias, BN weight 1 / bias 0, the classifier's
  Linear layers N(0, 0.01) with zero bias; the layer that the release puts in place of the classifier keeps
  PyTorch's default ``nn.Linear`` initialisation.

What is here: :class:`VGG16` with ``head="linear"`` (default) is the release's network: ``features`` =
the flattened 7x7-pooled map (25088-d at full width; the input of the release's ``Linear(25088, 1)``, i.e. its
penultimate layer), ``classify`` = that Linear. ``head="mlp"`` keeps torchvision's two 4096-wide hidden layers and
replaces only the last Linear, which is what the release's ``first_stage/model_pytorch.py`` ``Classifier_model``
does for ``vgg16`` (the path for self-supervised checkpoints; it also appends a ``Sigmoid``, left out here since
every stage-1 backbone returns logits); then ``features`` are the 4096-d output of the second hidden layer.

Parameter counts: with ``head="mlp", num_classes=1000`` :class:`VGG16` has 138,357,544 parameters (torchvision
``vgg16``; 138,365,992 with ``batch_norm=True``, torchvision ``vgg16_bn``); the convolutions alone 14,714,688
(Keras ``VGG16(include_top=False)``); the release's network (``head="linear"``, 1 output) 14,739,777.

Deviations (deliberate):

* ``width`` scales every channel count (``round(c * width)``, at least 1; the MLP's 4096 too) and ``in_channels``
  the first conv's input, for tests and small runs; the default 1.0 is the release's network. ``pool_size`` is the
  side of the adaptive average pool before flattening (torchvision / the release: 7; ``pool_size=1`` gives
  512-d global-average features, a stage-2-friendly option the release does not have).
* No ImageNet weights. Parameter names differ from torchvision's (``body`` for ``features``, ``mlp.0`` /
  ``mlp.3`` / ``head`` for ``classifier.0`` / ``.3`` / ``.6``; with the release's head, ``head`` for
  ``classifier``), so a torchvision checkpoint would need a key map.
* ``forward`` returns logits squeezed to ``(N,)`` when ``num_classes == 1`` (the release applies ``view(-1)`` in
  its loss).
* Unverified: ``save_features1.py`` unpacks ``features, logits = model(images)``, which torchvision's VGG does not
  return, so how the release saved VGG16 features is not shown; here they are the input of its last Linear.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VGG16", "VGG16_BLOCKS"]

#: torchvision's configuration "D": the conv widths of the five blocks, each followed by MaxPool 2x2/2
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_HIDDEN = 4096  # torchvision's classifier width


class VGG16(nn.Module):
    """VGG16 (configuration D) behind the stage-1 backbone interface.

    x: (N, in_channels, H, W) with H, W ≥ 32 → ``feature_map`` (N, 512·width, ⌊H/32⌋, ⌊W/32⌋) = the output of
    the fifth max-pool; ``features`` (N, feature_dim): with ``head="linear"`` the map average-pooled to
    ``pool_size`` x ``pool_size`` (adaptive, as torchvision) and flattened, feature_dim = 512·width·pool_size²
    (25088 at the defaults); with ``head="mlp"`` the output of torchvision's two hidden layers (Linear-ReLU-Dropout
    twice), feature_dim = 4096·width; ``classify`` / ``forward`` logits (N,) when ``num_classes == 1``, else
    (N, num_classes).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1,
        width: float = 1.0,
        batch_norm: bool = False,
        head: Literal["linear", "mlp"] = "linear",
        pool_size: int = 7,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")

        def ch(c: int) -> int:
            return max(1, round(c * width))

        layers: list[nn.Module] = []
        cin = in_channels
        for block in VGG16_BLOCKS:
            for c in map(ch, block):
                layers.append(nn.Conv2d(cin, c, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(c))
                layers.append(nn.ReLU(inplace=True))
                cin = c
            layers.append(nn.MaxPool2d(2, stride=2))
        self.body = nn.Sequential(*layers)
        self.pool_size = pool_size
        flat = cin * pool_size * pool_size
        if head == "mlp":
            hidden = ch(_HIDDEN)
            self.mlp: nn.Module = nn.Sequential(
                nn.Linear(flat, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            )
            dim = hidden
        else:
            self.mlp = nn.Identity()
            dim = flat
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)
        self.head = nn.Linear(dim, num_classes)  # the release's replacement layer: PyTorch's default init
        self.num_classes = num_classes
        self.feature_dim = dim
        self.map_channels = cin
        self.map_stride = 32

    def feature_map(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, map_channels, ⌊H/32⌋, ⌊W/32⌋)."""
        return self.body(x)

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, feature_dim), the input of the last Linear layer."""
        pooled = F.adaptive_avg_pool2d(self.feature_map(x), self.pool_size).flatten(1)
        return self.mlp(pooled)

    def classify(self, features: Tensor) -> Tensor:
        """(N, feature_dim) → logits (N,) when ``num_classes == 1``, else (N, num_classes)."""
        return self.head(features).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))
