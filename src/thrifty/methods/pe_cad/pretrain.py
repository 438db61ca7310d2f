"""Initialisations of the PE CAD stage-1 backbones without ImageNet: ``random | supervised | ssl:simclr |
ssl:genesis``.

The paper (Islam et al., arXiv 2109.07029; ``Nahid1992/CAD_PE`` ``first_stage/train1.py``
``transferLearningModels`` / ``Classifier_model``) initialises its backbones from ImageNet-supervised weights or
from published ImageNet SSL checkpoints (SeLa-v2, DeepCluster-v2, Barlow Twins, SimCLR-v1, PIRL, MoCo-v2, loaded
from ``pretrain_model_weights/<name>.pth.tar``) and then fine-tunes them on PE. The miniature has no ImageNet,
so (a documented deviation, per the method card's "Pretraining without ImageNet") the weights come from
pretraining on synthetic CTPA slices:

* :func:`pretrain_supervised` — supervised on a *source task that is not PE*: cross-entropy on caller-given
  integer labels with a fresh Linear head on the backbone's penultimate features. The default source task is
  :func:`slice_level_labels`: the cranio-caudal level of the slice within its exam (``num_bins`` equal bins of the
  exam's length). The generator provides it for every slice (the synthetic anatomy — arterial trunk and its
  branching, heart — changes along the exam), and it is independent of the PE labels. Any other labelled task the
  data offers can be passed instead.
* :func:`pretrain_simclr` — SimCLR (Chen et al., ICML 2020, arXiv 2002.05709): two views of every slice from the
  stage-1 augmentation (:func:`thrifty.methods.pe_cad.stage1.augment`: contrast, shift-scale-rotate, cutout;
  independent draws), a 2-layer MLP projection head on the penultimate features and the NT-Xent loss
  (:func:`nt_xent`; temperature 0.5) over the 2N views, whose positives are the pairs (k, k + N).
* :func:`pretrain_restoration` — Models-Genesis-style restoration (Zhou et al., MedIA 2021, arXiv 2004.07882):
  the perturbations are *reused* from :mod:`thrifty.methods.genesis.transforms` (flip → local pixel shuffling →
  Bézier intensity → in/out-painting, :func:`genesis_pair_2d`), applied to the 3-slice stacks viewed as cubes of
  depth 1 with the 3 slices as channels (every perturbation then acts in-plane on all three channels alike);
  a light decoder (:class:`RestorationDecoder`: bilinear ×2 upsampling + conv-BN-ReLU per octave, a 1x1 conv and a
  sigmoid) on the backbone's ``feature_map`` restores the unperturbed (flipped) stack; loss MSE as Models
  Genesis. The local-shuffle window count is scaled from the release's 10,000 windows per 64×64×32 cube to the
  slice's area (:data:`SHUFFLE_WINDOWS_PER_PIXEL`: 312 windows on a 64² slice).

Each function trains the backbone in place, with Adam, batches drawn as epochs of random permutations and every
random draw from ``seed`` (the slices: a tensor, or an array-like gathering each batch on indexing,
:class:`LazyImages`), and returns a :class:`PretrainResult` ``(state_dict, losses)``: a detached copy of the
backbone's state dict (pretext heads excluded) and the loss of every step. Caching by a digest of the settings is
the recipe's job. :func:`initialise` dispatches on the init name.

**DDP** (``rank`` / ``world_size``, under ``torchrun`` with a process group): ``batch_size`` is the effective
(global) batch; rank r takes its rows of every global batch (:class:`~.stage1.ShardedBatchSampler`, the same
global batches as one process), the augmentation draws of the whole batch are made on every rank and each applies
its rows' (the Genesis perturbations are drawn for the whole batch, as one process draws them), the losses are
weighted so that the gradient averaged over ranks (:func:`thrifty.core.distributed.average_gradients`, backbone and
pretext head) is one process's gradient on the global batch, and SimCLR's projections are gathered from every rank
with their gradients (:func:`~.stage1.gather_shards`), so its negatives are the whole global batch. The learning
rate is the configured one for any W. Every rank returns the same weights (BatchNorm running statistics, computed
per rank, are averaged over ranks at the end); BatchNorm's batch statistics are per rank, so a CNN under DDP
differs from one process by that alone. The losses returned are the global batch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thrifty.core import distributed
from thrifty.core.nn import nt_xent as shared_nt_xent
from thrifty.methods.genesis.transforms import flip, local_shuffle, nonlinear, painting
from thrifty.methods.pe_cad.stage1 import AugmentConfig, ShardedBatchSampler, augment, gather_shards

__all__ = [
    "INITS",
    "SHUFFLE_WINDOWS_PER_PIXEL",
    "PretrainResult",
    "ProjectionHead",
    "RestorationDecoder",
    "genesis_pair_2d",
    "initialise",
    "nt_xent",
    "pretrain_restoration",
    "pretrain_simclr",
    "pretrain_supervised",
    "simclr_targets",
    "slice_level_labels",
]

INITS = ("random", "supervised", "ssl:simclr", "ssl:genesis")
# the Models Genesis release: 10,000 shuffle windows per 64 x 64 x 32 cube
SHUFFLE_WINDOWS_PER_PIXEL = 10_000 / (64 * 64 * 32)


class PretrainResult(NamedTuple):
    """The pretrained backbone's state dict (detached copies) and the loss of every step."""

    state_dict: dict[str, Tensor]
    losses: list[float]


