"""Inference of an MT-TransUNet model (arXiv 2112.01767), with the release's optional test-time augmentation.

The release's test (``utils/validate.py``, ``val_mode_seg_multi_scale``) feeds each image at several sides (224, 256
and 288, bicubic) and in six views (identity, three 90° rotations, a horizontal and a vertical flip). Segmentation:
every view's logits are mapped back to the original orientation and side (bicubic) and summed; the arg-max of the
sum is the mask. Classification: the logits are averaged over the views of a scale and summed over the scales
before the softmax. :func:`infer` merges the same way when ``sizes`` / ``views`` are given — it returns
softmax(mean segmentation logits), whose 0.5 threshold is the release's arg-max, and softmax(Σ_scales mean_views
class logits) — and is a plain forward pass otherwise. One difference: the larger scales are re-sampled from the
input (already at the network's side), where the release re-samples the original image. Training and
:mod:`~thrifty.methods.mt_transunet.score` both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

#: (forward, inverse) maps on (B, C, H, W): identity, rotations by 90°, 180°, 270°, horizontal and vertical flips
VIEWS: tuple[View, ...] = (
    (lambda x: x, lambda x: x),
    (lambda x: torch.rot90(x, 1, (2, 3)), lambda x: torch.rot90(x, -1, (2, 3))),
    (lambda x: torch.rot90(x, 2, (2, 3)), lambda x: torch.rot90(x, -2, (2, 3))),
    (lambda x: torch.rot90(x, 3, (2, 3)), lambda x: torch.rot90(x, -3, (2, 3))),
    (lambda x: x.flip(3), lambda x: x.flip(3)),
    (lambda x: x.flip(2), lambda x: x.flip(2)),
)


@torch.inference_mode()
def infer(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    sizes: Sequence[int] = (),
    views: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``model`` in eval mode on ``images`` (N, 3, S, S) in [0, 1]: lesion probabilities (N, S, S) and class
    probabilities (N, C).

    ``sizes``: input sides for multi-scale testing (bicubic resize; empty = S only); ``views``: also the five
    rotated/flipped views. Every prediction is mapped back to S (bilinear) before averaging."""
    was = model.training
    model.eval()
    side = images.shape[-1]
    scales = list(sizes) or [side]
    chosen = VIEWS if views else VIEWS[:1]
    segs, clss = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float()
        seg_sum = torch.zeros(len(x), 2, images.shape[-2], side, device=x.device)
        logit_sum = torch.zeros((), device=x.device)
        for s in scales:
            xs = x if s == side else F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1)
            scale_logits = torch.zeros((), device=x.device)
            for fwd, inv in chosen:
                out = model(fwd(xs))
                seg = inv(out.seg_logits.float())
                if seg.shape[-1] != side:
                    seg = F.interpolate(seg, size=seg_sum.shape[-2:], mode="bicubic", align_corners=False)
                seg_sum = seg_sum + seg
                scale_logits = scale_logits + out.cls_logits.float()
            logit_sum = logit_sum + scale_logits / len(chosen)
        segs.append((seg_sum / (len(scales) * len(chosen))).softmax(1)[:, 1].cpu())
        clss.append(logit_sum.softmax(1).cpu())
    model.train(was)
    if not segs:
        return np.zeros((0, *images.shape[-2:]), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(segs).numpy(), torch.cat(clss).numpy()
