"""Clip augmentation for the RGB and temporal-gradient (TG) views of Xiao et al., *Learning from Temporal Gradient
for Semi-supervised Action Recognition* (CVPR 2022, arXiv 2111.13241), in plain torch (no torchvision, no imgaug).

Clips are float tensors ``(N, C, T, H, W)``. Every random number comes from the caller's CPU ``torch.Generator``
in a fixed order with a fixed count per clip, so the same seed gives the same output.

What the release (lambert-x/video-semisup @17cc13c) does, and what is verified here:

* **Shared crop and flip.** The train pipelines (config
  ``configs/ucf101_main/r3d_r18_8x8x1_180e_ucf101_rgb_offlinetg_5percent_align0123_1clip_cosine_weak_sameclip_precisebn_ptv_new_loss_half.py``
  L86-115) run ``Resize(-1, 256)``, ``RandomResizedCrop``, ``Resize(224, 224)`` and ``Flip(0.5)`` lazily and then
  ``Fuse_WithDiff`` (``mmaction/datasets/pipelines/custom_temporal.py`` L414-509), which cuts the *same* rounded
  ``crop_bbox`` from "imgs" and "imgs_diff" (L436-437, L475; ``tg_random_shift`` is left at 0), resizes both
  bilinearly (L489-496) and applies the *same* flip to both (L499-503). Here: :func:`sample_crop_flip` once, then
  :func:`apply_crop_flip` with that :class:`CropFlip` on each modality.
* **RandomResizedCrop** (``mmaction/datasets/pipelines/augmentations.py`` L767-846): defaults
  ``area_range=(0.08, 1.0)``, ``aspect_ratio_range=(3/4, 4/3)``; 10 candidates with log-uniform ratio and uniform
  area, ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``, the first that fits is placed uniformly; if
  none fits, the centre square of side ``min(H, W)`` (torchvision instead falls back to a ratio-clamped centre crop;
  we follow the release). ``Flip``: horizontal, ``rand < 0.5`` (L1369-1392).
* **Test views.** ``Resize(-1, 256)`` keeps the ratio with ``mmcv.rescale_size`` (``int(side * scale + 0.5)``,
  L1189-1199); ``ThreeCrop(256)`` (L1805-1870) needs the crop to span the short side and takes offsets
  ``0, (L - s) // 2, 2 * ((L - s) // 2)`` along the long side (MMAction2 lists them left, right, middle; we return
  left/top, centre, right/bottom -- the order is irrelevant once scores are averaged).
* **Strong view.** The unlabelled dataset builds it from a deep copy of the weak view's output
  (``mmaction/datasets/rawframe_dataset_unlabeled_multiview_contrastive.py`` L74-76), so it shares the weak crop and
  flip, then applies ``Imgaug('default')`` to "imgs" and a *second, separate* ``Imgaug_Custom('default',
  modality='imgs_diff')`` to TG (config L117-120). Each calls ``aug.to_deterministic()`` once per sample and then
  augments every frame with it (``augmentations.py`` L459-462, ``custom_augmentation.py`` L95-98): the same ops and
  parameters for all frames of a clip, **independent draws for RGB and TG**. :func:`strong_augment_pair` does that.
* **imgaug "default"** (``augmentations.py`` L359-415) is RandAugment: ``SomeOf(n=2)`` of 15 ops at level
  ``9/10``, applied in list order (imgaug ``SomeOf(random_order=False)``, ``imgaug/augmenters/meta.py``
  ``_get_augmenter_order``): ShearX/ShearY ``17.19 * 0.9`` degrees, TranslateX/Y ``0.2 * 0.9`` of the side, Rotate
  ``30 * 0.9`` degrees (bilinear, constant fill 0: imgaug ``Affine`` defaults), Posterize to
  ``max(1, int(4 * 0.9)) = 3`` bits (``v & ~31``), Solarize invert ``v >= 256 * 0.9``, pillike EnhanceColor /
  Contrast / Brightness / Sharpness with factor ``1.8 * 0.9 + 0.1 = 1.72``, Autocontrast (cutoff 0), Equalize,
  Invert, and one squared Cutout of side ``0.2 * 0.9`` of the height at a uniform centre, filled with 128
  (imgaug ``Cutout`` defaults). :data:`STRONG_OPS` lists the same 15 ops in the same order.

Deviations of :func:`strong_augment` from the release, all deliberate:

* the release draws the sign of each geometric op once per augmenter object (``random.choice`` at construction,
  i.e. once per data-loader worker); we draw it per clip and op;
* data-dependent ops (autocontrast, equalize, contrast's mean) use statistics of the whole clip, not of each frame,
  so the op is the same map for every frame (a static clip stays static); the release computes them per frame;
* ops run in float on [0, 1] without re-quantising to uint8 after each op (posterize, solarize and equalize
  quantise their input to 8 bits as the uint8 ops do);
* ``magnitude`` may be changed (the release fixes the level at 0.9).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RELEASE_LEVEL",
    "STRONG_OPS",
    "CropFlip",
    "apply_crop_flip",
    "resize_short",
    "sample_crop_flip",
    "strong_augment",
    "strong_augment_pair",
    "three_crop",
]

#: The release's RandAugment level: ``cur_magnitude / max_magnitude = 9 / 10`` (``augmentations.py`` L376-377).
RELEASE_LEVEL = 0.9

#: The 15 operations of imgaug "default" in the release's order (``augmentations.py`` L384-413).
STRONG_OPS: tuple[str, ...] = (
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "posterize",
    "solarize",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "autocontrast",
    "equalize",
    "invert",
    "cutout",
)

_LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion (ITU-R 601-2), used by EnhanceColor / EnhanceContrast
_CUTOUT_FILL = 128.0 / 255.0  # imgaug Cutout default cval=128


# --------------------------------------------------------------------------------------------------- validation


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator")


def _check_clip(x: Tensor, *, name: str = "x", unit_range: bool = False) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor")
    if x.ndim != 5:
        raise ValueError(f"{name} must have shape (N, C, T, H, W), got {tuple(x.shape)}")
    if unit_range and x.numel() and (bool(torch.isnan(x).any()) or x.min() < 0 or x.max() > 1):
        raise ValueError(f"{name} values must lie in [0, 1]")


def _check_int(value: int, name: str, *, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


# ------------------------------------------------------------------------------------------ shared crop and flip


@dataclasses.dataclass(frozen=True)
class CropFlip:
    """Crop boxes and flips for ``n`` clips of an ``height x width`` image, shared by every modality.

    Attributes:
        boxes: LongTensor (n, 4), rows ``(top, left, h, w)`` with the box inside the image.
        flips: BoolTensor (n,), True = flip horizontally (after the crop and resize).
        height: image height the boxes refer to.
        width: image width the boxes refer to.
    """

    boxes: Tensor
    flips: Tensor
    height: int
    width: int

    def __post_init__(self) -> None:
        _check_int(self.height, "height", lo=1)
        _check_int(self.width, "width", lo=1)
        if not isinstance(self.boxes, Tensor) or self.boxes.dtype != torch.long or self.boxes.ndim != 2:
            raise ValueError("boxes must be a LongTensor of shape (n, 4)")
        if self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (n, 4), got {tuple(self.boxes.shape)}")
        if not isinstance(self.flips, Tensor) or self.flips.dtype != torch.bool or self.flips.shape != (len(self),):
            raise ValueError(f"flips must be a BoolTensor of shape ({len(self)},)")
        if len(self):
            top, left, h, w = self.boxes.unbind(1)
            if bool((h < 1).any() | (w < 1).any() | (top < 0).any() | (left < 0).any()):
                raise ValueError("crop boxes need top, left >= 0 and h, w >= 1")
            if bool((top + h > self.height).any() | (left + w > self.width).any()):
                raise ValueError(f"crop boxes must lie inside the {self.height}x{self.width} image")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def sample_crop_flip(
    n: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    max_attempts: int = 10,
) -> CropFlip:
    """Random-resized-crop boxes and horizontal flips for ``n`` clips (MMAction2 ``RandomResizedCrop`` + ``Flip``).

    Per clip, ``max_attempts`` candidates with area fraction ``~ U(scale)`` and aspect ratio ``w / h`` log-uniform
    in ``ratio``; the first that fits is placed uniformly, else the centre square of side ``min(height, width)``.
    Draws: one ``torch.rand(n, 2 * max_attempts + 3)`` (areas, log-ratios, y and x offsets, flip) per call, so each
    clip consumes the same number of draws whatever it hits.

    Args:
        n: number of clips (>= 0).
        height, width: image size the crops are cut from.
        generator: CPU generator, the only source of randomness.
        scale: (min, max) crop area as a fraction of the image area, ``0 < min <= max <= 1``.
        ratio: (min, max) crop aspect ratio ``w / h``, ``0 < min <= max``.
        flip_p: flip probability in [0, 1].
        max_attempts: candidates before the centre fallback (>= 1).

    Returns:
        :class:`CropFlip` with boxes (n, 4) and flips (n,).
    """
    _check_generator(generator)
    _check_int(n, "n", lo=0)
    _check_int(height, "height", lo=1)
    _check_int(width, "width", lo=1)
    _check_int(max_attempts, "max_attempts", lo=1)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")

    a = max_attempts
    u = torch.rand((n, 2 * a + 3), generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :a])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, a : 2 * a])
    cand_w = torch.round(torch.sqrt(area * aspect)).long()
    cand_h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (cand_w >= 1) & (cand_w <= width) & (cand_h >= 1) & (cand_h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first fitting candidate
    found = fits.any(dim=1)
    side = min(height, width)
    h = torch.where(found, cand_h.gather(1, first).squeeze(1), torch.full_like(found, side, dtype=torch.long))
    w = torch.where(found, cand_w.gather(1, first).squeeze(1), torch.full_like(found, side, dtype=torch.long))
    top_r = torch.floor(u[:, 2 * a] * (height - h + 1).double()).long().clamp(min=0)
    left_r = torch.floor(u[:, 2 * a + 1] * (width - w + 1).double()).long().clamp(min=0)
    top = torch.where(found, torch.minimum(top_r, height - h), torch.full_like(h, (height - side) // 2))
    left = torch.where(found, torch.minimum(left_r, width - w), torch.full_like(w, (width - side) // 2))
    flips = u[:, 2 * a + 2] < flip_p
    return CropFlip(boxes=torch.stack([top, left, h, w], dim=1), flips=flips, height=height, width=width)


def _resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, K, h, w) to ``size`` with half-pixel centres and no antialiasing (= cv2 INTER_LINEAR,
    which ``mmcv.imresize(..., 'bilinear')`` uses)."""
    if tuple(img.shape[-2:]) == size:
        return img.clone()
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=False)