class LazyImages(Protocol):
    """An (N, C, H, W) array-like that gathers rows on indexing (``data.stack_view``: the 3-slice stacks of an exam
    set, in memory or read from per-exam files), so pretraining never holds every training stack at once."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, idx: Tensor) -> Tensor: ...


Images = Tensor | np.ndarray | LazyImages


def _as_images(slices: Images) -> Tensor | LazyImages:
    """A tensor or an array-like with ``shape`` and row indexing (left as it is) of shape (N, C, H, W)."""
    keep = hasattr(slices, "shape") and not isinstance(slices, np.ndarray)  # a tensor or a LazyImages
    x: Tensor | LazyImages = slices if keep else torch.as_tensor(np.asarray(slices))
    if len(x.shape) != 4:
        raise ValueError(f"expected slices of shape (N, C, H, W), got {tuple(x.shape)}")
    return x


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _seeded(seed: int, build):
    """Build a head with parameters drawn from ``seed`` without touching the global RNG's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class _Step(NamedTuple):
    """One step's batch as a loss function sees it (:func:`_train`).

    Attributes:
        batch: (m,) the global batch's indices (the same on every rank).
        rows: this rank's rows of it (all of them for one process; the first row for an empty share).
        idx: ``batch[rows]``; x: those slices (n, C, H, W) on the model's device, float32.
        whole: the global batch's slices (m, C, H, W) on the model's device, float32, when the loss asked for them
            (``_train(whole_batch=True)``) under DDP; ``x`` is then ``whole[rows]`` (each batch read once). None
            otherwise (one process: ``x`` is the whole batch).
        scale: ``n_rank · W / m`` (:meth:`~.stage1.ShardedBatchSampler.loss_scale`): a per-row mean loss times it
            averages over ranks to the global batch's mean.
        rank / world_size: the process's place.
    """

    batch: Tensor
    rows: slice
    idx: Tensor
    x: Tensor
    whole: Tensor | None
    scale: float
    rank: int
    world_size: int


