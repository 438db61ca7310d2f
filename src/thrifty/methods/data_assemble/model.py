"""Network of the "Data, assemble" recipe: a MONAI ``DenseNet`` backbone with one sigmoid output per label.

Label-Assemble (Kang et al., arXiv 2109.12265) trains DenseNet-121 with "1+N" sigmoid heads: one output for the
class of interest and one per assembled label (:class:`MultiHead`, the release's variant). The paper also
describes a *dynamic adapter* that "encodes multiple visual tasks and aggregates image features in a
question-and-answer manner"; its equations were not found, so :class:`Adapter` is our documented hypothesis:
each label j owns a learnt query q_j that attends (one head, scaled dot product) over the feature map with keys
W_k·F and values W_v·F, and the attended vector is answered by one sigmoid per question (w_j·v_j + b_j). Both
heads share one API (features (B, C, h, w) → logits (B, L)) and are compared head-to-head.

The miniature uses ``DenseNet(spatial_dims=2, init_features=16, growth_rate=8, block_config=(2, 2, 2, 2))``
(about 27k parameters); ``full`` uses ``DenseNet121``. Both start from scratch (the release loads ImageNet
weights; nothing is downloaded here); a local ``.safetensors`` file can initialise the backbone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn


class MultiHead(nn.Module):
    """ReLU, global average pooling and one linear output per label. (B, C, h, w) → (B, L) logits."""

    def __init__(self, *, in_channels: int, num_labels: int) -> None:
        super().__init__()
        self.out = nn.Linear(in_channels, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(features).mean(dim=(2, 3)))


class Adapter(nn.Module):
    """Question-and-answer adapter (our hypothesis of the paper's dynamic adapter).

    For each label j: ``v_j = softmax(q_j · K / sqrt(d)) · V`` over the h·w positions, with ``K = W_k F`` and
    ``V = W_v F`` (1×1 convolutions of the ReLU'd features), then ``logit_j = w_j · v_j + b_j``. Permuting the
    labels' parameters (q, w, b) permutes the outputs the same way. (B, C, h, w) → (B, L) logits;
    :attr:`last_attention` keeps (B, L, h·w) from the latest forward.
    """

    def __init__(self, *, in_channels: int, num_labels: int, dim: int = 32) -> None:
        super().__init__()
        self.key = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.value = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.queries = nn.Parameter(torch.randn(num_labels, dim) / math.sqrt(dim))
        self.answer_weight = nn.Parameter(torch.randn(num_labels, dim) / math.sqrt(dim))
        self.answer_bias = nn.Parameter(torch.zeros(num_labels))
        self.scale = 1.0 / math.sqrt(dim)
        self.last_attention: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = torch.relu(features)
        k = self.key(f).flatten(2)  # (B, d, N)
        v = self.value(f).flatten(2)  # (B, d, N)
        attn = torch.softmax(torch.einsum("ld,bdn->bln", self.queries, k) * self.scale, dim=-1)  # (B, L, N)
        self.last_attention = attn.detach()
        answered = torch.einsum("bln,bdn->bld", attn, v)  # (B, L, d)
        return (answered * self.answer_weight).sum(-1) + self.answer_bias


class AssembleNet(nn.Module):
    """Backbone features → head. ``forward(x)``: (B, in_channels, H, W) → logits (B, L)."""

    def __init__(self, *, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_backbone(
    *, name: str, in_channels: int = 1, init_features: int = 16, growth_rate: int = 8,
    block_config: tuple[int, ...] = (2, 2, 2, 2),
) -> tuple[nn.Module, int]:  # fmt: skip
    """MONAI DenseNet feature extractor (without its classifier) and its number of output channels."""
    from monai.networks.nets import DenseNet, DenseNet121

    if name == "densenet121":
        net = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1)
    elif name == "densenet_mini":
        net = DenseNet(
            spatial_dims=2, in_channels=in_channels, out_channels=1, init_features=init_features,
            growth_rate=growth_rate, block_config=tuple(block_config),
        )  # fmt: skip
    else:
        raise ValueError(f"unknown backbone {name!r}; choose densenet_mini or densenet121")
    return net.features, int(net.class_layers.out.in_features)


def build_model(model_cfg: Any, *, num_labels: int, head: str = "multihead", in_channels: int = 1) -> AssembleNet:
    """The network of one arm (``model_cfg`` a ``ModelConfig``; ``head`` ``multihead`` or ``adapter``). A
    ``model_cfg.weights`` file (safetensors, backbone keys) initialises the backbone; nothing is downloaded. With
    ``model_cfg.channels_last`` (absent: False, as in model cards written before it existed) the weights are kept
    in ``channels_last`` memory format, which the convolutions then follow."""
    backbone, channels = build_backbone(
        name=model_cfg.backbone, in_channels=in_channels, init_features=model_cfg.init_features,
        growth_rate=model_cfg.growth_rate, block_config=tuple(model_cfg.block_config),
    )  # fmt: skip
    if head == "multihead":
        out: nn.Module = MultiHead(in_channels=channels, num_labels=num_labels)
    elif head == "adapter":
        out = Adapter(in_channels=channels, num_labels=num_labels, dim=model_cfg.adapter_dim)
    else:
        raise ValueError(f"unknown head {head!r}; choose multihead or adapter")
    if model_cfg.weights:
        path = Path(model_cfg.weights)
        if not path.is_file():
            raise FileNotFoundError(f"config key 'model.weights': {path} does not exist")
        state = load_file(str(path))
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if unexpected or len(missing) == len(backbone.state_dict()):
            raise ValueError(
                f"{path}: not weights of this backbone ({len(unexpected)} unexpected keys, e.g. "
                f"{list(unexpected)[:3]}; {len(missing)} missing)"
            )
    model = AssembleNet(backbone=backbone, head=out)
    if getattr(model_cfg, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model
