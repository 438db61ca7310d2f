"""Weak and strong views for Label-Assemble, written in plain torch (no torchvision).

Paper: Kang, Lu, Yuille and Zhou, *Label-Assemble: Leveraging Multiple Datasets with Partial Labels*
(arXiv 2109.12265; first titled "Data, Assemble"). Matched release: ``MrGiovanni/LabelAssemble`` at
commit 13d2549, ``train.py`` lines 29-51 (the two ``Compose`` pipelines) and ``noise.py`` lines 4-47
(``AddPepperNoise``, ``AddGaussianNoise``). ``datasets.py`` lines 134-150 (``Assemble.__getitem__``) draws
the weak and the strong view *independently* from the same raw image: the strong view is not the weak
view augmented further, and :func:`weak_view` / :func:`strong_view` are meant to be called that way.

Release pipelines (PIL images, grayscale X-rays converted to RGB, uint8)::

    weak:   RandomHorizontalFlip()            -> RandomRotation(10)  -> Resize(256)
            -> AddPepperNoise(snr=0.9, p=0.1) -> AddGaussianNoise(p=0.3) -> CenterCrop(256)
            -> ToTensor -> Normalize(ImageNet)
    strong: RandomHorizontalFlip()            -> RandomRotation(15)  -> Resize(256) -> CenterCrop(256)
            -> AddPepperNoise(snr=0.7, p=0.5) -> AddGaussianNoise(p=0.5)
            -> ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5)
            -> ToTensor -> Normalize(ImageNet) -> RandomErasing()

:func:`augment` applies, in this order: flip, rotation, pepper noise, Gaussian noise, colour jitter, erasing.
Resize / centre-crop are left to the data pipeline (they are geometry, not augmentation), and so is
intensity normalisation: inputs and outputs here are single-channel (any ``C`` works) floats in ``[0, 1]``.
How each release op maps onto ours:

* ``RandomHorizontalFlip()``: p = 0.5 in *both* views (the method card omits it for the strong view; the
  release has it). Exact flip of the last axis.
* ``RandomRotation(d)``: angle ~ U(-d, d) degrees per sample, counter-clockwise for positive angles, about
  the image centre, same output size (``expand=False``), nearest-neighbour interpolation (torchvision's
  default) and **fill 0** outside the rotated image (torchvision's default fill). Implemented with one
  ``affine_grid`` / ``grid_sample(align_corners=False, padding_mode="zeros")`` for the whole batch;
  ``rotate_mode="bilinear"`` is available but not the release's choice.
* ``AddPepperNoise(snr, p)``: despite the name it is *salt-and-pepper* noise. With probability ``p`` per
  image, each pixel (one draw shared by all channels) keeps its value with probability ``snr``, becomes
  white (255 -> 1.0) with probability ``(1 - snr) / 2`` and black (0) with probability ``(1 - snr) / 2``.
  So "SNR 0.9 with p 0.1" means: 10 % of images get 10 % of their pixels replaced, half white, half black.
* ``AddGaussianNoise(p)``: defaults ``mean=0.0, variance=1.0, amplitude=1.0``; the code passes
  ``variance`` as numpy's ``scale``, so the noise is N(0, 1) **in uint8 units**, i.e. standard deviation
  1/255 on our [0, 1] scale (:data:`RELEASE_GAUSS_STD`); one draw per pixel shared by all channels. The
  release clips only at 255 and then casts with ``astype('uint8')``, which truncates and wraps values
  below 0 to ~255 (a dark pixel can turn white); we do not copy that: the result is clamped to [0, 1] and
  not quantised.
* ``ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5)`` (hue 0): per image, factors
  ~ U(0.5, 1.5), applied in a random order as torchvision does (we draw brightness-first vs
  contrast-first with probability 1/2 each; torchvision permutes four ops, of which only these two act
  here). Brightness: ``clamp(f * x, 0, 1)``. Contrast: ``clamp(f * x + (1 - f) * mean, 0, 1)``, the mean
  taken over the whole image (its ITU-R 601 luma when ``C == 3``), as torchvision's tensor path does; PIL
  rounds that mean to an integer grey level, we keep it exact. Saturation (and hue) are **no-ops** on a
  grayscale image: the release's RGB input is grey replicated to three channels, and blending it with its
  own grayscale leaves it unchanged, so we drop them.
* ``RandomErasing()``: torchvision defaults p = 0.5, scale (0.02, 0.33), ratio (0.3, 3.3), value 0. Up to
  10 tries per image: area fraction ~ U(scale), log aspect ~ U(log ratio), ``h = round(sqrt(A * r))``,
  ``w = round(sqrt(A / r))``, accepted if ``h < H`` and ``w < W``, then a uniformly placed rectangle;
  if no try fits, the image is left untouched. Note that the release erases *after* ``Normalize``, so its
  erased value 0 is the ImageNet channel mean in pixel space (about 0.45 for grey), not black. Our
  default ``erase_value`` is 0.0 (black, in [0, 1] space); set it to the mean your pipeline normalises
  with to reproduce the release exactly.

Every random parameter (including per-pixel noise) is drawn from the caller's CPU ``torch.Generator``
in a fixed order and then moved to ``x.device``, so the same seed gives the same output on every device
(up to floating-point rounding in ``grid_sample``). Out-of-range or non-4-D input raises ``ValueError``
rather than being clamped silently: values outside [0, 1] usually mean the batch was already normalised,
and these ops (white salt = 1.0, fill 0, clamping) assume raw intensities.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "RELEASE_GAUSS_STD",
    "STRONG",
    "WEAK",
    "ViewConfig",
    "augment",
    "strong_view",
    "weak_view",
]

#: ``AddGaussianNoise``'s default N(0, 1) on uint8 intensities, expressed on the [0, 1] scale.
RELEASE_GAUSS_STD: float = 1.0 / 255.0

#: torchvision's ``RandomErasing`` tries this many rectangles before giving up.
_ERASE_TRIES = 10
_LUMA = (0.2989, 0.587, 0.114)


def _check_prob(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"ViewConfig.{name} must be a probability in [0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewConfig:
    """One augmentation view. Defaults reproduce the release's weak view (see the module docstring)."""

    hflip: float = 0.5
    """Probability of a horizontal flip."""
    rotate_deg: float = 10.0
    """Rotation angle ~ U(-rotate_deg, rotate_deg) degrees; 0 disables rotation."""
    rotate_mode: Literal["nearest", "bilinear"] = "nearest"
    """Interpolation for the rotation (the release: nearest)."""
    pepper_snr: float = 0.9
    """Fraction of pixels kept by salt-and-pepper noise; the rest split evenly between 1.0 and 0.0."""
    pepper_p: float = 0.1
    """Probability that an image receives salt-and-pepper noise."""
    gauss_p: float = 0.3
    """Probability that an image receives additive Gaussian noise."""
    gauss_mean: float = 0.0
    """Mean of the additive Gaussian noise ([0, 1] scale)."""
    gauss_std: float = RELEASE_GAUSS_STD
    """Standard deviation of the additive Gaussian noise ([0, 1] scale)."""
    brightness: float = 0.0
    """ColorJitter brightness: factor ~ U(max(0, 1 - b), 1 + b); 0 disables."""
    contrast: float = 0.0
    """ColorJitter contrast: factor ~ U(max(0, 1 - c), 1 + c); 0 disables."""
    erase_p: float = 0.0
    """Probability of RandomErasing."""
    erase_scale: tuple[float, float] = (0.02, 0.33)
    """Range of the erased area as a fraction of the image."""
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    """Range of the erased rectangle's aspect ratio (height / width), sampled log-uniformly."""
    erase_value: float = 0.0
    """Value written into the erased rectangle (the release effectively uses the normalisation mean)."""

    def __post_init__(self) -> None:
        for name in ("hflip", "pepper_snr", "pepper_p", "gauss_p", "erase_p"):
            _check_prob(name, float(getattr(self, name)))
        for name in ("rotate_deg", "gauss_std", "brightness", "contrast"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"ViewConfig.{name} must be finite and >= 0, got {value!r}")
        if not math.isfinite(float(self.gauss_mean)):
            raise ValueError(f"ViewConfig.gauss_mean must be finite, got {self.gauss_mean!r}")
        if self.rotate_mode not in ("nearest", "bilinear"):
            raise ValueError(f"ViewConfig.rotate_mode must be 'nearest' or 'bilinear', got {self.rotate_mode!r}")
        if not (0.0 <= float(self.erase_value) <= 1.0):
            raise ValueError(f"ViewConfig.erase_value must lie in [0, 1], got {self.erase_value!r}")
        scale = tuple(float(v) for v in self.erase_scale)
        ratio = tuple(float(v) for v in self.erase_ratio)
        if len(scale) != 2 or not (0.0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(
                f"ViewConfig.erase_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.erase_scale!r}"
            )
        if len(ratio) != 2 or not (0.0 < ratio[0] <= ratio[1] < math.inf):
            raise ValueError(f"ViewConfig.erase_ratio must be (lo, hi) with 0 < lo <= hi, got {self.erase_ratio!r}")
        object.__setattr__(self, "erase_scale", scale)
        object.__setattr__(self, "erase_ratio", ratio)


#: ``train.py`` ``weak_aug``: flip 0.5, rotation 10°, salt-and-pepper SNR 0.9 with p 0.1, Gaussian p 0.3.
WEAK = ViewConfig()

#: ``train.py`` ``strong_aug``: flip 0.5, rotation 15°, salt-and-pepper SNR 0.7 with p 0.5, Gaussian p 0.5,
#: ColorJitter(0.5, 0.5, 0.5) (saturation a no-op on grey), RandomErasing() with torchvision's defaults.
STRONG = ViewConfig(
    hflip=0.5,
    rotate_deg=15.0,
    pepper_snr=0.7,
    pepper_p=0.5,
    gauss_p=0.5,
    brightness=0.5,
    contrast=0.5,
    erase_p=0.5,
)


def _check_inputs(x: torch.Tensor, generator: torch.Generator) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"augment expects a torch.Tensor, got {type(x).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must live on the CPU (parameters are drawn there and moved to x.device), "
            f"got a generator on {generator.device}"
        )
    if x.ndim != 4:
        raise ValueError(
            f"augment expects a (B, C, H, W) batch, got a {x.ndim}-D tensor of shape {tuple(x.shape)}; "
            "use x.unsqueeze(0) for a single image"
        )
    if not x.is_floating_point():
        raise ValueError(f"augment expects a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"augment expects non-empty channel and spatial dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(
            f"augment expects values in [0, 1] (raw intensities, before normalisation); got min {lo:.4g}, max {hi:.4g}"
        )


def _uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """U[0, 1) in float64 on the CPU (device-independent stream)."""
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def _rotate(x: torch.Tensor, angles_deg: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Rotate each image of ``x`` counter-clockwise by ``angles_deg[b]`` about its centre, filling with 0."""
    _, _, h, w = x.shape
    rad = angles_deg.to(torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(rad)
    # Output pixel (x', y') (y down, normalised coordinates) samples the input at R(-a) (x', y'); the
    # off-diagonal terms carry the aspect ratio because normalised units differ along H and W.
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), zero], dim=-1),
            torch.stack([sin * (w / h), cos, zero], dim=-1),
        ],
        dim=1,
    ).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _image_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean grey level, shape (B, 1, 1, 1): luma for 3 channels, plain mean otherwise."""
    if x.shape[1] == 3:
        weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    return x.mean(dim=(1, 2, 3), keepdim=True)


def _factor(generator: torch.Generator, b: int, strength: float) -> torch.Tensor:
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return lo + (hi - lo) * _uniform(generator, b)


def _erase_mask(generator: torch.Generator, shape: torch.Size, cfg: ViewConfig, device: torch.device) -> torch.Tensor:
    """Boolean (B, 1, H, W) mask of the rectangles RandomErasing would erase (all-False rows are skipped)."""
    b, _, h, w = shape
    apply = _uniform(generator, b) < cfg.erase_p
    area = float(h * w)
    s_lo, s_hi = cfg.erase_scale
    lr_lo, lr_hi = math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])
    erase_area = area * (s_lo + (s_hi - s_lo) * _uniform(generator, b, _ERASE_TRIES))
    aspect = torch.exp(lr_lo + (lr_hi - lr_lo) * _uniform(generator, b, _ERASE_TRIES))
    hs = torch.round(torch.sqrt(erase_area * aspect)).long()  # round-half-even, like Python's round()
    ws = torch.round(torch.sqrt(erase_area / aspect)).long()
    ok = (hs < h) & (ws < w)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # first accepted try (0 if none; masked below)
    eh, ew = hs.gather(1, first).squeeze(1), ws.gather(1, first).squeeze(1)
    apply &= ok.any(dim=1)
    top = torch.floor(_uniform(generator, b) * (h - eh + 1).to(torch.float64)).long().clamp(max=h - eh)
    left = torch.floor(_uniform(generator, b) * (w - ew + 1).to(torch.float64)).long().clamp(max=w - ew)
    top, left, eh, ew, apply = (t.to(device) for t in (top, left, eh, ew, apply))
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]).unsqueeze(1)