def apply_crop_flip(x: Tensor, params: CropFlip, out_size: int) -> Tensor:
    """Cut ``params.boxes[i]`` from every frame of clip ``i``, resize it bilinearly to ``out_size`` squared and flip
    it horizontally where ``params.flips[i]`` (the release's crop -> resize -> flip order).

    Applying one :class:`CropFlip` to the RGB clip and to its TG gives both exactly the same geometry.

    Args:
        x: (N, C, T, H, W) float; ``N == len(params)`` and ``(H, W) == (params.height, params.width)``.
        params: from :func:`sample_crop_flip`.
        out_size: output side (>= 1).

    Returns:
        (N, C, T, out_size, out_size).
    """
    _check_clip(x)
    _check_int(out_size, "out_size", lo=1)
    if not isinstance(params, CropFlip):
        raise ValueError("params must be a CropFlip")
    n, c, t, height, width = x.shape
    if len(params) != n:
        raise ValueError(f"params hold {len(params)} crops for {n} clips")
    if (height, width) != (params.height, params.width):
        raise ValueError(f"params were sampled for {params.height}x{params.width}, got clips of {height}x{width}")
    out = x.new_empty((n, c, t, out_size, out_size))
    for i, (top, left, h, w) in enumerate(params.boxes.tolist()):
        crop = x[i, :, :, top : top + h, left : left + w].reshape(1, c * t, h, w)
        crop = _resize(crop, (out_size, out_size))
        if bool(params.flips[i]):
            crop = crop.flip(-1)
        out[i] = crop.reshape(c, t, out_size, out_size)
    return out