def _train(
    backbone: nn.Module,
    head: nn.Module,
    images: Tensor | LazyImages,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    loss_fn,
    rank: int = 0,
    world_size: int = 1,
    whole_batch: bool = False,
) -> PretrainResult:
    """Shared loop: Adam over backbone + head, ``loss_fn(step: _Step, generator) -> loss`` per batch; under DDP
    (``world_size`` > 1, a process group up) gradients are averaged over ranks after every backward and the
    BatchNorm running statistics at the end. ``batch_size`` is the global batch (per-rank batch x ``world_size``).
    ``whole_batch``: under DDP, read every global batch (``step.whole``) and take this rank's rows from it, for a
    loss that needs the whole batch (the Genesis draws); otherwise a rank reads its rows only."""
    device = _device(backbone)
    head.to(device)
    gen = torch.Generator().manual_seed(seed)
    sampler = ShardedBatchSampler(n=images.shape[0], batch_size=batch_size, steps=steps, generator=gen, rank=rank,
                                  world_size=world_size)  # fmt: skip
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    backbone.train()
    head.train()
    losses = []
    for k in range(steps):
        batch, rows, idx = sampler.global_batch(k), sampler.draw_rows(k), sampler.batch_at(k)
        if whole_batch and world_size > 1:
            whole = images[batch].to(device, torch.float32)
            x = whole[rows]  # = images[idx]: batch_at is batch[rows]
        else:
            whole, x = None, images[idx].to(device, torch.float32)
        step = _Step(batch, rows, idx, x, whole, sampler.loss_scale(k), rank, world_size)
        loss = loss_fn(step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world_size > 1:
            distributed.average_gradients(backbone)
            distributed.average_gradients(head)
        opt.step()
        logged = distributed.all_reduce_mean(loss.detach()) if world_size > 1 else loss.detach()
        losses.append(float(logged))
    if world_size > 1:
        distributed.sync_batchnorm_stats(backbone)
    return PretrainResult(_snapshot(backbone), losses)


# ----------------------------------------------------------------------------------------------------------------
# (a) supervised on a source task that is not PE


def slice_level_labels(num_slices: Sequence[int], *, num_bins: int = 4) -> Tensor:
    """The default supervised source task: the cranio-caudal level of each slice within its exam.

    num_slices: the length S of each exam, in the order the slices are concatenated → (sum S,) int64, slice i of an
    exam of S slices labelled ``floor(i · num_bins / S)`` in 0..num_bins-1.
    """
    out = [torch.div(torch.arange(s) * num_bins, s, rounding_mode="floor") for s in num_slices]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def pretrain_supervised(
    backbone: nn.Module,
    slices: Images,
    labels: Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    augmentation: AugmentConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> PretrainResult:
    """Supervised pretraining on a non-PE source task: cross-entropy of Linear(D, num_classes) on
    ``backbone.features`` of augmented slices (the stage-1 augmentation, so the weights see what fine-tuning sees).

    slices: (N, 3, H, W) in [0, 1]; labels: (N,) int64 in 0..num_classes-1 (default: max + 1). ``rank`` /
    ``world_size``: DDP (see the module docstring; ``batch_size`` is the global batch).
    """
    x_all = _as_images(slices)
    y_all = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels).long()
    if y_all.shape != (x_all.shape[0],):
        raise ValueError(f"expected {x_all.shape[0]} labels, got shape {tuple(y_all.shape)}")
    k = int(num_classes if num_classes is not None else int(y_all.max()) + 1)
    head = _seeded(seed, lambda: nn.Linear(backbone.feature_dim, k))

    def loss_fn(step: _Step, gen: torch.Generator) -> Tensor:
        x = augment(step.x, generator=gen, config=augmentation, rows=step.rows, total=len(step.batch))
        return F.cross_entropy(head(backbone.features(x)), y_all[step.idx].to(x.device)) * step.scale

    return _train(backbone, head, x_all, steps=steps, batch_size=batch_size, lr=lr, seed=seed, loss_fn=loss_fn,
                  rank=rank, world_size=world_size)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# (b) SimCLR


class ProjectionHead(nn.Module):
    """SimCLR's projection g: Linear(D, D)-ReLU-Linear(D, out_dim). (N, D) → (N, out_dim)."""

    def __init__(self, dim: int, *, out_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def simclr_targets(n: int, *, device: torch.device | None = None) -> Tensor:
    """Index of each view's positive among the 2n views ``[view1 of 0..n-1, view2 of 0..n-1]``: k ↔ k + n.
    → (2n,) int64."""
    return (torch.arange(2 * n, device=device) + n) % (2 * n)


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float = 0.5) -> Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy) over 2N views: textbook SimCLR, each view against the
    other 2N - 1, positives the pairs (k, k + N) (:func:`simclr_targets`). z1, z2: (N, d) projections of the two
    views of the same N images → scalar (:func:`thrifty.core.nn.nt_xent` with ``same_modality_negatives``)."""
    return shared_nt_xent(z1.float(), z2.float(), temperature=temperature, same_modality_negatives=True)


def pretrain_simclr(
    backbone: nn.Module,
    slices: Images,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    temperature: float = 0.5,
    proj_dim: int = 64,
    augmentation: AugmentConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> PretrainResult:
    """SimCLR on unlabelled slices: two independently augmented views per slice, projection head on
    ``backbone.features``, :func:`nt_xent`. slices: (N, 3, H, W) in [0, 1]; batches need >= 2 slices. Under DDP
    (``rank`` / ``world_size``) the projections of every rank are gathered with their gradients, so the loss is the
    global batch's, negatives from every rank included."""
    x_all = _as_images(slices)
    if min(batch_size, x_all.shape[0]) < 2:
        raise ValueError("SimCLR needs at least 2 slices per batch")
    head = _seeded(seed, lambda: ProjectionHead(backbone.feature_dim, out_dim=proj_dim))

    def loss_fn(step: _Step, gen: torch.Generator) -> Tensor:
        m, n = len(step.batch), step.x.shape[0]
        v1 = augment(step.x, generator=gen, config=augmentation, rows=step.rows, total=m)
        v2 = augment(step.x, generator=gen, config=augmentation, rows=step.rows, total=m)
        z = head(backbone.features(torch.cat([v1, v2])))
        if step.world_size == 1:
            return nt_xent(z[:n], z[n:], temperature=temperature)
        own = n if step.scale > 0 else 0  # an empty share computed one row to keep in step: it joins no loss
        z1, z2 = (gather_shards(t[:own], m, rank=step.rank, world_size=step.world_size, grad=True)
                  for t in (z[:n], z[n:]))  # fmt: skip
        # every rank computes the global loss; averaging the gradients over ranks gives one process's gradient (the
        # zero term gives every parameter a gradient on every rank, as the averaging needs)
        return nt_xent(z1, z2, temperature=temperature) + 0.0 * z.sum()

    return _train(backbone, head, x_all, steps=steps, batch_size=batch_size, lr=lr, seed=seed, loss_fn=loss_fn,
                  rank=rank, world_size=world_size)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# (c) Genesis-style restoration