def augment(x: torch.Tensor, cfg: ViewConfig, *, generator: torch.Generator) -> torch.Tensor:
    """Apply one random view to a batch.

    Args:
        x: (B, C, H, W) floating-point batch with values in [0, 1], on any device.
        cfg: the view (:data:`WEAK`, :data:`STRONG` or a custom :class:`ViewConfig`).
        generator: CPU generator; every sample draws its own parameters from it, in a fixed order.

    Returns:
        A new tensor of the same shape, dtype and device, with values in [0, 1]; ``x`` is not modified.

    Raises:
        ValueError: ``x`` is not 4-D, not floating point, has empty C/H/W, or has values outside [0, 1]
            (including NaN); or ``generator`` is not on the CPU.
    """
    _check_inputs(x, generator)
    in_dtype = x.dtype
    out = x.to(torch.float32) if in_dtype in (torch.float16, torch.bfloat16) else x.clone()
    b, _, h, w = out.shape
    if b == 0:
        return out.to(in_dtype)
    device, dtype = out.device, out.dtype

    def on_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    if cfg.hflip > 0.0:
        flip = (_uniform(generator, b) < cfg.hflip).to(device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)

    if cfg.rotate_deg > 0.0:
        angles = (2.0 * _uniform(generator, b) - 1.0) * cfg.rotate_deg
        out = _rotate(out, angles, cfg.rotate_mode)

    if cfg.pepper_p > 0.0 and cfg.pepper_snr < 1.0:
        chosen = torch.nonzero(_uniform(generator, b) < cfg.pepper_p).flatten()
        if chosen.numel() > 0:
            u = _uniform(generator, chosen.numel(), 1, h, w)
            noise = 1.0 - cfg.pepper_snr
            salt = (u < noise / 2.0).to(device)
            pepper = ((u >= noise / 2.0) & (u < noise)).to(device)
            idx = chosen.to(device)
            sub = out.index_select(0, idx)
            sub = torch.where(salt, torch.ones_like(sub), torch.where(pepper, torch.zeros_like(sub), sub))
            out = out.index_copy(0, idx, sub)

    if cfg.gauss_p > 0.0 and (cfg.gauss_std > 0.0 or cfg.gauss_mean != 0.0):
        chosen = torch.nonzero(_uniform(generator, b) < cfg.gauss_p).flatten()
        if chosen.numel() > 0:
            shape = (chosen.numel(), 1, h, w)
            n = torch.randn(shape, generator=generator, dtype=torch.float64) * cfg.gauss_std + cfg.gauss_mean
            idx = chosen.to(device)
            sub = (out.index_select(0, idx) + on_device(n)).clamp_(0.0, 1.0)
            out = out.index_copy(0, idx, sub)

    if cfg.brightness > 0.0 or cfg.contrast > 0.0:
        both = cfg.brightness > 0.0 and cfg.contrast > 0.0
        bright_first = (_uniform(generator, b) < 0.5).to(device) if both else None
        fb = on_device(_factor(generator, b, cfg.brightness)).view(b, 1, 1, 1) if cfg.brightness > 0.0 else None
        fc = on_device(_factor(generator, b, cfg.contrast)).view(b, 1, 1, 1) if cfg.contrast > 0.0 else None

        def bright(t: torch.Tensor) -> torch.Tensor:
            return t if fb is None else (t * fb).clamp(0.0, 1.0)

        def contrast(t: torch.Tensor) -> torch.Tensor:
            return t if fc is None else (fc * t + (1.0 - fc) * _image_mean(t)).clamp(0.0, 1.0)

        if bright_first is None:
            out = contrast(bright(out))
        else:
            out = torch.where(bright_first[:, None, None, None], contrast(bright(out)), bright(contrast(out)))

    if cfg.erase_p > 0.0:
        mask = _erase_mask(generator, out.shape, cfg, device)
        out = out.masked_fill(mask, cfg.erase_value)

    return out.to(in_dtype)


def weak_view(x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """The release's weak view (:data:`WEAK`)."""
    return augment(x, WEAK, generator=generator)


def strong_view(x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """The release's strong view (:data:`STRONG`)."""
    return augment(x, STRONG, generator=generator)