# -------------------------------------------------------------------------------------------------- test views


def resize_short(x: Tensor, short: int) -> Tensor:
    """Resize so the short side equals ``short``, keeping the ratio (MMAction2 ``Resize(scale=(-1, short))``: the long
    side becomes ``int(long * short / short_in + 0.5)``), bilinear.

    Args:
        x: (N, C, T, H, W) float.
        short: target short side (>= 1).

    Returns:
        (N, C, T, H', W') with ``min(H', W') == short``.
    """
    _check_clip(x)
    _check_int(short, "short", lo=1)
    n, c, t, height, width = x.shape
    factor = short / min(height, width)
    new_h = short if height <= width else int(height * factor + 0.5)
    new_w = short if width < height else int(width * factor + 0.5)
    out = _resize(x.reshape(n, c * t, height, width), (new_h, new_w))
    return out.reshape(n, c, t, new_h, new_w)


def three_crop(x: Tensor, size: int) -> Tensor:
    """Three ``size``-square crops spanning the short side, at the start, centre and end of the long side
    (left/centre/right for landscape, top/centre/bottom for portrait), MMAction2 ``ThreeCrop`` offsets
    ``0, (L - size) // 2, 2 * ((L - size) // 2)``.

    Args:
        x: (N, C, T, H, W) float with ``min(H, W) == size`` (resize with :func:`resize_short` first).
        size: crop side.

    Returns:
        (N, 3, C, T, size, size).
    """
    _check_clip(x)
    _check_int(size, "size", lo=1)
    height, width = x.shape[-2:]
    if size != min(height, width):
        raise ValueError(f"three_crop needs size == the short side {min(height, width)}, got {size}")
    if width >= height:
        step = (width - size) // 2
        crops = [x[..., :, o : o + size] for o in (0, step, 2 * step)]
    else:
        step = (height - size) // 2
        crops = [x[..., o : o + size, :] for o in (0, step, 2 * step)]
    return torch.stack(crops, dim=1)


