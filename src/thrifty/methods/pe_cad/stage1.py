"""Stage 1 of the PE CAD recipe: a per-slice PE classifier whose penultimate features feed the exam-level stage.

Islam et al., *Seeking an Optimal Approach for Computer-Aided Pulmonary Embolism Detection* (MICCAI-W MLMI 2021,
arXiv 2109.07029; extended in MedIA 2023); official code ``Nahid1992/CAD_PE``. Written here from a reading of
``first_stage/train1.py`` (``PEDataset.__getitem__``, ``train_transform``, ``transferLearningModels``, ``main``) and
``first_stage/save_features1.py`` (``PEDataset``, the ``features, logits = model(images)`` loop); no code copied.

What the release does, and where it lives here:

* **Input** (``PEDataset.__getitem__``): slices i-1, i, i+1 of the exam are windowed at level 100 / width 700 and
  stacked as the three channels (centre channel = slice i); the stack is cropped to the exam's lung bounding box
  ``x[y0:y1, x0:x1]`` (``bbox = (x0, y0, x1, y1)``) and resized to 576² with ``cv2.resize`` (bilinear).
  Here: :func:`stack_slices` / :func:`stack_all` on a volume that is *already windowed* (windowing is
  ``thrifty.data.ctpa_synth.window``), and :func:`crop_resize`.
* **Augmentation** (``train_transform``, albumentations): ``RandomContrast(limit=0.2)``,
  ``ShiftScaleRotate(shift 0.2, scale 0.2, rotate 20°, constant border 0)``, ``Cutout(2 holes of
  int(0.4·size)², fill 0)``, then ImageNet ``Normalize``. Here: :func:`random_contrast`,
  :func:`shift_scale_rotate`, :func:`cutout`, :func:`normalise` and the pipeline :func:`augment`, batched torch ops
  whose every draw comes from a ``torch.Generator``.
* **Training** (``main``): ``BCEWithLogitsLoss`` on ``pe_present_on_image``, Adam lr 4e-4, transformers'
  ``get_linear_schedule_with_warmup`` with 0 warm-up steps (a linear decay to 0 over the run), 1 epoch, apex AMP
  O1, DDP over 4 GPUs. Here: :func:`train_stage1` (one process; ``warmup_steps`` defaults to the release's 0); the
  recipe's loop (``thrifty.methods.pe_cad.train.stage1_unit``) also runs under ``torchrun`` DDP, each rank taking
  its shard of every batch from :class:`ShardedBatchSampler` and its rows of the batch's augmentation draws
  (:func:`augment` ``rows=`` / ``total=``), so N ranks train on exactly the batches one process would.
* **Features** (``save_features1.py``): the fine-tuned model in eval mode returns ``(features, logits)``; the
  features are the globally average-pooled penultimate activations (2048-d for the ResNet-50 family) and the
  probabilities ``sigmoid(logits)``. Here: every backbone has ``features(x) -> (N, D)`` and ``forward(x) -> (N,)``
  logits; :func:`extract_features` returns both, batched, in eval mode.

Backbones (:func:`build_backbone`):

* ``small_cnn`` (:class:`SmallCNN`, the miniature's CNN): 4 stride-2 stages of widths ``(w, 2w, 3w, 4w)`` — a
  conv3x3/2-BN-ReLU each, followed by a conv3x3-BN-ReLU in stages 2-4 (a second conv at H/2 would cost ~35% of a
  training step on CPU) — then a 1x1 conv-BN-ReLU to ``feature_dim``, global average pool, Linear(D, 1). At the
  defaults (``width=24``, ``feature_dim=128``, the card's stage-2 input 3x128) it has 268,249 parameters (the card
  asks for 0.2-0.4 M); ``width=28`` gives 362,285 (``width=32`` would exceed the range: 470,433).
* ``small_vit`` (:class:`SmallViT`, the miniature's ViT): MONAI's ``ViT`` in 2D, patch 8, hidden 96, 4 layers,
  4 heads, MLP 384, learnable position embedding, no qkv bias, with MONAI's CLS token and its Linear
  classification head (no Tanh). Features = the CLS token after the final LayerNorm (96-d). At 64² it has
  471,265 parameters (the card: 0.47 M); the LayerNorm MONAI's ``TransformerBlock`` builds for cross-attention
  even when that is off (never used, 768 parameters) is replaced by an identity.
* The release's large backbones (``FULL_BACKBONES``), randomly initialised: those MONAI builds without
  torchvision in 2D — ``resnet18``/``resnet50``/``resnet101`` (MONAI ``ResNet``), ``densenet121``,
  ``seresnext50``, ``senet154`` (MONAI ``SENet``), ``vit_b16``/``vit_b32`` (MONAI ``ViT``, hidden 768, 12 layers)
  — and, in-project, ``xception`` / ``sexception`` (the release's Xception and Xception + squeeze-excitation:
  ``thrifty.methods.pe_cad.xception``, 2048-d features), ``vgg16`` (torchvision's VGG16 without BN and with the
  release's ``Linear(25088, 1)`` head: ``thrifty.methods.pe_cad.vgg``, 25088-d features = the flattened 7x7-pooled
  map) and ``drn_a_50`` / ``drn_d_54`` (fyu's dilated residual networks: ``thrifty.methods.pe_cad.drn``, 2048-d /
  512-d globally pooled features at stride 8).

Deviations (deliberate):

* No ImageNet weights: nothing is downloaded. The ``imagenet`` normalisation is a flag (:func:`normalise`,
  ``augment(..., imagenet=...)``) that the miniature never sets; the initialisations of the miniature are
  ``random | supervised | ssl:simclr | ssl:genesis`` (``thrifty.methods.pe_cad.pretrain``).
* Windowing is not done here (the release's ``window`` clips to the window and then min-max rescales *each
  slice*, ``(X - min X) / max(X - min X)``, which equals the fixed map [-250, 450] HU -> [0, 1] only when the
  slice reaches both ends of the window; the card asks for the fixed map).
* The release takes the neighbour slice names from a preprocessed ``image_dict`` (``image_minus1``,
  ``image_plus1``) whose boundary convention is in the unverified Kaggle preprocessing; here the first and last
  slices replicate themselves (edge replication).
* Contrast follows albumentations' float path (``img * alpha``, alpha ~ U[0.8, 1.2], clipped to [0, 1]).
  ShiftScaleRotate rotates about the image centre (cv2's ``getRotationMatrix2D`` uses ``(w/2, h/2)`` in pixel
  coordinates, half a pixel off) and samples bilinearly with ``grid_sample`` (zeros outside). Cutout reproduces
  albumentations' ``Cutout``: each hole has a centre drawn uniformly in [0, H] x [0, W] (both ends included), its
  top-left corner is ``clip(centre - size // 2, 0, H)`` and it is cut at the bottom/right border.
* Mixed precision is ``torch.autocast`` in bfloat16 (``amp=True``) instead of apex O1. The release's DDP splits
  a per-GPU batch (effective batch = per-GPU batch x GPUs); here ``batch_size`` is the effective (global) batch and
  each of W ranks takes ``batch_size / W`` of it, so the learning rate needs no change when W changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thrifty.core import distributed
from thrifty.core.nn import count_parameters as count_parameters  # re-exported
from thrifty.methods.pe_cad.config import AugmentConfig  # the one augmentation-settings class (re-exported)
from thrifty.methods.pe_cad.drn import DRNA50, DRND54
from thrifty.methods.pe_cad.pooled import PooledBackbone
from thrifty.methods.pe_cad.vgg import VGG16
from thrifty.methods.pe_cad.xception import SeXception, Xception

__all__ = [
    "FULL_BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MINI_BACKBONES",
    "AugmentConfig",
    "ShardedBatchSampler",
    "SmallCNN",
    "SmallViT",
    "augment",
    "build_backbone",
    "count_parameters",
    "crop_resize",
    "cutout",
    "cutout_boxes",
    "epoch_batches",
    "extract_features",
    "gather_shards",
    "linear_warmup_decay",
    "normalise",
    "random_contrast",
    "shard_rows",
    "shift_scale_rotate",
    "ssr_theta",
    "stack_all",
    "stack_slices",
    "train_stage1",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MINI_BACKBONES = ("small_cnn", "small_vit")
# the release's backbone switch (train1.py transferLearningModels + save_features1.py), plus ViT-B/16 and /32
FULL_BACKBONES = (
    "resnet18",
    "resnet50",
    "resnet101",
    "densenet121",
    "vgg16",
    "xception",
    "senet154",
    "seresnext50",
    "drn_a_50",
    "drn_d_54",
    "sexception",
    "vit_b16",
    "vit_b32",
)


def _as_tensor(x: Any, dtype: torch.dtype = torch.float32) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# input: 3-slice stacking and lung-box crop


def stack_slices(volume: Tensor | np.ndarray, i: int) -> Tensor:
    """Slices i-1, i, i+1 of a windowed exam as three channels, edges replicated.

    volume: (S, H, W) float → (3, H, W): channel 0 = slice max(i-1, 0), channel 1 = slice i, channel 2 =
    slice min(i+1, S-1).
    """
    v = _as_tensor(volume)
    if v.ndim != 3:
        raise ValueError(f"expected a volume of shape (S, H, W), got {tuple(v.shape)}")
    s = v.shape[0]
    if not 0 <= i < s:
        raise IndexError(f"slice {i} out of range for {s} slices")
    return v[[max(i - 1, 0), i, min(i + 1, s - 1)]]


def stack_all(volume: Tensor | np.ndarray) -> Tensor:
    """:func:`stack_slices` for every slice at once: (S, H, W) → (S, 3, H, W)."""
    v = _as_tensor(volume)
    if v.ndim != 3:
        raise ValueError(f"expected a volume of shape (S, H, W), got {tuple(v.shape)}")
    s = v.shape[0]
    i = torch.arange(s)
    idx = torch.stack([(i - 1).clamp_min(0), i, (i + 1).clamp_max(s - 1)], dim=1)  # (S, 3)
    return v[idx]


def crop_resize(images: Tensor | np.ndarray, bbox: Sequence[int] | Tensor | np.ndarray, size: int) -> Tensor:
    """Crop to the lung bounding box and resize (bilinear, half-pixel centres, no antialiasing: ``cv2.resize``'s
    default ``INTER_LINEAR``).

    images: (N, C, H, W); bbox: ``(x0, y0, x1, y1)`` (end-exclusive pixel bounds, the release's order: the crop is
    ``images[..., y0:y1, x0:x1]``), one box for all images or (N, 4) one per image → (N, C, size, size).
    """
    x = _as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    boxes = torch.as_tensor(np.asarray(bbox), dtype=torch.long)
    if boxes.ndim == 1:
        boxes = boxes[None].expand(x.shape[0], 4)
    if boxes.shape != (x.shape[0], 4):
        raise ValueError(f"expected bbox of shape (4,) or ({x.shape[0]}, 4), got {tuple(boxes.shape)}")
    h, w = x.shape[-2:]
    out = x.new_empty(x.shape[0], x.shape[1], size, size)
    for key in torch.unique(boxes, dim=0):
        x0, y0, x1, y1 = (int(v) for v in key)
        x0, x1 = max(0, x0), min(w, x1)
        y0, y1 = max(0, y0), min(h, y1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"empty crop box {tuple(key.tolist())} for images of {h}x{w}")
        sel = (boxes == key).all(dim=1)
        crop = x[sel][..., y0:y1, x0:x1]
        out[sel] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return out


# ----------------------------------------------------------------------------------------------------------------
# augmentation (all draws from a torch.Generator; every image of a batch gets its own draws)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> Tensor:
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).to(device)
    return lo + (hi - lo) * u


def _rows(n: int, rows: slice | None, total: int | None) -> tuple[int, slice]:
    """How many images to draw parameters for, and which of them ``x`` (n images) holds."""
    if rows is None and total is None:
        return n, slice(0, n)
    if rows is None or total is None:
        raise ValueError("rows and total go together: x holds rows `rows` of a batch of `total` images")
    start, stop, _ = rows.indices(total)
    if stop - start != n:
        raise ValueError(f"rows {start}:{stop} of a batch of {total} images do not match x's {n} images")
    return total, slice(start, stop)


def random_contrast(
    x: Tensor,
    *,
    limit: float = 0.2,
    clip: bool = True,
    generator: torch.Generator,
    rows: slice | None = None,
    total: int | None = None,
) -> Tensor:
    """albumentations ``RandomContrast(limit)`` on float images: ``x * alpha`` with alpha ~ U[1 - limit, 1 + limit]
    per image, clipped to [0, 1] (albumentations' ``@clipped`` float path) unless ``clip=False``.
    x: (N, C, H, W) → (N, C, H, W). With ``rows`` and ``total``, x holds rows ``rows`` of a batch of ``total``
    images: every image's draw is made (the generator advances as for the whole batch) and x gets its rows'."""
    n, keep = _rows(x.shape[0], rows, total)
    alpha = _uniform(n, 1.0 - limit, 1.0 + limit, generator, x.device)[keep].to(x.dtype)
    out = x * alpha.view(-1, 1, 1, 1)
    return out.clamp(0.0, 1.0) if clip else out


def ssr_theta(
    n: int,
    height: int,
    width: int,
    *,
    shift: float = 0.2,
    scale: float = 0.2,
    rotate: float = 20.0,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> Tensor:
    """Draw ShiftScaleRotate parameters and return ``affine_grid`` matrices (n, 2, 3) (output → input, normalised
    coordinates, ``align_corners=False``).

    Per image: angle ~ U[-rotate, rotate] degrees, zoom s ~ U[1 - scale, 1 + scale], shifts dx, dy ~ U[-shift,
    shift] fractions of the width/height. The forward map in pixel units about the image centre is
    ``p_out = s R(angle) p_in + (dx W, dy H)``; ``grid_sample`` needs its inverse.
    """
    device = device or generator.device
    ang = _uniform(n, -rotate, rotate, generator, device) * (math.pi / 180.0)
    s = _uniform(n, 1.0 - scale, 1.0 + scale, generator, device)
    dx = _uniform(n, -shift, shift, generator, device)
    dy = _uniform(n, -shift, shift, generator, device)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # inverse map R(-angle) / s in pixel units, conjugated by D = diag(W/2, H/2) into normalised units
    a = width / height
    m00, m01 = cos / s, sin / (s * a)
    m10, m11 = -sin * a / s, cos / s
    tx, ty = 2.0 * dx, 2.0 * dy  # D^-1 (dx W, dy H)
    theta = torch.stack(
        [
            torch.stack([m00, m01, -(m00 * tx + m01 * ty)], dim=1),
            torch.stack([m10, m11, -(m10 * tx + m11 * ty)], dim=1),
        ],
        dim=1,
    )
    return theta


def shift_scale_rotate(
    x: Tensor,
    *,
    shift: float = 0.2,
    scale: float = 0.2,
    rotate: float = 20.0,
    generator: torch.Generator,
    rows: slice | None = None,
    total: int | None = None,
) -> Tensor:
    """albumentations ``ShiftScaleRotate(shift_limit, scale_limit, rotate_limit, border_mode=CONSTANT, value=0)``
    with bilinear sampling (see :func:`ssr_theta`). x: (N, C, H, W) → (N, C, H, W), zeros where the source falls
    outside the image. ``rows`` / ``total``: as :func:`random_contrast`."""
    _, _, h, w = x.shape
    n, keep = _rows(x.shape[0], rows, total)
    theta = ssr_theta(n, h, w, shift=shift, scale=scale, rotate=rotate, generator=generator, device=x.device)[keep]
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout_boxes(
    n: int, height: int, width: int, *, holes: int = 2, frac: float = 0.4, generator: torch.Generator
) -> Tensor:
    """Holes of albumentations ``Cutout(num_holes=holes, max_h_size=int(frac·H), max_w_size=int(frac·W))``:
    (n, holes, 4) int64 rows ``(x0, y0, x1, y1)`` (end-exclusive), centre uniform on [0, H] x [0, W] (inclusive),
    ``y0 = clip(cy - hh // 2, 0, H)``, ``y1 = min(y0 + hh, H)`` (likewise for x)."""
    hh, ww = int(frac * height), int(frac * width)
    u = torch.rand(n, holes, 2, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    cy = torch.minimum((u[..., 0] * (height + 1)).floor().long(), torch.tensor(height))
    cx = torch.minimum((u[..., 1] * (width + 1)).floor().long(), torch.tensor(width))
    y0 = (cy - hh // 2).clamp(0, height)
    x0 = (cx - ww // 2).clamp(0, width)
    return torch.stack([x0, y0, (x0 + ww).clamp_max(width), (y0 + hh).clamp_max(height)], dim=-1)


def cutout(
    x: Tensor,
    *,
    holes: int = 2,
    frac: float = 0.4,
    fill: float = 0.0,
    generator: torch.Generator,
    rows: slice | None = None,
    total: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Cutout (:func:`cutout_boxes`): x (N, C, H, W) → (x with ``fill`` in the holes on every channel, boxes
    (N, holes, 4)). ``rows`` / ``total``: as :func:`random_contrast`."""
    _, _, h, w = x.shape
    n, keep = _rows(x.shape[0], rows, total)
    boxes = cutout_boxes(n, h, w, holes=holes, frac=frac, generator=generator)[keep].to(x.device)
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    b = boxes[..., None, None]  # (N, holes, 4, 1, 1)
    inside = (cols >= b[:, :, 0]) & (cols < b[:, :, 2]) & (rows >= b[:, :, 1]) & (rows < b[:, :, 3])
    mask = inside.any(dim=1, keepdim=True)  # (N, 1, H, W)
    return x.masked_fill(mask, fill), boxes


def normalise(x: Tensor, *, imagenet: bool) -> Tensor:
    """ImageNet mean/std normalisation when ``imagenet`` (an ImageNet-initialised backbone), identity otherwise.
    x: (N, 3, H, W) in [0, 1]."""
    if not imagenet:
        return x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(
    x: Tensor,
    *,
    generator: torch.Generator,
    imagenet: bool = False,
    config: AugmentConfig | None = None,
    rows: slice | None = None,
    total: int | None = None,
) -> Tensor:
    """The release's training pipeline: contrast → shift-scale-rotate → cutout → (ImageNet normalisation only if
    ``imagenet``). x: (N, 3, H, W) windowed in [0, 1] → (N, 3, H, W).

    DDP: with ``rows`` and ``total`` x holds rows ``rows`` of a global batch of ``total`` images (a rank's shard,
    :meth:`ShardedBatchSampler.rows`); the draws of all ``total`` images are made and x gets its rows', so every
    rank's generator stays in step and the ranks together augment exactly as one process augments the whole batch.
    """
    c = config or AugmentConfig()
    x = random_contrast(x, limit=c.contrast, generator=generator, rows=rows, total=total)
    x = shift_scale_rotate(x, shift=c.shift, scale=c.scale, rotate=c.rotate, generator=generator, rows=rows,
                           total=total)  # fmt: skip
    x = cutout(x, holes=c.cutout_holes, frac=c.cutout_frac, generator=generator, rows=rows, total=total)[0]
    return normalise(x, imagenet=imagenet)


# ----------------------------------------------------------------------------------------------------------------
# backbones: features(x) -> (N, D) penultimate, classify(f) -> (N,), forward(x) = classify(features(x)),
# feature_map(x) -> (N, map_channels, h, w) (h = H / map_stride) for restoration heads


def _conv_bn(cin: int, cout: int, *, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(PooledBackbone):
    """The miniature's CNN: 4 stride-2 stages of widths ``(w, 2w, 3w, 4w)`` (conv3x3/2-BN-ReLU, then, except in the
    first stage, conv3x3-BN-ReLU), a 1x1 conv-BN-ReLU to ``feature_dim``, global average pooling,
    Linear(feature_dim, 1).

    x: (N, in_channels, H, W) → ``features`` (N, feature_dim), ``forward`` (N,) logits, ``feature_map``
    (N, feature_dim, ⌈H/16⌉, ⌈W/16⌉).
    """

    def __init__(self, *, in_channels: int = 3, width: int = 24, feature_dim: int = 128) -> None:
        super().__init__()
        widths = [width * k for k in (1, 2, 3, 4)]
        stages, cin = [], in_channels
        for k, c in enumerate(widths):  # the first stage is a single conv: its 2nd conv at H/2 costs ~35% of a step
            stages.append(nn.Sequential(_conv_bn(cin, c, stride=2), *([_conv_bn(c, c)] if k else [])))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.proj = _conv_bn(cin, feature_dim, k=1)
        self.head = nn.Linear(feature_dim, 1)
        self.feature_dim = feature_dim
        self.map_channels = feature_dim
        self.map_stride = 16

    def feature_map(self, x: Tensor) -> Tensor:
        return self.proj(self.stages(x))


class SmallViT(nn.Module):
    """MONAI ``ViT`` in 2D with its CLS token and Linear classification head (no Tanh).

    x: (N, in_channels, image_size, image_size) → ``features`` (N, hidden) = the CLS token after the final
    LayerNorm, ``forward`` (N,) logits, ``feature_map`` (N, hidden, image_size/patch, image_size/patch) = the
    normalised patch tokens on their grid.
    """

    def __init__(
        self,
        *,
        image_size: int = 64,
        in_channels: int = 3,
        patch_size: int = 8,
        hidden_size: int = 96,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_dim: int = 384,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from monai.networks.nets.vit import ViT  # lazy: MONAI is an optional dependency

        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.vit = ViT(
            in_channels=in_channels,
            img_size=(image_size, image_size),
            patch_size=(patch_size, patch_size),
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=True,
            num_classes=1,
            dropout_rate=dropout,
            spatial_dims=2,
            post_activation="none",
            qkv_bias=False,
        )
        for blk in self.vit.blocks:  # MONAI builds this LayerNorm even without cross-attention; it is never used
            if not getattr(blk, "with_cross_attention", False) and hasattr(blk, "norm_cross_attn"):
                blk.norm_cross_attn = nn.Identity()
        self.grid = image_size // patch_size
        self.feature_dim = hidden_size
        self.map_channels = hidden_size
        self.map_stride = patch_size

    def _encode(self, x: Tensor) -> Tensor:
        """(N, C, H, W) → normalised tokens (N, 1 + g², hidden), CLS first."""
        v = self.vit
        t = v.patch_embedding(x)
        t = torch.cat([v.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        for blk in v.blocks:
            t = blk(t)
        return v.norm(t)

    def feature_map(self, x: Tensor) -> Tensor:
        t = self._encode(x)[:, 1:]
        return t.transpose(1, 2).reshape(t.shape[0], -1, self.grid, self.grid)

    def features(self, x: Tensor) -> Tensor:
        return self._encode(x)[:, 0]

    def classify(self, features: Tensor) -> Tensor:
        return self.vit.classification_head(features).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))


class _MonaiCNN(PooledBackbone):
    """A MONAI 2D CNN (``resnet*``, ``densenet121``, ``seresnext50``, ``senet154``) behind the common interface:
    ``feature_map`` = the last convolutional map, ``features`` = its global average (2048-d for the ResNet-50
    family, 1024-d for DenseNet-121), ``forward`` = Linear(D, 1)."""

    def __init__(self, name: str, *, in_channels: int = 3) -> None:
        super().__init__()
        from monai.networks import nets  # lazy

        if name.startswith("resnet"):
            net = getattr(nets, name)(spatial_dims=2, n_input_channels=in_channels, feed_forward=False)
            self.body = nn.Sequential(
                net.conv1, net.bn1, net.act, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
            )
            dim = net.in_planes  # channels of layer4's output
        elif name == "densenet121":
            net = nets.DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1)
            self.body = nn.Sequential(net.features, nn.ReLU(inplace=False))
            dim = net.class_layers.out.in_features
        elif name in ("seresnext50", "senet154"):
            cls = nets.SEResNext50 if name == "seresnext50" else nets.SENet154
            net = cls(spatial_dims=2, in_channels=in_channels, num_classes=1)
            self.body = nn.Sequential(net.layer0, net.layer1, net.layer2, net.layer3, net.layer4)
            dim = net.last_linear.in_features
        else:
            raise ValueError(f"not a MONAI CNN backbone: {name!r}")
        self.head = nn.Linear(dim, 1)
        self.feature_dim = dim
        self.map_channels = dim
        self.map_stride = 32

    def feature_map(self, x: Tensor) -> Tensor:
        return self.body(x)


def build_backbone(
    name: str, *, image_size: int, in_channels: int = 3, seed: int | None = None, **kwargs: Any
) -> nn.Module:
    """A stage-1 backbone with ``features`` / ``forward`` / ``feature_map``, randomly initialised (from ``seed``
    when given, without touching the global RNG's state). ``kwargs`` go to :class:`SmallCNN` / :class:`SmallViT` /
    the ViT-B models, to ``xception.Xception`` / ``xception.SeXception`` (e.g. ``width``, ``se_reduction``), to
    ``vgg.VGG16`` (e.g. ``width``, ``batch_norm``, ``head``, ``pool_size``) and to ``drn.DRNA50`` / ``drn.DRND54``
    (e.g. ``width``).

    Names: ``small_cnn``, ``small_vit`` (the miniature) and ``FULL_BACKBONES`` (the release's switch); anything else
    raises ``ValueError``.
    """
    if name not in MINI_BACKBONES + FULL_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {MINI_BACKBONES + FULL_BACKBONES}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_backbone(name, image_size=image_size, in_channels=in_channels, **kwargs)
    if name == "small_cnn":
        return SmallCNN(in_channels=in_channels, **kwargs)
    if name == "small_vit":
        return SmallViT(image_size=image_size, in_channels=in_channels, **kwargs)
    if name in ("vit_b16", "vit_b32"):
        patch = 16 if name == "vit_b16" else 32
        vit_kw = dict(patch_size=patch, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072)
        return SmallViT(image_size=image_size, in_channels=in_channels, **{**vit_kw, **kwargs})
    if name in ("xception", "sexception"):
        return (Xception if name == "xception" else SeXception)(in_channels=in_channels, **kwargs)
    if name == "vgg16":
        return VGG16(in_channels=in_channels, **kwargs)
    if name in ("drn_a_50", "drn_d_54"):
        return (DRNA50 if name == "drn_a_50" else DRND54)(in_channels=in_channels, **kwargs)
    return _MonaiCNN(name, in_channels=in_channels)


# ----------------------------------------------------------------------------------------------------------------
# training and feature extraction


def linear_warmup_decay(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int):
    """transformers' ``get_linear_schedule_with_warmup``: lr·t/warmup during warm-up, then linear decay to 0 at
    ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """``steps`` index batches cut from epochs of random permutations of 0..n-1 (every sample once per epoch; an
    epoch's last batch may be short)."""
    per_epoch = max(1, math.ceil(n / batch_size))
    perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(steps / per_epoch))]
    out = []
    for perm in perms:
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


def shard_rows(total: int, *, rank: int, world_size: int) -> slice:
    """The contiguous rows of a global batch of ``total`` that rank ``rank`` of ``world_size`` takes.

    Rank r takes rows ``ceil(r·total/W) : ceil((r+1)·total/W)``: the shares are disjoint, cover the batch in rank
    order and differ in size by at most one (equal when W divides ``total``); rank 0's share is empty only for an
    empty batch.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return slice(-(-rank * total // world_size), -(-(rank + 1) * total // world_size))


def gather_shards(t: Tensor, total: int, *, rank: int, world_size: int, grad: bool = False) -> Tensor:
    """The ranks' shards of a global batch of ``total`` rows, concatenated in rank order (the inverse of
    :func:`shard_rows`; identity for one process).

    t: (n_r, ...) this rank's rows, ``n_r`` the length of its :func:`shard_rows` (0 allowed) → (total, ...) on every
    rank. Shards are padded to ``ceil(total / W)`` rows for the collective and the padding dropped. With ``grad``
    the gradient flows back to every rank's rows (:func:`thrifty.core.distributed.all_gather_with_grad`: when every
    rank computes the same loss from the gathered tensor and the gradients are then averaged over ranks, the result
    is one process's gradient on the whole batch).
    """
    if world_size == 1:
        return t
    mine = shard_rows(total, rank=rank, world_size=world_size)
    if t.shape[0] != mine.stop - mine.start:
        raise ValueError(f"rank {rank} holds {t.shape[0]} rows, its share of {total} is {mine.stop - mine.start}")
    width = -(-total // world_size)
    full = torch.cat([t, t.new_zeros((width - t.shape[0], *t.shape[1:]))])
    gathered = distributed.all_gather_with_grad(full) if grad else distributed.all_gather_cat(full)
    keep = []
    for r in range(world_size):
        share = shard_rows(total, rank=r, world_size=world_size)
        keep.append(torch.arange(r * width, r * width + share.stop - share.start))
    return gathered[torch.cat(keep).to(gathered.device)]


class ShardedBatchSampler:
    """Step-indexed batches of slice indices for one or many (DDP) processes.

    * **Global batches.** Exactly :func:`epoch_batches` ``(n, batch_size, steps, generator)``: epochs of random
      permutations of 0..n-1 drawn from ``generator`` when the sampler is built (so they depend only on the
      generator's seed and the step), cut into batches of ``batch_size`` (an epoch's last batch may be short).
      Every rank builds the same global batches from the same seed.
    * **Shards.** Rank r of W takes the contiguous rows :func:`shard_rows` of each global batch: within a step the
      ranks' shards are disjoint and together make the global batch; within an epoch every index is drawn by one
      rank once. ``batch_size`` is the *effective* batch (per-rank batch x W): one process with ``batch_size`` and
      W processes with ``batch_size / W`` each train on the same samples, so the learning rate stays as configured.
    * **Weighting.** An uneven (short) batch gives ranks shares that differ by one; :meth:`loss_scale` turns a rank's
      mean loss into its share of the global mean (DDP averages gradients over ranks).
    * **Empty shares.** A short batch of fewer rows than ranks leaves some ranks without rows; :meth:`batch_at`
      then gives them the batch's first index with :meth:`loss_scale` 0, so their forward/backward (which DDP needs
      from every rank) adds nothing.
    """

    def __init__(
        self,
        *,
        n: int,
        batch_size: int,
        steps: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n < 1 or batch_size < 1 or steps < 0:
            raise ValueError(f"need n >= 1, batch_size >= 1 and steps >= 0, got {n}, {batch_size}, {steps}")
        shard_rows(0, rank=rank, world_size=world_size)  # validates rank / world_size
        self.n, self.batch_size, self.steps = n, batch_size, steps
        self.rank, self.world_size = rank, world_size
        self.global_batches = epoch_batches(n, batch_size, steps, generator)

    def __len__(self) -> int:
        return self.steps

    def global_batch(self, step: int) -> Tensor:
        """The global batch (m,) of 0-based ``step``, the same on every rank."""
        return self.global_batches[step]

    def rows(self, step: int) -> slice:
        """This rank's rows of the global batch of ``step`` (possibly empty)."""
        return shard_rows(len(self.global_batches[step]), rank=self.rank, world_size=self.world_size)

    def batch_at(self, step: int) -> Tensor:
        """This rank's indices (≥ 1) for ``step``: its rows of the global batch, or the batch's first index when its
        share is empty (weight 0, :meth:`loss_scale`)."""
        rows = self.rows(step)
        return self.global_batches[step][rows if rows.stop > rows.start else slice(0, 1)]

    def draw_rows(self, step: int) -> slice:
        """The rows of the global batch :meth:`batch_at` returns (for :func:`augment`'s ``rows``)."""
        rows = self.rows(step)
        return rows if rows.stop > rows.start else slice(0, 1)

    def loss_scale(self, step: int) -> float:
        """``n_rank · W / m``: times this rank's mean loss over its ``n_rank`` rows, DDP's average over the W ranks
        is the mean over the global batch's m rows (1.0 for one process, 0.0 for an empty share)."""
        rows, m = self.rows(step), len(self.global_batches[step])
        return (rows.stop - rows.start) * self.world_size / m

    def __iter__(self):
        return (self.batch_at(step) for step in range(self.steps))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_stage1(
    model: nn.Module,
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 4e-4,
    warmup_steps: int = 0,
    seed: int = 0,
    imagenet: bool = False,
    augmentation: AugmentConfig | None = None,
    amp: bool = False,
) -> list[float]:
    """Fine-tune a backbone on per-slice PE labels (the release's ``train1.py`` loop): BCE-with-logits, Adam,
    linear warm-up (release: 0 steps) then linear decay to 0 over ``steps``, training-time augmentation
    (:func:`augment`). Batches are epochs of random permutations; every draw comes from ``seed``.

    images: (N, 3, H, W) windowed, stacked, cropped, in [0, 1] (on any device; batches are moved to the model's);
    labels: (N,) in {0, 1} → the loss of each step. The model is trained in place.
    """
    device = _model_device(model)
    x_all = _as_tensor(images)
    y_all = _as_tensor(labels).float()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = linear_warmup_decay(opt, warmup_steps=warmup_steps, total_steps=steps)
    losses = []
    model.train()
    for idx in epoch_batches(x_all.shape[0], batch_size, steps, gen):
        x = augment(x_all[idx].to(device, torch.float32), generator=gen, imagenet=imagenet, config=augmentation)
        y = y_all[idx].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def extract_features(
    model: nn.Module, images: Tensor | np.ndarray, *, batch_size: int = 64, imagenet: bool = False
) -> tuple[Tensor, Tensor]:
    """Penultimate features and PE probabilities in eval mode, no augmentation (``save_features1.py``).

    images: (N, 3, H, W) in [0, 1] → (features (N, D) float32 on CPU, probabilities (N,) = sigmoid(logits))."""
    device = _model_device(model)
    x_all = _as_tensor(images)
    was_training = model.training
    model.eval()
    feats, probs = [], []
    for i in range(0, x_all.shape[0], batch_size):
        x = normalise(x_all[i : i + batch_size].to(device, torch.float32), imagenet=imagenet)
        f = model.features(x)
        feats.append(f.float().cpu())
        probs.append(torch.sigmoid(model.classify(f)).float().cpu())
    model.train(was_training)
    d = getattr(model, "feature_dim", 0)
    if not feats:
        return torch.zeros(0, d), torch.zeros(0)
    return torch.cat(feats), torch.cat(probs)
