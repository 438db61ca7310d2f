"""The sanity control and trivial baseline of the temporal-gradient recipe: a single-frame classifier.

Xiao et al., *Learning from Temporal Gradient for Semi-supervised Action Recognition* (CVPR 2022, arXiv
2111.13241). The card's miniature puts the class only in the motion, so a classifier that sees one frame must sit
near chance (10% for ten classes). We give it every training label (not only the labelled subset), the strongest
form of the control: if it still cannot beat chance, no appearance cue leaks the class.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class FrameNet(nn.Module):
    """A small 2D CNN: three conv-BN-ReLU blocks with stride 2, global average pool, linear.

    Input (N, 3, H, W) floats; output (N, num_classes) logits.
    """

    def __init__(self, *, num_classes: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def frames_of(videos: np.ndarray, frame_index: np.ndarray) -> torch.Tensor:
    """One frame per video: ``videos`` uint8 (N, T, H, W, 3), ``frame_index`` (N,) -> float (N, 3, H, W) in [0, 1]."""
    picked = videos[np.arange(len(videos)), frame_index]
    return torch.from_numpy(np.ascontiguousarray(picked)).permute(0, 3, 1, 2).float() / 255.0


def train_frame_classifier(
    videos: np.ndarray, labels: np.ndarray, *, num_classes: int, steps: int, seed: int, batch_size: int = 64
) -> FrameNet:
    """Train :class:`FrameNet` on random single frames of ``videos`` (N, T, H, W, 3) uint8 with ``labels`` (N,)."""
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = FrameNet(num_classes=num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model.train()
    for _ in range(steps):
        idx = gen.integers(len(videos), size=min(batch_size, len(videos)))
        t = gen.integers(videos.shape[1], size=len(idx))
        x = frames_of(videos[idx], t)
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.inference_mode()
def frame_accuracy(
    model: FrameNet, videos: np.ndarray, labels: np.ndarray, *, frame: int | None = None, batch_size: int = 256
) -> float:
    """Top-1 accuracy (%) of ``model`` on one frame of each video (``frame``; default the middle one)."""
    t = videos.shape[1] // 2 if frame is None else frame
    preds = []
    for i in range(0, len(videos), batch_size):
        chunk = videos[i : i + batch_size]
        preds.append(model(frames_of(chunk, np.full(len(chunk), t))).argmax(1))
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    return 100.0 * float(np.mean(pred == np.asarray(labels))) if len(pred) else float("nan")


def worst_frame_accuracy(model: FrameNet, videos: np.ndarray, labels: np.ndarray) -> float:
    """The highest single-frame top-1 (%) over every frame position: a cue at the first or last frame (where a
    class's motion has carried the object furthest) would show here even if the middle frame hides it."""
    return max(frame_accuracy(model, videos, labels, frame=t) for t in range(videos.shape[1]))
