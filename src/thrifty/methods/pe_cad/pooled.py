"""The shared tail of the PE CAD recipe's convolutional stage-1 backbones (arXiv 2109.07029): penultimate features
as the global average of the last feature map, then a linear head.

:class:`~.stage1.SmallCNN`, the MONAI CNNs of ``stage1``, :class:`~.xception.Xception` /
:class:`~.xception.SeXception` and :class:`~.drn.DRNA50` / :class:`~.drn.DRND54` define ``feature_map`` and
``head``; this class gives them the ``features`` / ``classify`` / ``forward`` interface every stage-1 backbone has
(feature extraction, the PE slice logit, Genesis restoration through ``feature_map``).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PooledBackbone"]


class PooledBackbone(nn.Module):
    """Subclasses set ``head`` (a Linear from ``feature_dim``) and define ``feature_map``.

    x: (N, C, H, W) → ``feature_map`` (N, feature_dim, h, w) → ``features`` (N, feature_dim) = its spatial mean →
    ``classify`` / ``forward`` logits (N,) for one output, (N, num_classes) otherwise.
    """

    head: nn.Module

    def feature_map(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → (N, feature_dim), the globally average-pooled last map."""
        return self.feature_map(x).mean(dim=(2, 3))

    def classify(self, features: Tensor) -> Tensor:
        """(N, feature_dim) → logits (N,) when the head has one output, else (N, num_classes)."""
        return self.head(features).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))