def genesis_pair_2d(
    x: Tensor,
    *,
    generator: torch.Generator,
    shuffle_windows: int | None = None,
    flip_prob: float = 0.4,
    shuffle_prob: float = 0.5,
    nonlinear_prob: float = 0.9,
    paint_prob: float = 0.9,
    outpaint_rate: float = 0.8,
) -> dict[str, Tensor]:
    """Models Genesis input/target pair for 3-slice stacks, built from :mod:`thrifty.methods.genesis.transforms`
    with the release's probabilities (``MGProbs``).

    x: (N, C, H, W) in [0, 1] → ``{"input", "target"}``, both (N, C, H, W): the stacks are viewed as cubes
    (N, C, 1, H, W) (depth 1, so flips act on H or W — a depth flip is a no-op — and shuffle windows and paint boxes
    span all channels); target = the flipped stack, input = target after local shuffle (``shuffle_windows``
    windows, default ``round(SHUFFLE_WINDOWS_PER_PIXEL · H · W)``), Bézier intensity and in/out-painting.
    """
    if x.ndim != 4:
        raise ValueError(f"expected stacks of shape (N, C, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    k = shuffle_windows if shuffle_windows is not None else max(1, round(SHUFFLE_WINDOWS_PER_PIXEL * h * w))
    cube = x.unsqueeze(2)
    inp, target = flip(cube, cube, prob=flip_prob, generator=generator)
    inp = local_shuffle(inp, prob=shuffle_prob, num_windows=k, generator=generator)[0]
    inp = nonlinear(inp, prob=nonlinear_prob, generator=generator)
    inp = painting(inp, prob=paint_prob, outpaint_rate=outpaint_rate, generator=generator)
    return {"input": inp.squeeze(2), "target": target.squeeze(2)}


class RestorationDecoder(nn.Module):
    """Decoder from a backbone's ``feature_map`` (N, in_channels, H/stride, W/stride) to (N, out_channels, H, W) in
    [0, 1]: log2(stride) blocks of bilinear ×2 upsampling + conv3x3-BN-ReLU (channels halved per block, at least
    ``min_channels``), a 1x1 conv and a sigmoid."""

    def __init__(self, in_channels: int, *, stride: int, out_channels: int = 3, min_channels: int = 16) -> None:
        super().__init__()
        octaves = round(math.log2(stride))
        if 2**octaves != stride:
            raise ValueError(f"stride must be a power of 2, got {stride}")
        blocks, c = [], in_channels
        for _ in range(octaves):
            nxt = max(min_channels, c // 2)
            blocks += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(c, nxt, 3, padding=1, bias=False),
                nn.BatchNorm2d(nxt),
                nn.ReLU(inplace=True),
            ]
            c = nxt
        self.body = nn.Sequential(*blocks)
        self.out = nn.Conv2d(c, out_channels, 1)

    def forward(self, fmap: Tensor) -> Tensor:
        return torch.sigmoid(self.out(self.body(fmap)))


def pretrain_restoration(
    backbone: nn.Module,
    slices: Images,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    shuffle_windows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> PretrainResult:
    """Genesis-style restoration on unlabelled slices: :class:`RestorationDecoder` on ``backbone.feature_map``
    restores :func:`genesis_pair_2d`'s target from its input; MSE loss. slices: (N, 3, H, W) in [0, 1], H and W
    multiples of ``backbone.map_stride``. Under DDP (``rank`` / ``world_size``) every rank reads the whole global
    batch once and draws its perturbations (cheap next to the network), as one process draws them, and trains on its
    rows."""
    x_all = _as_images(slices)
    h, w = x_all.shape[-2:]
    if h % backbone.map_stride or w % backbone.map_stride:
        raise ValueError(f"slice size {h}x{w} must be a multiple of the backbone's stride {backbone.map_stride}")
    head = _seeded(
        seed,
        lambda: RestorationDecoder(backbone.map_channels, stride=backbone.map_stride, out_channels=x_all.shape[1]),
    )

    def loss_fn(step: _Step, gen: torch.Generator) -> Tensor:
        # under DDP the draws of the whole batch (read once, step.whole), in its order; this rank's rows of the pairs
        pair = genesis_pair_2d(step.x if step.whole is None else step.whole, generator=gen,
                               shuffle_windows=shuffle_windows)  # fmt: skip
        inp, target = (pair[k] if step.whole is None else pair[k][step.rows] for k in ("input", "target"))
        return F.mse_loss(head(backbone.feature_map(inp)), target) * step.scale

    return _train(backbone, head, x_all, steps=steps, batch_size=batch_size, lr=lr, seed=seed, loss_fn=loss_fn,
                  rank=rank, world_size=world_size, whole_batch=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def initialise(
    backbone: nn.Module,
    init: str,
    *,
    slices: Images | None = None,
    labels: Tensor | np.ndarray | None = None,
    steps: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    **kwargs: Any,
) -> PretrainResult:
    """Apply an initialisation in place: ``random`` (leave as built; no losses), ``supervised``
    (:func:`pretrain_supervised`, needs ``labels``), ``ssl:simclr`` (:func:`pretrain_simclr`), ``ssl:genesis``
    (:func:`pretrain_restoration`). ``imagenet`` / other ``ssl:<method>`` names raise ``NotImplementedError``
    (no ImageNet weights in this project). ``kwargs`` go to the method (``rank`` / ``world_size`` for DDP)."""
    if init == "random":
        return PretrainResult(_snapshot(backbone), [])
    if init not in INITS:
        if init == "imagenet" or init.startswith("ssl:"):
            raise NotImplementedError(
                f"init {init!r} needs published ImageNet weights, which thrifty does not download; "
                f"the miniature's initialisations are {INITS}"
            )
        raise ValueError(f"unknown init {init!r}; choose from {INITS}")
    if slices is None:
        raise ValueError(f"init {init!r} needs pretraining slices")
    common = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, **kwargs)
    if init == "supervised":
        if labels is None:
            raise ValueError("init 'supervised' needs source-task labels (e.g. slice_level_labels)")
        return pretrain_supervised(backbone, slices, labels, **common)
    if init == "ssl:simclr":
        return pretrain_simclr(backbone, slices, **common)
    return pretrain_restoration(backbone, slices, **common)
