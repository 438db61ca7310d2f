"""Two-stream R3D-18 of "Learning from Temporal Gradient for Semi-supervised Action Recognition".

Xiao et al., CVPR 2022 (arXiv 2111.13241); official code ``lambert-x/video-semisup`` (an MMAction2 0.16 fork).
One backbone reads RGB clips, a second one with the same configuration (not shared weights,
``temp_backbone='same'`` builds a copy) reads temporal-gradient (TG) clips. Each modality has an I3D
classification head and a contrast projection head. Only the RGB backbone and head run at inference.

Backbone, as the release configures MMAction2's ``ResNet3d`` (depth 18, ``conv1_kernel=(3, 7, 7)``,
``conv1_stride_t=1``, ``pool1_stride_t=1``, ``inflate=(1, 1, 1, 1)``, ``spatial_strides=temporal_strides=
(1, 2, 2, 2)``, BN eps 1e-3, ``norm_eval=False``, ``zero_init_residual=False``, ``with_pool2`` left at its
default True)::

    conv1  3x7x7, stride (1, 2, 2), pad (1, 3, 3), BN, ReLU      (N, w0, T,  H/2,  W/2)
    pool1  max 1x3x3, stride (1, 2, 2), pad (0, 1, 1)            (N, w0, T,  H/4,  W/4)
    layer1 2 x BasicBlock3d(3x3x3), stride (1, 1, 1)             (N, w0, T,  H/4,  W/4)
    pool2  max 2x1x1, stride (2, 1, 1)  -> stage-0 output        (N, w0, T1, H/4,  W/4)   T1 = floor(T/2)
    layer2 stride (2, 2, 2)             -> stage-1 output        (N, w1, T2, H/8,  W/8)   T2 = ceil(T1/2)
    layer3 stride (2, 2, 2)             -> stage-2 output        (N, w2, T3, H/16, W/16)  T3 = ceil(T2/2)
    layer4 stride (2, 2, 2)             -> stage-3 output        (N, w3, T4, H/32, W/32)  T4 = ceil(T3/2)

(stride-2 convs with padding 1 ceil-halve: an 8x32x32 clip gives T = 4, 2, 1, 1 and H = W = 8, 4, 2, 1;
8x224x224 gives 4, 2, 1, 1 and 56, 28, 14, 7). A block is conv-BN-ReLU,
conv-BN, plus the identity (or a 1x1x1 conv + BN when the stride or width changes), then ReLU. Convs use
Kaiming-normal init (fan_out, ReLU), BN weight 1 and bias 0, as ``ResNet3d._init_weights`` does.

Heads, as ``mmaction/models/heads/i3d_head.py`` and the fork's ``contrast_head.py``:

* ``I3DHead``: global average pool, dropout, linear (normal std 0.01, bias 0).
* ``ContrastHead`` (``fc_layer_num=3``, ``norm_cfg`` set, ``with_final_normalize=True``, dropout 0):
  average pool, Linear(no bias)-BN-ReLU, Linear(no bias)-BN-ReLU, Linear(no bias), then a BatchNorm1d
  without affine parameters (what the release calls "final normalize"). Linears use normal std 0.01.

Deviations from the release:

* The release L2-normalises the contrast embeddings inside its SimCLR loss; ``ContrastHead`` here returns
  them already L2-normalised (the loss normalising again changes nothing).
* Head BatchNorm1d layers keep PyTorch's eps 1e-5 (the release's head ``norm_cfg`` sets no eps either); the
  backbone BN uses eps 1e-3 as configured. SyncBN is the caller's choice (``nn.SyncBatchNorm.convert_sync_batchnorm``).
* ``recompute_bn_stats`` defaults to the exact population statistics over the given batches; the release's
  PreciseBN (fvcore-derived) averages per-batch means and per-batch unbiased variances, available as
  ``mode="batch_average"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from thrifty.core.nn import count_parameters as count_parameters  # re-exported

__all__ = [
    "R3D18",
    "RGB_PREFIXES",
    "BasicBlock3d",
    "ContrastHead",
    "I3DHead",
    "StreamOutputs",
    "TwoStreamNet",
    "count_parameters",
    "recompute_bn_stats",
]

# State-dict prefixes of the modules that run at inference (see ``TwoStreamNet.rgb_only_state_dict``).
RGB_PREFIXES: tuple[str, ...] = ("rgb_backbone.", "rgb_head.")


class BasicBlock3d(nn.Module):
    """ResNet basic block with 3x3x3 convolutions (MMAction2 ``BasicBlock3d`` with ``inflate=True``).

    Input (N, in_ch, T, H, W) -> output (N, out_ch, ceil(T/st), ceil(H/ss), ceil(W/ss)).
    """

    def __init__(self, *, in_ch: int, out_ch: int, stride: tuple[int, int, int] = (1, 1, 1), bn_eps: float = 1e-3):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch, eps=bn_eps)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_ch, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        # MMAction2 adds the projection when the spatial stride is not 1 or the width changes.
        self.downsample: nn.Sequential | None = None
        if stride[1] != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm3d(out_ch, eps=bn_eps)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class R3D18(nn.Module):
    """3D ResNet-18 as the release configures MMAction2's ``ResNet3d`` (every conv 3D).

    Args:
        widths: channels of the four stages; the stem has ``widths[0]`` channels.
        blocks: basic blocks per stage.
        in_channels: input channels (3 for RGB and for TG).
        bn_eps: BatchNorm eps (the release sets 1e-3).
        with_pool2: the temporal max-pool (2x1x1, stride 2) after stage 1 that ``ResNet3d`` applies by default.

    ``forward`` maps (N, C, T, H, W) to the last stage map (N, widths[-1], T', H', W');
    ``forward_features`` returns the four stage outputs (stage 0 taken after pool2, as MMAction2 does).
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        in_channels: int = 3,
        bn_eps: float = 1e-3,
        with_pool2: bool = True,
    ):
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"R3D18 needs four stages; got widths={tuple(widths)}, blocks={tuple(blocks)}")
        if min(widths) < 1 or min(blocks) < 1:
            raise ValueError(f"widths and blocks must be positive; got widths={tuple(widths)}, blocks={tuple(blocks)}")
        self.widths = tuple(int(w) for w in widths)
        self.out_dim = self.widths[-1]
        self.conv1 = nn.Conv3d(in_channels, self.widths[0], (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(self.widths[0], eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.pool2: nn.MaxPool3d | None = nn.MaxPool3d(kernel_size=(2, 1, 1), stride=(2, 1, 1)) if with_pool2 else None
        strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))  # (temporal, spatial, spatial) per stage
        stages = []
        in_ch = self.widths[0]
        for width, n_blocks, stride in zip(self.widths, blocks, strides):
            layer = [BasicBlock3d(in_ch=in_ch, out_ch=width, stride=stride, bn_eps=bn_eps)]
            layer += [BasicBlock3d(in_ch=width, out_ch=width, bn_eps=bn_eps) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layer))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convs (fan_out, ReLU; mmcv ``kaiming_init``), BN weight 1 / bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, _BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """(N, C, T, H, W) -> the four stage outputs [(N, widths[s], T_s, H_s, W_s) for s in 0..3]."""
        if x.dim() != 5:
            raise ValueError(f"R3D18 expects (N, C, T, H, W) input; got shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        if self.pool2 is not None:
            x = self.pool2(x)
        feats = [x]
        for layer in (self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, T, H, W) -> last stage map (N, widths[-1], T', H', W')."""
        return self.forward_features(x)[-1]


class I3DHead(nn.Module):
    """MMAction2 ``I3DHead``: average pool over (T, H, W), dropout, linear. (N, in_dim, T, H, W) -> (N, K)."""

    def __init__(self, *, in_dim: int, num_classes: int, dropout: float = 0.5, init_std: float = 0.01):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.mean(dim=(2, 3, 4))  # (N, in_dim)
        return self.fc(self.dropout(x))


class ContrastHead(nn.Module):
    """The release's 3-layer contrast head, L2-normalised. (N, in_dim, T, H, W) or (N, in_dim) -> (N, dim).

    avg-pool, Linear(in_dim, dim, no bias), BN, ReLU, Linear(dim, dim, no bias), BN, ReLU,
    Linear(dim, dim, no bias), BatchNorm1d(dim, affine=False), L2 normalisation.
    """

    def __init__(self, *, in_dim: int, dim: int = 512, init_std: float = 0.01):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim, affine=False),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=init_std)
            elif isinstance(m, nn.BatchNorm1d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 5:
            x = x.mean(dim=(2, 3, 4))
        return F.normalize(self.mlp(x), dim=1)


@dataclass
class StreamOutputs:
    """Outputs of ``TwoStreamNet.forward_streams`` for N clips.

    logits_rgb, logits_tg: (N, K). feats_rgb, feats_tg: the four stage maps of each backbone.
    emb_rgb, emb_tg: (N, proj_dim), L2-normalised contrast embeddings; None for a model without contrast heads
    (the ablation without the contrastive term, whose heads would otherwise sit unused under DDP).
    """

    logits_rgb: Tensor
    logits_tg: Tensor
    feats_rgb: list[Tensor]
    feats_tg: list[Tensor]
    emb_rgb: Tensor | None
    emb_tg: Tensor | None


class TwoStreamNet(nn.Module):
    """RGB and TG R3D-18 backbones (separate weights, same config), an I3D head and a contrast head each.

    ``forward(x_rgb)`` is inference: it runs only ``rgb_backbone`` and ``rgb_head``.
    ``forward_streams(x_rgb, x_tg)`` is training: both streams, all heads.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        proj_dim: int = 512,
        dropout: float = 0.5,
        bn_eps: float = 1e-3,
        in_channels: int = 3,
    ):
        super().__init__()
        backbone_kw: dict[str, Any] = dict(widths=widths, blocks=blocks, in_channels=in_channels, bn_eps=bn_eps)
        self.rgb_backbone: R3D18 | None = R3D18(**backbone_kw)
        self.tg_backbone: R3D18 | None = R3D18(**backbone_kw)
        feat_dim = self.rgb_backbone.out_dim
        self.rgb_head = I3DHead(in_dim=feat_dim, num_classes=num_classes, dropout=dropout)
        self.tg_head: I3DHead | None = I3DHead(in_dim=feat_dim, num_classes=num_classes, dropout=dropout)
        self.rgb_proj: ContrastHead | None = ContrastHead(in_dim=feat_dim, dim=proj_dim)
        self.tg_proj: ContrastHead | None = ContrastHead(in_dim=feat_dim, dim=proj_dim)

    def forward(self, x_rgb: Tensor, x_tg: Tensor | None = None) -> Tensor | StreamOutputs:
        """Inference on RGB clips only: (N, 3, T, H, W) -> logits (N, K). With ``x_tg`` both streams run
        (:meth:`forward_streams`); training calls it that way so a DDP wrapper sees the forward."""
        if x_tg is not None:
            return self.forward_streams(x_rgb, x_tg)
        if self.rgb_backbone is None:
            raise RuntimeError("this model's RGB backbone was removed")
        return self.rgb_head(self.rgb_backbone(x_rgb))

    def forward_streams(self, x_rgb: Tensor, x_tg: Tensor) -> StreamOutputs:
        """Both streams on the same N clips: x_rgb, x_tg (N, C, T, H, W) -> ``StreamOutputs``."""
        if self.rgb_backbone is None or self.tg_backbone is None or self.tg_head is None:
            raise RuntimeError("forward_streams needs both branches; this model's TG branch was removed")
        if (self.rgb_proj is None) != (self.tg_proj is None):
            raise RuntimeError("forward_streams needs both contrast heads or neither")
        if x_rgb.shape[0] != x_tg.shape[0]:
            raise ValueError(f"RGB and TG batches differ: {tuple(x_rgb.shape)} vs {tuple(x_tg.shape)}")
        feats_rgb = self.rgb_backbone.forward_features(x_rgb)
        feats_tg = self.tg_backbone.forward_features(x_tg)
        return StreamOutputs(
            logits_rgb=self.rgb_head(feats_rgb[-1]),
            logits_tg=self.tg_head(feats_tg[-1]),
            feats_rgb=feats_rgb,
            feats_tg=feats_tg,
            emb_rgb=None if self.rgb_proj is None else self.rgb_proj(feats_rgb[-1]),
            emb_tg=None if self.tg_proj is None else self.tg_proj(feats_tg[-1]),
        )

    def rgb_only_state_dict(self) -> dict[str, Tensor]:
        """The weights inference needs (``rgb_backbone.*``, ``rgb_head.*``), detached copies."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(RGB_PREFIXES)}

    def drop_training_branches(self) -> TwoStreamNet:
        """Remove the TG backbone, TG head and both contrast heads in place (for export); returns self."""
        self.tg_backbone = None
        self.tg_head = None
        self.rgb_proj = None
        self.tg_proj = None
        return self


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[Any], Any],
    mode: Literal["exact", "batch_average"] = "exact",
) -> int:
    """Precise BN: replace every BatchNorm's running statistics by statistics over ``batches``.

    The model runs in train mode (each BN normalises by its batch statistics, as during training and as
    fvcore/MMAction2 PreciseBN do) with its weights fixed; ``forward(batch)`` must run the modules to update,
    e.g. ``lambda x: model.rgb_backbone(x)``. Momentum plays no role. The training flags are restored.

    mode="exact": running_mean/running_var become the mean and the unbiased variance (PyTorch's running_var
        convention) of each BN's input over all batches pooled, per channel (computed in float64).
    mode="batch_average": the release's ``update_bn_stats`` — the equal-weight average over batches of each
        batch's mean and of its unbiased variance.

    Only BN layers inside ``model`` are touched (the release restricts PreciseBN to ``bn_range=['backbone',
    'cls_head']``: pass ``model.rgb_backbone`` to mirror it). Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    # Per BN: [count, mean (C,), M2 (C,)] (exact) or [batches, sum of means, sum of unbiased vars].
    stats: dict[int, list[Any]] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].detach().double()
        c = x.shape[1]
        x = x.transpose(0, 1).reshape(c, -1)  # (C, n)
        n = x.shape[1]
        mean = x.mean(dim=1)
        m2 = ((x - mean[:, None]) ** 2).sum(dim=1)
        key = id(module)
        if mode == "exact":
            if key not in stats:
                stats[key] = [n, mean, m2]
            else:
                n_a, mean_a, m2_a = stats[key]
                n_ab = n_a + n
                delta = mean - mean_a
                stats[key] = [n_ab, mean_a + delta * n / n_ab, m2_a + m2 + delta**2 * n_a * n / n_ab]
        else:
            var = m2 / max(n - 1, 1)
            if key not in stats:
                stats[key] = [1, mean, var]
            else:
                stats[key] = [stats[key][0] + 1, stats[key][1] + mean, stats[key][2] + var]

    if mode not in ("exact", "batch_average"):
        raise ValueError(f"mode must be 'exact' or 'batch_average'; got {mode!r}")
    was_training = {m: m.training for m in model.modules()}
    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    n_batches = 0
    try:
        model.train()
        for batch in batches:
            forward(batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.train(flag)
    if n_batches == 0:
        raise ValueError("recompute_bn_stats got no batches")
    for bn in bns:
        if id(bn) not in stats:  # a BN the forward never reached keeps its statistics
            continue
        a, b, c = stats[id(bn)]
        if mode == "exact":
            mean, var = b, c / max(a - 1, 1)
        else:
            mean, var = b / a, c / a
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return n_batches
