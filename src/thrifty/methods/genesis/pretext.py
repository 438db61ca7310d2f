"""Pretext tasks of the Genesis family: one pipeline with two switches (``pretext`` × ``visual_words``).

* ``genesis``: restore the original cube. With visual words off this is Models Genesis (Zhou et al., MedIA 2021,
  arXiv 2004.07882: flip → local shuffle → Bézier intensity → in/out-painting, :func:`models_genesis`); with
  visual words on it is Semantic Genesis (Haghighi et al., MICCAI 2020, arXiv 2007.06959: elastic deformation then
  exactly one perturbation, the undeformed cube as target, :func:`semantic_genesis`; TransVW, IEEE TMI 2021,
  arXiv 2102.10680, is the same pipeline under another name).
* ``inpaint``: restore the cube after in-painting (1–5 noise boxes, always applied).
* ``shuffle``: restore the cube after local pixel shuffling (always applied).
* ``rotation``: predict which of the four in-plane 90° rotations was applied (cross-entropy, weight
  ``rotation_weight``; the TMI paper's exact rotation pretext is unverified, this is ours).

With visual words on, the cubes are visual-word instances and the network also classifies them by word id: the
loss is ``lambda_rec · pretext + lambda_cls · CE(word logits, word id)`` (1 and 0.01 in the releases); with
visual words off the cubes are random lung cubes and there is no word head.

Shapes: cubes (B, 1, d, h, w) in [0, 1] with h = w (rotations are in the h-w plane).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.methods.genesis.model import YNet3D, class_head
from thrifty.methods.genesis.transforms import inpaint, local_shuffle, models_genesis, semantic_genesis

NUM_ROTATIONS = 4


def restores(pretext: str) -> bool:
    """Whether the pretext trains the decoder (a restoration target) rather than a classification head only."""
    return pretext != "rotation"


def make_batch(
    pretext: str,
    cubes: torch.Tensor,
    *,
    visual_words: bool,
    generator: torch.Generator,
    elastic: tuple[float, float] = (991.0, 8.0),
) -> dict[str, torch.Tensor]:
    """Input/target of one pretext batch, every random draw from ``generator``. ``elastic`` = (α, σ) of Semantic
    Genesis's elastic deformation, in voxels (the release's (991, 8) for 64×64×32 cubes).

    cubes: (B, 1, d, h, w) → ``{"input": (B, 1, d, h, w)}`` plus ``"target"`` (B, 1, d, h, w) for restoration
    pretexts or ``"rotation"`` (B,) int64 in 0..3 for ``rotation``.
    """
    if pretext == "genesis":
        if visual_words:
            pair = semantic_genesis(cubes, generator=generator, alpha=elastic[0], sigma=elastic[1])
        else:
            pair = models_genesis(cubes, generator=generator)
        return {"input": pair["input"], "target": pair["target"]}
    if pretext == "inpaint":
        return {"input": inpaint(cubes, min_boxes=1, generator=generator)[0], "target": cubes}
    if pretext == "shuffle":
        return {"input": local_shuffle(cubes, prob=1.0, generator=generator)[0], "target": cubes}
    if pretext == "rotation":
        if cubes.shape[-1] != cubes.shape[-2]:
            raise ValueError(f"rotation needs square h × w cubes, got {tuple(cubes.shape[-3:])}")
        k = torch.randint(0, NUM_ROTATIONS, (cubes.shape[0],), generator=generator).to(cubes.device)
        out = cubes.clone()
        for r in range(1, NUM_ROTATIONS):
            sel = k == r
            if sel.any():
                out[sel] = torch.rot90(cubes[sel], r, dims=(3, 4))
        return {"input": out, "rotation": k}
    raise ValueError(f"unknown pretext {pretext!r}")


class PretextNet(nn.Module):
    """The Y-shaped pre-training network: a :class:`~thrifty.methods.genesis.model.YNet3D` (U-Net plus the
    visual-word head when ``num_words > 0``) and, for the ``rotation`` pretext, a rotation head of the same form on
    the bottleneck. Only the branches the pretext trains are run, so every parameter gets a gradient (DDP needs no
    ``find_unused_parameters``); ``rotation`` runs no decoder.

    Forward: (B, 1, d, h, w) → ``{"restoration": (B, 1, d, h, w)?, "words": (B, num_words)?, "rotation": (B, 4)?}``.
    """

    def __init__(self, *, pretext: str, num_words: int = 0, width: float = 0.125) -> None:
        super().__init__()
        self.pretext = pretext
        self.net = YNet3D(width=width, num_classes=num_words)
        self.rotation_head = (
            class_head(self.net.widths[-1], self.net.head_channels, NUM_ROTATIONS) if pretext == "rotation" else None
        )
        if not restores(pretext):  # the decoder is never trained; drop it rather than export random weights
            self.net.decoder = nn.ModuleList()
            self.net.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bottleneck, skips = self.net.encoder(x)
        out: dict[str, torch.Tensor] = {}
        if restores(self.pretext):
            out["restoration"] = self.net.decode(bottleneck, skips)
        if self.net.word_head is not None:
            out["words"] = self.net.word_head(bottleneck)
        if self.rotation_head is not None:
            out["rotation"] = self.rotation_head(bottleneck)
        return out


def pretext_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    *,
    words: torch.Tensor | None = None,
    lambda_rec: float = 1.0,
    lambda_cls: float = 0.01,
    rotation_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Pre-training loss terms and their weighted sum ``loss``.

    ``rec`` = MSE(restoration, target) (restoration pretexts), ``rot`` = CE(rotation logits, rotation) (rotation),
    ``cls`` = CE(word logits, ``words``) (visual words on). loss = lambda_rec · (rec or rotation_weight · rot)
    + lambda_cls · cls.
    """
    terms: dict[str, torch.Tensor] = {}
    if "restoration" in outputs:
        terms["rec"] = F.mse_loss(outputs["restoration"], batch["target"])
        main = terms["rec"]
    elif "rotation" in outputs:
        terms["rot"] = F.cross_entropy(outputs["rotation"], batch["rotation"])
        main = rotation_weight * terms["rot"]
    else:
        raise ValueError("outputs hold neither a restoration nor rotation logits")
    loss = lambda_rec * main
    if "words" in outputs:
        if words is None:
            raise ValueError("the network has a word head but the batch carries no word labels")
        terms["cls"] = F.cross_entropy(outputs["words"], words)
        loss = loss + lambda_cls * terms["cls"]
    terms["loss"] = loss
    return terms
