"""Training augmentation of the MT-TransUNet recipe (arXiv 2112.01767), after the release's ``dataset.py``.

The release, per training image: with probability 0.5 a border crop (the same number of pixels off every side,
drawn from ``range(30, (W + H) / 8, 30)`` of the original image) before resizing to the network's input, then a
vertical and a horizontal flip with probability 0.5 each, image and mask alike. Here the images are already at the
input size, so the crop removes a fraction of the side (``crop_fraction``, the release's range expressed as a
share of a ~1000-pixel ISIC image) and resizes back (bilinear for the image, nearest for the mask). The
ground-truth SDF is computed after augmentation from the augmented mask (as DTC computes it per batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    generator: torch.Generator,
    crop_prob: float = 0.5,
    crop_fraction: tuple[float, float] = (0.03, 0.2),
    flip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly border-crop-and-resize, then flip, ``images`` (B, 3, S, S) and ``masks`` (B, S, S) alike.

    Returns new tensors of the same shapes; ``masks`` stay binary (nearest-neighbour resize)."""
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"expected images (B, 3, H, W) and masks (B, H, W), got {tuple(images.shape)} and "
                         f"{tuple(masks.shape)}")  # fmt: skip
    b, _, h, w = images.shape
    lo, hi = crop_fraction
    do_crop = (torch.rand(b, generator=generator) < crop_prob).tolist()
    frac = (lo + (hi - lo) * torch.rand(b, generator=generator)).tolist()
    vflip = (torch.rand(b, generator=generator) < 0.5).tolist()
    hflip = (torch.rand(b, generator=generator) < 0.5).tolist()
    out_i, out_m = [], []
    for i in range(b):
        img, m = images[i : i + 1], masks[i : i + 1, None].float()
        c = round(frac[i] * min(h, w))
        if do_crop[i] and c > 0 and 2 * c < min(h, w):
            img = F.interpolate(img[..., c : h - c, c : w - c], size=(h, w), mode="bilinear", align_corners=False)
            m = F.interpolate(m[..., c : h - c, c : w - c], size=(h, w), mode="nearest")
        if flip and vflip[i]:
            img, m = img.flip(-2), m.flip(-2)
        if flip and hflip[i]:
            img, m = img.flip(-1), m.flip(-1)
        out_i.append(img)
        out_m.append(m)
    return torch.cat(out_i), torch.cat(out_m)[:, 0].to(masks.dtype)


def random_resize(
    images: torch.Tensor, masks: torch.Tensor, *, sizes: list[int] | tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's ``--random_resize`` (``utils/runtime.py``): the whole batch resized to one side drawn from
    ``sizes``, the images bilinear and the masks bilinear then thresholded at 0.5. ``images`` (B, 3, S, S),
    ``masks`` (B, S, S) -> (B, 3, s, s), (B, s, s). Empty ``sizes`` returns the inputs."""
    if not sizes:
        return images, masks
    s = int(sizes[int(torch.randint(0, len(sizes), (1,), generator=generator))])
    if s == images.shape[-1]:
        return images, masks
    out_i = F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False)
    m = F.interpolate(masks[:, None].float(), size=(s, s), mode="bilinear", align_corners=False)[:, 0]
    return out_i, (m >= 0.5).to(masks.dtype)