# ------------------------------------------------------------------------------------------------- strong view


def _gray(clip: Tensor) -> Tensor:
    """(C, T, H, W) -> (1, T, H, W) luma (RGB) or channel mean (other C)."""
    if clip.shape[0] == 3:
        w = clip.new_tensor(_LUMA).view(3, 1, 1, 1)
        return (clip * w).sum(0, keepdim=True)
    return clip.mean(0, keepdim=True)


def _blend(degenerate: Tensor, clip: Tensor, factor: float) -> Tensor:
    """PIL ``ImageEnhance``: ``degenerate + factor * (clip - degenerate)``, clipped to [0, 1]."""
    return (degenerate + factor * (clip - degenerate)).clamp(0.0, 1.0)


def _affine(clip: Tensor, a: tuple[float, float, float, float], b: tuple[float, float]) -> Tensor:
    """Resample (C, T, H, W): output pixel p (pixel units, relative to the image centre) reads input ``A p + b``;
    bilinear, constant fill 0 (imgaug ``Affine`` with order=1, cval=0, mode='constant')."""
    c, t, height, width = clip.shape
    a11, a12, a21, a22 = a
    theta = clip.new_tensor(
        [[a11, a12 * height / width, 2.0 * b[0] / width], [a21 * width / height, a22, 2.0 * b[1] / height]]
    ).unsqueeze(0)
    img = clip.reshape(1, c * t, height, width)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(c, t, height, width).clamp(0.0, 1.0)


def _to_uint8_levels(clip: Tensor) -> Tensor:
    return torch.floor(clip * 255.0 + 0.5)


