"""Self-discovery of visual words for Semantic Genesis (Haghighi et al., MICCAI 2020, arXiv 2007.06959) and TransVW
(Haghighi et al., IEEE TMI 2021, arXiv 2102.10680), written in PyTorch (the release used Keras).

Chest CTs are roughly aligned, so the same voxel coordinate in similar patients shows the same anatomy. The
self-discovery step exploits this without any label:

1. A small 3-D auto-encoder (:class:`VolumeAutoencoder`, :func:`train_autoencoder`) is trained to reconstruct
   whole, downsampled volumes (128×128×64 in the papers; the miniature resizes the phantom's 48×64×64 volumes,
   e.g. to 24×32×32 with :func:`prepare_volumes`). Global average pooling of its bottleneck is a patient
   embedding (:func:`patient_embeddings`).
2. :func:`discover_visual_words`: for each visual-word class, a not yet used random *reference* patient is drawn;
   every training patient is ranked by the L2 distance of its embedding to the reference's (the reference
   first); a random coordinate in the reference's frame is drawn with the release's placement rule (its border,
   at least ``coordinate_min_distance`` voxels from the coordinates of the earlier classes, and a cube that is
   mostly lung by the release's dense-voxel score); the class's instances are that coordinate in the top-K most
   similar patients (:class:`VisualWord`).
3. :func:`crop_instances` crops the instances and labels each with its class, the pseudo-labels of the
   visual-word classification head (:class:`~thrifty.methods.genesis.model.YNet3D`): an exact crop per instance
   and, with ``multi_resolution``, two rescaled crops (random in-plane side and corner offset, depth exact,
   resized to the cube size), as the release takes them.
4. :func:`word_purity` measures, on the phantom, how often a word's instances show the same organ.

The placement rule, from the release's ``get_random_coordinate`` (SemanticGenesis
``self_discovery/pattern_generator_3D.py``, lines 210–269; the same filter as Models Genesis's
``infinite_generator_3D.py``), on the reference volume in [0, 1] (HU window [-1000, 1000]):

* the cube's corner is uniform in ``[m, V - s - 1 - m]`` in-plane (lines 230–231: ``len_border``, and one voxel
  more at the far side) and ``[m_z, V_z - s_z - L - 1 - m_z]`` in depth (lines 232–233: ``len_border_z`` and the
  ``L = len_depth = 3`` lookahead slices), ``margin = (m_z, m, m)``;
* it is rejected when the Euclidean distance to an earlier class's corner is below ``distance_threshold`` (lines
  235–240; with one cube size, corner distances are centre distances);
* it is rejected when the depth-weighted dense score of the cube (lines 243–267: a voxel scores 1 when it is
  ≥ -150 HU, 0.5 when the slice below is, 0 otherwise; :func:`~thrifty.methods.genesis.data.dense_score`)
  sums to more than ``lung_max`` × the cube's voxel count (line 266, ``lung_max = 0.15``): the cube is mostly
  lung (or air);
* after 200 rejected draws (line 227) the class gives up its reference and draws a new unused one (lines
  311–332).

Differences from the release, all deliberate:

* The release never resets its ``repeated`` flag (set at line 239, initialised once at line 222), so after one
  too-close draw every later draw for that reference is rejected until the reference is abandoned; here only the
  too-close draw is rejected. When no unused reference is left, a ``ValueError`` says which constraint failed
  (the release would loop for ever).
* Rescaled crops are re-drawn until they lie inside the volume (the release checks the far side only, line 369;
  its 100-voxel border keeps the near side inside); after ``max_tries`` draws the last one is padded with ``fill``.
* Every instance is returned: C classes × K members × 3 crops gives exactly 3·C·K training cubes. The release
  saved instances in chunks and dropped one instance per 50 classes.
* The reference is always first among the members, also when another patient has an identical embedding.

Conventions: volumes are (D, H, W) = (z, y, x); a cube of size (d, h, w) "around" a coordinate c spans
``c - size // 2 … c - size // 2 + size - 1`` on each axis (the convention of
:func:`thrifty.data.ct_phantom.crop_cube`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.data.ct_phantom import crop_cube
from thrifty.data.volumes import clip_and_normalize
from thrifty.methods.genesis.data import LOOKAHEAD, dense_score

DEFAULT_AE_WIDTHS = (8, 16, 32)
# the release's rescaled crop sides, np.random.randint(50, 80) for 64-voxel cubes, as fractions of the cube side
DEFAULT_SIDE_RANGE = (50 / 64, 80 / 64)
RELEASE_TRIES = 200  # coordinate draws per reference before the release abandons it (pattern_generator_3D.py:227)

Split = Literal["train", "val"]


# ------------------------------------------------------------------------------------------------- auto-encoder


class VolumeAutoencoder(nn.Module):
    """A small 3-D convolutional auto-encoder of whole (downsampled) volumes.

    Encoder: one level per width, each Conv3d 3³ with stride 2 (padding 1, no bias) → BatchNorm3d → ReLU, so
    every level halves D, H and W. Decoder: the mirror image, ConvTranspose3d 4³ with stride 2 (padding 1)
    → BatchNorm3d → ReLU back to the previous width, then a last ConvTranspose3d to ``in_channels`` and a sigmoid.

    Args:
        in_channels: image channels (1 for CT).
        widths: output channels of the encoder levels; the bottleneck has ``widths[-1]`` channels.

    Forward: (B, in_channels, D, H, W) in [0, 1], each of D, H, W divisible by ``2 ** len(widths)`` →
    reconstruction (B, in_channels, D, H, W) in (0, 1). :meth:`encode` gives the bottleneck
    (B, widths[-1], D / 2^L, H / 2^L, W / 2^L).
    """

    def __init__(self, *, in_channels: int = 1, widths: Sequence[int] = DEFAULT_AE_WIDTHS) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be one or more positive channel counts, got {widths}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.in_channels = int(in_channels)
        self.widths = widths
        enc: list[nn.Module] = []
        prev = self.in_channels
        for w in widths:
            enc += [nn.Conv3d(prev, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(w), nn.ReLU(inplace=True)]
            prev = w
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = []
        for w_out in reversed(widths[:-1]):
            dec += [
                nn.ConvTranspose3d(prev, w_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm3d(w_out),
                nn.ReLU(inplace=True),
            ]
            prev = w_out
        dec += [nn.ConvTranspose3d(prev, self.in_channels, 4, stride=2, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    @property
    def divisor(self) -> int:
        """Every spatial size must be a multiple of this (``2 ** len(widths)``)."""
        return 2 ** len(self.widths)

    @property
    def embedding_dim(self) -> int:
        """Channels of the bottleneck, the length F of a patient embedding."""
        return self.widths[-1]

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, D, H, W), got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if any(s < self.divisor or s % self.divisor for s in spatial):
            raise ValueError(
                f"every spatial size (D, H, W) must be a positive multiple of {self.divisor} (the encoder halves "
                f"it {len(self.widths)} times), got {spatial}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) → bottleneck (B, widths[-1], D / 2^L, H / 2^L, W / 2^L)."""
        self._check(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


def prepare_volumes(volumes_hu: Any, *, size: Sequence[int] | None = None) -> torch.Tensor:
    """Auto-encoder input from volumes in HU: clip and normalise to [0, 1], optionally resize (trilinear).

    Args:
        volumes_hu: (N, D, H, W) Hounsfield units (array or tensor, or a sequence of (D, H, W) arrays).
        size: target (d, h, w), e.g. (24, 32, 32) for the miniature, (64, 128, 128) for the papers' 128×128×64;
            ``None`` keeps the size.

    Returns:
        (N, 1, d, h, w) ``float32`` in [0, 1].
    """
    if isinstance(volumes_hu, torch.Tensor):
        volumes_hu = volumes_hu.detach().cpu().numpy()
    arr = np.stack([np.asarray(v) for v in volumes_hu]) if isinstance(volumes_hu, (list, tuple)) else volumes_hu
    x = torch.from_numpy(clip_and_normalize(arr))
    if x.dim() != 4:
        raise ValueError(f"expected volumes (N, D, H, W), got shape {tuple(x.shape)}")
    x = x[:, None]
    if size is not None:
        size = tuple(int(s) for s in size)
        if len(size) != 3 or any(s < 1 for s in size):
            raise ValueError(f"size must be three positive ints (d, h, w), got {size}")
        if size != tuple(x.shape[2:]):
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous()


def train_autoencoder(
    volumes: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    seed: int = 0,
    widths: Sequence[int] = DEFAULT_AE_WIDTHS,
    device: str | torch.device | None = None,
    log: Callable[[int, float], None] | None = None,
) -> tuple[VolumeAutoencoder, list[float]]:
    """Train a :class:`VolumeAutoencoder` to reconstruct ``volumes`` (Adam, MSE).

    Batches are drawn without replacement from a fresh permutation each epoch. The weights' initialisation and the
    batch order come from ``seed`` only (the global RNG state is saved and restored), so a fixed seed gives the
    same model on the same device.

    Args:
        volumes: (N, 1, D, H, W) in [0, 1] (see :func:`prepare_volumes`).
        steps: optimiser steps.
        batch_size: volumes per step (capped at N).
        lr: Adam learning rate.
        seed: seed of the initialisation and the batch order.
        widths: encoder widths of the auto-encoder.
        device: where to train (default: the device of ``volumes``).
        log: called as ``log(step, loss)`` after every step. Users of the release reported the reconstruction
            loss to plateau, so the whole curve is also returned.

    Returns:
        (the model in ``eval()`` mode, the loss of every step: ``steps`` floats).
    """
    if volumes.dim() != 5 or volumes.shape[0] < 1:
        raise ValueError(f"expected volumes (N, C, D, H, W) with N >= 1, got shape {tuple(volumes.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    device = torch.device(device) if device is not None else volumes.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VolumeAutoencoder(in_channels=int(volumes.shape[1]), widths=widths)
    model.to(device).train()
    model._check(volumes[:1])
    data = volumes.to(device=device, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = data.shape[0]
    bs = min(batch_size, n)
    order = torch.randperm(n, generator=gen)
    pos = 0
    losses: list[float] = []
    for step in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        batch = data[order[pos : pos + bs].to(device)]
        pos += bs
        loss = F.mse_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    return model.eval(), losses


@torch.no_grad()
def patient_embeddings(model: VolumeAutoencoder, volumes: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """Patient embeddings: global average pooling of the bottleneck, in ``eval()`` mode.

    Args:
        model: a trained :class:`VolumeAutoencoder`.
        volumes: (N, C, D, H, W) in [0, 1], the auto-encoder's input size.

    Returns:
        (N, F) ``float32`` on the CPU, F = ``model.embedding_dim``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [
            model.encode(volumes[i : i + batch_size].to(device=device, dtype=torch.float32)).mean(dim=(2, 3, 4)).cpu()
            for i in range(0, volumes.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.embedding_dim)


# ------------------------------------------------------------------------------------------------ visual words


@dataclasses.dataclass(frozen=True)
class VisualWord:
    """One visual-word class.

    Attributes:
        class_id: the pseudo-label, 0 … C-1 in discovery order.
        coordinate: (z, y, x) voxel in the reference's frame (the lung-mask frame), used in every member.
        reference: index of the reference patient in the training set.
        members: training-set indices of the top-K patients closest to the reference, the reference first, then
            by increasing embedding distance.
        distances: L2 embedding distance of each member to the reference (0 for the reference itself).
        members_val: validation-set indices of the top-K_val validation patients closest to the reference
            (empty without a validation set), by increasing distance.
        distances_val: their distances to the reference.
    """

    class_id: int
    coordinate: tuple[int, int, int]
    reference: int
    members: tuple[int, ...]
    distances: tuple[float, ...]
    members_val: tuple[int, ...] = ()
    distances_val: tuple[float, ...] = ()

    def indices(self, split: Split = "train") -> tuple[int, ...]:
        """The member indices of ``split`` ("train" or "val")."""
        if split == "train":
            return self.members
        if split == "val":
            return self.members_val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _triple(size: int | Sequence[int], *, what: str) -> tuple[int, int, int]:
    t = (int(size),) * 3 if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if len(t) != 3 or any(s < 1 for s in t):
        raise ValueError(f"{what} must be a positive int or three positive ints (d, h, w), got {size}")
    return t  # type: ignore[return-value]


def _as_numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def lung_fraction(lung_mask: Any, coordinate: Sequence[int], *, cube_size: int | Sequence[int]) -> float:
    """Fraction of lung voxels in the cube of ``cube_size`` around ``coordinate`` of ``lung_mask`` (D, H, W).

    Voxels of the cube outside the volume count as not lung; the denominator is always the cube's volume.
    """
    size = _triple(cube_size, what="cube_size")
    cube = crop_cube(_as_numpy(lung_mask).astype(bool), coordinate, size=size, fill=False)
    return float(cube.mean())


def _rank(embeddings: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``embeddings`` (N, F) by increasing L2 distance to ``reference`` (F,), ties by index; distances."""
    dist = torch.linalg.vector_norm(embeddings - reference[None], dim=1)
    order = torch.sort(dist, stable=True).indices
    return order, dist


def placement_corners(
    spatial: Sequence[int], cube_size: int | Sequence[int], *, margin: int | Sequence[int] = 0
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The release's range of a word cube's corner (``pattern_generator_3D.py`` lines 230–233), both ends included.

    spatial: (D, H, W) of the volumes; cube_size: (d, h, w); margin: (m_z, m_y, m_x) border (the release's
    ``len_border_z = 30``, ``len_border = 100``) → (low, high) corners (z, y, x): ``[m, V - s - 1 - m]`` in-plane
    and ``[m_z, D - d - L - 1 - m_z]`` in depth, L = 3 lookahead slices of the dense score. Raises ``ValueError``
    when the range is empty.
    """
    size = _triple(cube_size, what="cube_size")
    m = (int(margin),) * 3 if isinstance(margin, (int, np.integer)) else tuple(int(v) for v in margin)
    if len(m) != 3 or min(m) < 0:
        raise ValueError(f"margin must be a non-negative int or three non-negative ints (z, y, x), got {margin}")
    extra = (LOOKAHEAD + 1, 1, 1)
    lo = tuple(int(v) for v in m)
    hi = tuple(int(v - s - e - mm) for v, s, e, mm in zip(spatial, size, extra, m))
    if any(h < lo_ for lo_, h in zip(lo, hi)):
        raise ValueError(
            f"cube_size {size} with margin {lo} does not fit in the volumes of shape {tuple(spatial)} (the release's "
            f"placement needs size + margin on both sides + 1 voxel in-plane and + {LOOKAHEAD + 1} slices in depth)"
        )
    return lo, hi  # type: ignore[return-value]


def discover_visual_words(
    *,
    embeddings_train: torch.Tensor,
    volumes_train: Any,
    num_classes: int,
    top_k_train: int,
    cube_size: int | Sequence[int],
    coordinate_min_distance: float = 5,
    max_dense_fraction: float = 0.15,
    margin: int | Sequence[int] = 0,
    embeddings_val: torch.Tensor | None = None,
    top_k_val: int = 0,
    max_tries: int = RELEASE_TRIES,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> list[VisualWord]:
    """Discover ``num_classes`` visual words (Semantic Genesis / TransVW self-discovery).

    For each class c = 0 … C-1:

    1. the reference is the next patient of one random permutation of the training patients (the release draws
       unused references uniformly, ``pattern_generator_3D.py`` lines 312–316);
    2. a coordinate is drawn in the reference with the release's placement rule (module docstring): corner uniform
       in :func:`placement_corners`, rejected when closer than ``coordinate_min_distance`` voxels to an earlier
       class's, rejected when the reference's cube (with the L − 1 = 2 slices below it) has a
       :func:`~thrifty.methods.genesis.data.dense_score` above ``max_dense_fraction`` (line 266: the scores'
       sum against ``lung_max`` × the voxel count); after ``max_tries`` rejected draws the class moves on to the
       next reference (lines 311–332);
    3. every training patient is ranked by the L2 distance of its embedding to the final reference's, the
       reference first; the class's members are the first ``top_k_train``; with ``embeddings_val`` the
       validation patients are ranked against the same (training) reference embedding and the first
       ``top_k_val`` are ``members_val``, so validation instances come from validation patients only.

    The stored coordinate is the cube's centre, ``corner + cube_size // 2`` (:func:`crop_cube`'s convention); the
    release stores the corner. The dense score counts air as well as lung as not dense: with a border too small
    to keep cubes inside the body (as the miniature's, on its 64×64 phantom frames), cubes reaching into the air
    around the body pass too.

    Args:
        embeddings_train: (N, F) patient embeddings (:func:`patient_embeddings`).
        volumes_train: (N, D, H, W) training volumes in [0, 1] (HU window [-1000, 1000]), in the frame the
            coordinates are given in (full resolution: the embeddings may come from downsampled volumes).
        num_classes: C, at most N (every class needs its own reference).
        top_k_train: K, members per class, 1 <= K <= N.
        cube_size: (d, h, w) of the word cubes.
        coordinate_min_distance: minimum Euclidean distance in voxels between two classes' coordinates (the
            release's ``distance_threshold = 5``).
        max_dense_fraction: the release's ``lung_max`` (0.15), in [0, 1].
        margin: (m_z, m_y, m_x) voxels, or one int, between the cube (and its lookahead) and the volume's border
            (the release's ``len_border_z = 30``, ``len_border = 100`` on 512² CT).
        embeddings_val: (N_val, F) embeddings of validation patients, or ``None``.
        top_k_val: K_val, validation members per class (1 <= K_val <= N_val when ``embeddings_val`` is given).
        max_tries: coordinate draws per reference before moving to the next (the release: 200).
        generator: source of randomness; default ``torch.Generator().manual_seed(seed)``.
        seed: used when ``generator`` is ``None``.

    Returns:
        C :class:`VisualWord`, ``class_id`` 0 … C-1.

    Raises:
        ValueError: bad shapes or counts (e.g. more classes than patients), or a class for which no unused
            reference yields a coordinate (the message names the class and the constraints that failed).
    """
    emb = torch.as_tensor(embeddings_train).detach().to("cpu", torch.float32)
    vols = _as_numpy(volumes_train)
    if emb.dim() != 2:
        raise ValueError(f"embeddings_train must be (N, F), got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    if vols.ndim != 4 or vols.shape[0] != n:
        raise ValueError(f"volumes_train must be (N={n}, D, H, W), got shape {vols.shape}")
    if not 1 <= num_classes <= n:
        raise ValueError(
            f"num_classes must be between 1 and the number of training patients ({n}): each class needs its own "
            f"reference patient; got {num_classes}"
        )
    if not 1 <= top_k_train <= n:
        raise ValueError(f"top_k_train must be between 1 and the number of training patients ({n}), got {top_k_train}")
    if not 0.0 <= max_dense_fraction <= 1.0:
        raise ValueError(f"max_dense_fraction must be in [0, 1], got {max_dense_fraction}")
    if not (coordinate_min_distance >= 0 and math.isfinite(coordinate_min_distance)):
        raise ValueError(f"coordinate_min_distance must be a finite number >= 0, got {coordinate_min_distance}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    emb_val = None
    if embeddings_val is not None:
        emb_val = torch.as_tensor(embeddings_val).detach().to("cpu", torch.float32)
        if emb_val.dim() != 2 or emb_val.shape[1] != emb.shape[1]:
            raise ValueError(f"embeddings_val must be (N_val, F={emb.shape[1]}), got shape {tuple(emb_val.shape)}")
        if not 1 <= top_k_val <= emb_val.shape[0]:
            raise ValueError(
                f"top_k_val must be between 1 and the number of validation patients ({emb_val.shape[0]}), "
                f"got {top_k_val}"
            )
    size = _triple(cube_size, what="cube_size")
    lo_c, hi_c = placement_corners(vols.shape[1:], size, margin=margin)
    lo, span = torch.tensor(lo_c), torch.tensor(hi_c) - torch.tensor(lo_c) + 1
    half = torch.tensor([s // 2 for s in size])
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)

    queue = torch.randperm(n, generator=gen).tolist()
    words: list[VisualWord] = []
    placed: list[torch.Tensor] = []  # earlier corners
    for c in range(num_classes):
        corner = None
        too_close = too_dense = 0
        while corner is None and queue:
            ref = queue.pop(0)
            for _ in range(max_tries):
                draw = lo + (torch.rand(3, generator=gen) * span.float()).long().clamp_max(span - 1)
                if placed and float(torch.cdist(draw[None].float(), torch.stack(placed).float()).min()) < (
                    coordinate_min_distance
                ):
                    too_close += 1
                    continue
                z, y, x = draw.tolist()
                window = vols[ref, z : z + size[0] + LOOKAHEAD - 1, y : y + size[1], x : x + size[2]]
                if dense_score(window) > max_dense_fraction:
                    too_dense += 1
                    continue
                corner = draw
                break
        if corner is None:
            raise ValueError(
                f"could not place the coordinate of visual word {c}: no unused reference patient left after "
                f"{too_close + too_dense} draws ({max_tries} per reference): {too_close} were closer than "
                f"coordinate_min_distance={coordinate_min_distance} voxels to one of the {len(placed)} earlier "
                f"coordinates, {too_dense} had a dense score above max_dense_fraction={max_dense_fraction} in the "
                f"{size} cube; raise max_dense_fraction, lower the margin or coordinate_min_distance, or ask for "
                "fewer classes"
            )
        placed.append(corner)
        order, dist = _rank(emb, emb[ref])
        order = [ref, *(int(i) for i in order.tolist() if i != ref)]
        members = tuple(order[:top_k_train])
        members_val: tuple[int, ...] = ()
        distances_val: tuple[float, ...] = ()
        if emb_val is not None:
            order_val, dist_val = _rank(emb_val, emb[ref])
            members_val = tuple(int(i) for i in order_val[:top_k_val].tolist())
            distances_val = tuple(float(dist_val[i]) for i in members_val)
        words.append(
            VisualWord(
                class_id=c,
                coordinate=tuple(int(v) for v in (corner + half).tolist()),  # type: ignore[arg-type]
                reference=int(ref),
                members=members,
                distances=tuple(float(dist[i]) for i in members),
                members_val=members_val,
                distances_val=distances_val,
            )
        )
    return words


# ---------------------------------------------------------------------------------------------------- instances


def _crop_box(volume: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> torch.Tensor:
    """(d, h, w) ``float32`` box of ``volume`` (D, H, W) starting at ``start`` (z, y, x); outside voxels ``fill``."""
    centre = [int(a) + int(s) // 2 for a, s in zip(start, size)]
    return torch.from_numpy(crop_cube(volume, centre, size=tuple(int(s) for s in size), fill=fill).astype(np.float32))


def rescaled_side_range(side: int, side_range: tuple[float, float] = DEFAULT_SIDE_RANGE) -> tuple[int, int]:
    """(low, high) of a rescaled crop's side for cubes of ``side``, high excluded, like the release's
    ``np.random.randint(minPatchSize, maxPatchSize)``: ``round(f · side)`` for each fraction f of ``side_range``
    ((50, 80) for 64, (25, 40) for 32)."""
    low = max(1, round(side_range[0] * side))
    return low, max(low + 1, round(side_range[1] * side))


def crop_instances(
    volumes: Any,
    words: Sequence[VisualWord],
    *,
    cube_size: int | Sequence[int],
    fill: float,
    split: Split = "train",
    multi_resolution: bool = False,
    side_range: tuple[float, float] = DEFAULT_SIDE_RANGE,
    jitter: int = 0,
    rescaled: int = 2,
    max_tries: int = 100,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop every instance of every visual word: the word's coordinate in each of its members, as the release's
    ``pattern_generator_3D.py`` does.

    * Exact crop (lines 342 and 432): the cube of ``cube_size`` around the coordinate, never jittered.
    * With ``multi_resolution`` (lines 364–424, the release's ``--multi_res``), ``rescaled`` (the release: 2)
      more crops per instance, each drawn independently: an in-plane side ``side_h`` uniform in
      :func:`rescaled_side_range` (``np.random.randint(50, 80)`` for 64-voxel cubes; ``side_w`` follows h:w),
      and an in-plane corner offset (δ_h, δ_w) uniform in {-jitter … jitter - 1} each
      (``np.random.randint(-d, d)``, d = 10 in the release); the crop spans rows ``y0 + δ_h … + side_h``, columns
      ``x0 + δ_w … + side_w`` and exactly the exact crop's slices (depth is neither shifted nor rescaled), from the
      exact crop's corner (z0, y0, x0). It is re-drawn until it lies inside the volume (at most ``max_tries``,
      then padded with ``fill``) and resized to ``cube_size`` slice by slice (bilinear, ``align_corners=False``:
      skimage's order-1 ``resize``; values stay within the crop's range). The release takes multi-resolution
      crops for training instances only; pass ``multi_resolution=False`` for ``split="val"`` to match it.

    Voxels outside the volume are ``fill`` (0 for volumes normalised by
    :func:`~thrifty.data.volumes.clip_and_normalize`, -1000 for HU). Every instance is returned (the release's
    chunked save lost one per 50 classes).

    Args:
        volumes: (N, D, H, W) volumes of ``split`` (HU or normalised), array or tensor; member indices index it.
        words: from :func:`discover_visual_words`.
        cube_size: (d, h, w) of the output cubes.
        fill: value of voxels outside the volume.
        split: "train" uses ``members``, "val" ``members_val`` (then ``volumes`` are the validation volumes).
        multi_resolution: add the rescaled crops.
        side_range: (low, high) rescaled side as fractions of the cube's in-plane side (high excluded).
        jitter: in-plane corner offset bound of the rescaled crops, voxels (0: none).
        rescaled: rescaled crops per instance.
        max_tries: draws of a rescaled crop before padding it.
        generator: randomness of the rescaled crops; default ``torch.Generator().manual_seed(seed)``.
        seed: used when ``generator`` is ``None``.

    Returns:
        cubes (M, 1, d, h, w) ``float32`` and labels (M,) int64. With C words of K members each: the C·K exact
        crops first (word by word, members in order), then, with ``multi_resolution``, one block of C·K per
        rescaled crop in the same order (the release's ``train_data1``, ``train_data2``, ``train_data3``):
        M = C·K·(1 + rescaled); labels are the words' ``class_id`` in the same layout.
    """
    vols = _as_numpy(volumes)
    if vols.ndim != 4:
        raise ValueError(f"volumes must be (N, D, H, W), got shape {vols.shape}")
    size = _triple(cube_size, what="cube_size")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if rescaled < 0 or max_tries < 1:
        raise ValueError(f"need rescaled >= 0 and max_tries >= 1, got {rescaled} and {max_tries}")
    low, high = (float(v) for v in side_range)
    if multi_resolution and not 0 < low < high:
        raise ValueError(f"side_range must be (low, high) with 0 < low < high, got {side_range}")
    side_lo, side_hi = rescaled_side_range(size[1], (low, high))
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    d, h, w = size
    blocks: list[list[torch.Tensor]] = [[] for _ in range(1 + (rescaled if multi_resolution else 0))]
    labels: list[int] = []
    for word in words:
        for m in word.indices(split):
            if not 0 <= m < vols.shape[0]:
                raise ValueError(
                    f"visual word {word.class_id} names {split} patient {m}, but only {vols.shape[0]} volumes "
                    "were given (validation members need the validation volumes)"
                )
            z0, y0, x0 = (c - s // 2 for c, s in zip(word.coordinate, size))
            blocks[0].append(_crop_box(vols[m], (z0, y0, x0), size, fill))
            labels.append(word.class_id)
            for r in range(1, len(blocks)):
                for _ in range(max_tries):
                    side_h = int(torch.randint(side_lo, side_hi, (), generator=gen))
                    side_w = max(1, round(side_h * w / h))
                    dy, dx = torch.randint(-jitter, jitter, (2,), generator=gen).tolist() if jitter else (0, 0)
                    ys, xs = y0 + dy, x0 + dx
                    if ys >= 0 and xs >= 0 and ys + side_h <= vols.shape[2] and xs + side_w <= vols.shape[3]:
                        break
                crop = _crop_box(vols[m], (z0, ys, xs), (d, side_h, side_w), fill)
                if (side_h, side_w) != (h, w):
                    crop = F.interpolate(crop[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                blocks[r].append(crop)
    if not labels:
        return torch.zeros(0, 1, *size), torch.zeros(0, dtype=torch.long)
    cubes = torch.stack([c for block in blocks for c in block])[:, None].contiguous()
    return cubes, torch.tensor(labels * len(blocks), dtype=torch.long)


# ------------------------------------------------------------------------------------------------------ purity


def word_purity(words: Sequence[VisualWord], label_maps: Any, *, split: Split = "train") -> float:
    """Visual-word purity against organ labels: mean over words of the majority label's fraction.

    For each word, the organ label (e.g. :data:`thrifty.data.ct_phantom.LABELS`) at its coordinate is read in
    every member; the word's purity is the share of its most frequent label. 1.0 means every instance of every
    word centres on the same organ; 1/K is the floor for K members.

    Args:
        words: visual words.
        label_maps: (N, D, H, W) integer label maps of ``split``'s patients.
        split: "train" or "val" members.

    Returns:
        Purity in [0, 1] (``nan`` for no words or no members).
    """
    maps = _as_numpy(label_maps)
    if maps.ndim != 4:
        raise ValueError(f"label_maps must be (N, D, H, W), got shape {maps.shape}")
    scores = []
    for word in words:
        members = word.indices(split)
        if not members:
            continue
        z, y, x = word.coordinate
        if not all(0 <= v < s for v, s in zip(word.coordinate, maps.shape[1:])):
            raise ValueError(f"coordinate {word.coordinate} of word {word.class_id} is outside {maps.shape[1:]}")
        values = maps[list(members), z, y, x]
        _, counts = np.unique(values, return_counts=True)
        scores.append(counts.max() / len(members))
    return float(np.mean(scores)) if scores else float("nan")