def _equalize(clip: Tensor) -> Tensor:
    """PIL ``ImageOps.equalize`` per channel, with one histogram over all frames of the clip."""
    c = clip.shape[0]
    v = _to_uint8_levels(clip).long().reshape(c, -1)
    offsets = torch.arange(c, device=v.device).unsqueeze(1) * 256
    hist = torch.bincount((v + offsets).flatten(), minlength=256 * c).reshape(c, 256)
    total = v.shape[1]
    last = hist.gather(1, v.max(dim=1, keepdim=True).values)  # count of the highest level present
    step = torch.div(total - last, 255, rounding_mode="floor")  # (c, 1)
    before = torch.cumsum(hist, dim=1) - hist  # pixels strictly below each level
    lut = torch.div(torch.div(step, 2, rounding_mode="floor") + before, step.clamp(min=1), rounding_mode="floor")
    lut = torch.where(step > 0, lut.clamp(max=255), torch.arange(256, device=v.device).expand(c, 256))
    return (lut.gather(1, v).to(clip.dtype) / 255.0).reshape(clip.shape)


def _sharpness(clip: Tensor, factor: float) -> Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (kernel 1 1 1 / 1 5 1 / 1 1 1, /13),
    border pixels unfiltered."""
    c, t, height, width = clip.shape
    if height < 3 or width < 3:
        return clip.clone()
    kernel = clip.new_ones((1, 1, 3, 3))
    kernel[0, 0, 1, 1] = 5.0
    kernel /= 13.0
    img = clip.reshape(c * t, 1, height, width)
    smooth = img.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(img, kernel)
    return _blend(smooth.reshape(clip.shape), clip, factor)


def _apply_op(name: str, clip: Tensor, level: float, sign: float, pos: tuple[float, float]) -> Tensor:
    """One strong op on a single clip (C, T, H, W) in [0, 1]; the same map for every frame."""
    _, _, height, width = clip.shape
    factor = 1.8 * level + 0.1
    if name in ("shear_x", "shear_y"):
        shear = math.tan(math.radians(17.19 * level * sign))
        a = (1.0, -shear, 0.0, 1.0) if name == "shear_x" else (1.0, 0.0, -shear, 1.0)
        return _affine(clip, a, (0.0, 0.0))
    if name == "translate_x":
        return _affine(clip, (1.0, 0.0, 0.0, 1.0), (-0.2 * level * sign * width, 0.0))
    if name == "translate_y":
        return _affine(clip, (1.0, 0.0, 0.0, 1.0), (0.0, -0.2 * level * sign * height))
    if name == "rotate":
        angle = math.radians(30.0 * level * sign)
        cos, sin = math.cos(angle), math.sin(angle)
        return _affine(clip, (cos, sin, -sin, cos), (0.0, 0.0))
    if name == "posterize":
        shift = 2 ** (8 - max(1, int(4 * level)))
        return torch.floor(_to_uint8_levels(clip) / shift) * shift / 255.0
    if name == "solarize":
        return torch.where(clip * 255.0 >= 256.0 * level, 1.0 - clip, clip)
    if name == "color":
        return _blend(_gray(clip).expand_as(clip), clip, factor)
    if name == "contrast":
        return _blend(_gray(clip).mean().expand_as(clip), clip, factor)
    if name == "brightness":
        return _blend(torch.zeros_like(clip), clip, factor)
    if name == "sharpness":
        return _sharpness(clip, factor)
    if name == "autocontrast":
        lo = clip.amin(dim=(1, 2, 3), keepdim=True)
        hi = clip.amax(dim=(1, 2, 3), keepdim=True)
        stretched = (clip - lo) / (hi - lo).clamp(min=1e-12)
        return torch.where(hi > lo, stretched, clip).clamp(0.0, 1.0)
    if name == "equalize":
        return _equalize(clip)
    if name == "invert":
        return 1.0 - clip
    if name == "cutout":
        half = 0.2 * level * height / 2.0  # imgaug squared Cutout: side = size * image height
        cx, cy = pos[0] * width, pos[1] * height
        x1, x2 = (min(max(math.floor(v), 0), width) for v in (cx - half, cx + half))
        y1, y2 = (min(max(math.floor(v), 0), height) for v in (cy - half, cy + half))
        out = clip.clone()
        out[..., y1:y2, x1:x2] = _CUTOUT_FILL
        return out
    raise ValueError(f"unknown strong op {name!r}; known: {', '.join(STRONG_OPS)}")


def strong_augment(
    x: Tensor,
    *,
    generator: torch.Generator,
    num_ops: int = 2,
    magnitude: float | None = None,
    ops: Sequence[str] | None = None,
) -> Tensor:
    """RandAugment-style strong view, our torch version of the release's imgaug "default" (see the module docstring).

    Per clip: ``num_ops`` distinct ops drawn uniformly from ``ops`` and applied in list order, each with the same
    parameters on every frame (temporal consistency). Draws: one ``torch.rand(N, 2 * len(ops) + 2)`` per call
    (op-selection keys, one sign per op, a cutout centre), so the draw count is fixed. Apply it to RGB and TG with
    independent draws, as the release does (:func:`strong_augment_pair`).

    Args:
        x: (N, C, T, H, W) float in [0, 1] (RGB, or TG before normalisation).
        generator: CPU generator, the only source of randomness.
        num_ops: ops per clip, 0 <= num_ops <= len(ops) (release: 2).
        magnitude: level in [0, 1] scaling every op as in the release's formulas; None = the release's
            :data:`RELEASE_LEVEL` (0.9). Level 0 makes the geometric ops identities and the enhance ops (factor
            ``1.8 * level + 0.1``) strong reductions, exactly as in the release's parameterisation.
        ops: subset of :data:`STRONG_OPS` to draw from (default all 15, in the release's order).

    Returns:
        (N, C, T, H, W) in [0, 1].
    """
    _check_generator(generator)
    _check_clip(x, unit_range=True)
    names = tuple(STRONG_OPS if ops is None else ops)
    unknown = [op for op in names if op not in STRONG_OPS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"ops must be distinct names from {', '.join(STRONG_OPS)}; got {list(names)}")
    _check_int(num_ops, "num_ops", lo=0)
    if num_ops > len(names):
        raise ValueError(f"num_ops={num_ops} exceeds the {len(names)} available ops")
    level = RELEASE_LEVEL if magnitude is None else float(magnitude)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"magnitude must be in [0, 1] or None, got {magnitude}")

    k = len(names)
    u = torch.rand((x.shape[0], 2 * k + 2), generator=generator, dtype=torch.float64)
    chosen = torch.argsort(u[:, :k], dim=1)[:, :num_ops].sort(dim=1).values.tolist()
    signs = torch.where(u[:, k : 2 * k] < 0.5, -1.0, 1.0).tolist()
    positions = u[:, 2 * k :].tolist()
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        clip = x[i]
        for j in chosen[i]:
            clip = _apply_op(names[j], clip, level, signs[i][j], (positions[i][0], positions[i][1]))
        out[i] = clip
    return out


def strong_augment_pair(
    rgb: Tensor,
    tg: Tensor,
    *,
    generator: torch.Generator,
    num_ops: int = 2,
    magnitude: float | None = None,
    ops: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Strong views of RGB and TG with independent draws (RGB first, then TG, from the same generator), as the
    release's separate ``Imgaug`` / ``Imgaug_Custom(modality='imgs_diff')`` objects do.

    Args:
        rgb: (N, C, T, H, W) in [0, 1].
        tg: (N, C', T', H, W) in [0, 1] (unnormalised TG).
        generator, num_ops, magnitude, ops: as in :func:`strong_augment`.

    Returns:
        (strong RGB, strong TG), shapes as the inputs.
    """
    kwargs = {"generator": generator, "num_ops": num_ops, "magnitude": magnitude, "ops": ops}
    return strong_augment(rgb, **kwargs), strong_augment(tg, **kwargs)
