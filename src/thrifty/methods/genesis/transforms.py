"""Image transforms of the Genesis family of 3D self-supervised pretraining methods for CT:

- Models Genesis (Zhou et al., "Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis",
  MICCAI 2019 / MedIA 2021, arXiv 1908.06912): flip → local pixel shuffling → non-linear (Bézier) intensity
  transform → in-/out-painting; the network restores the original (flipped) cube.
- Semantic Genesis (Haghighi et al., "Learning Semantics-enriched Representation via Self-discovery,
  Self-classification, and Self-restoration", MICCAI 2020, arXiv 2007.06959): elastic deformation, then exactly
  one of the four Models Genesis perturbations; the target is the undeformed cube.
- TransVW (Haghighi et al., "Transferable Visual Words", IEEE TMI 2021, arXiv 2102.10680) restores visual words
  perturbed with Semantic Genesis's pipeline (:func:`semantic_genesis`): the ``luna_loader`` of its PyTorch
  ``data_loader.py`` is Semantic Genesis's line for line (elastic deformation, then one of four perturbations).

Everything works on batches of cubes ``x`` of shape (B, C, D, H, W) (C = 1 for CT) with values in [0, 1] (HU
clipped to [-1000, 1000] and scaled), on any device. Every random transform takes a ``torch.Generator`` and
draws all of its randomness from it (on the generator's device, then moved to ``x.device``), so one seed gives
one result; each sample of a batch gets its own draws. Random integers "in [lo, hi]" include both ends, like
Python's ``random.randint`` in the original release.

Semantics that differ from a literal reading of "apply the windows one after another":

- **Local shuffle** (:func:`local_shuffle`). The release reads every window from an unmodified copy of the cube
  and writes the shuffled window into the output, so where windows overlap the *last* window wins and voxels
  of the original can be duplicated or lost. ``overlap="last"`` (default) reproduces exactly that, in one shot:
  each voxel is owned by the last window that covers it, and only the owner's write is kept (computed with a
  ``scatter_reduce(amax)`` of window ids, so no write order is left to the scatter kernel).
  ``overlap="partition"`` instead permutes, inside each window, only the voxels that window owns: the whole
  cube is then a permutation of the input (its multiset of values is preserved). For one window, or for windows
  that do not overlap, both modes agree. :func:`local_shuffle_loop` is the naive per-window Python loop with the
  same draws and the same semantics; it returns identical cubes.
- **Reversed Bézier curve** (:func:`bezier_lut`, :func:`nonlinear`). With the cubic Bézier curve
  ``B(t) = (bx(t), by(t))`` through (0, 0), P1, P2, (1, 1) (``bx``, ``by`` are non-decreasing in t for control
  points in [0, 1]²), the forward mapping is ``f(u) = by(τ(u))`` with ``bx(τ(u)) = u``; the reversed mapping
  is ``r(u) = by(1 − τ(u))``: the curve's ordinates read in reverse parameter order against its ascending
  abscissae. That is what the release computes when it sorts only the x samples of a curve evaluated with
  reversed Bernstein indices. ``r`` is non-increasing with ``r(0) = 1`` and ``r(1) = 0`` (an intensity
  inversion along the curve), ``f`` is non-decreasing with ``f(0) = 0`` and ``f(1) = 1``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "PRESETS",
    "MGProbs",
    "SGProbs",
    "apply_lut",
    "bezier_lut",
    "box_mask",
    "elastic",
    "elastic_displacement",
    "flip",
    "gaussian_kernel1d",
    "inpaint",
    "local_shuffle",
    "local_shuffle_loop",
    "models_genesis",
    "nonlinear",
    "outpaint",
    "painting",
    "semantic_genesis",
    "warp_inplane",
]

Overlap = Literal["last", "partition"]


@dataclasses.dataclass(frozen=True)
class MGProbs:
    """Probabilities of the Models Genesis pipeline (the release's defaults): ``flip`` per flip attempt (up to 3),
    ``shuffle`` local pixel shuffling, ``nonlinear`` Bézier intensity, ``paint`` painting, of which out-painting
    with ``outpaint_rate`` and in-painting otherwise."""

    flip: float = 0.4
    shuffle: float = 0.5
    nonlinear: float = 0.9
    paint: float = 0.9
    outpaint_rate: float = 0.8


@dataclasses.dataclass(frozen=True)
class SGProbs:
    """Probabilities of the one perturbation Semantic Genesis applies after the elastic deformation (normalised to
    sum to 1): local shuffle, Bézier intensity, in-painting (one box), out-painting (one kept box)."""

    shuffle: float = 0.25
    nonlinear: float = 0.25
    inpaint: float = 0.25
    outpaint: float = 0.25

    def as_tensor(self) -> torch.Tensor:
        """(4,) float64 probabilities in choice order 0..3, normalised."""
        p = torch.tensor([self.shuffle, self.nonlinear, self.inpaint, self.outpaint], dtype=torch.float64)
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"invalid Semantic Genesis probabilities {p.tolist()}")
        return p / p.sum()


PRESETS: dict[str, MGProbs | SGProbs] = {"models_genesis": MGProbs(), "semantic_genesis": SGProbs()}


# ----------------------------------------------------------------------------------------------------------------
# random draws


def _uniform(
    shape: Sequence[int], *, generator: torch.Generator, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """U[0, 1) of ``shape`` drawn on the generator's device, returned on ``device``."""
    return torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def _randint(
    low: int | torch.Tensor,
    high: int | torch.Tensor,
    *,
    shape: Sequence[int],
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """int64 uniform in [low, high] (both inclusive, element-wise; ``high >= low``) of ``shape``."""
    u = _uniform(shape, generator=generator, device=device, dtype=torch.float64)
    low = torch.as_tensor(low, device=device, dtype=torch.int64)
    span = torch.as_tensor(high, device=device, dtype=torch.int64) - low + 1
    return low + torch.minimum((u * span).floor().long(), span - 1)


def _check_cube(x: torch.Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"expected cubes of shape (B, C, D, H, W), got {tuple(x.shape)}")


def _bcast(flags: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, 1, 1) for ``torch.where`` over cubes."""
    return flags.view(-1, 1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# flip


def flip(
    x: torch.Tensor, y: torch.Tensor, *, prob: float = 0.4, max_flips: int = 3, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Models Genesis flip: per sample, while ``rand < prob`` (at most ``max_flips`` times) flip a random spatial
    axis (D, H or W, uniformly); the same flips are applied to ``x`` and ``y``.

    x, y: (B, C, D, H, W) and (B, C', D, H, W) → flipped copies of the same shapes. Flipping an axis twice
    cancels, so each sample ends up flipped along the axes drawn an odd number of times.
    """
    _check_cube(x)
    _check_cube(y)
    b = x.shape[0]
    go = _uniform((b, max_flips), generator=generator, device=x.device) < prob
    axes = _randint(0, 2, shape=(b, max_flips), generator=generator, device=x.device)
    done = go.long().cumprod(dim=1)  # the while loop stops at the first failed draw
    counts = (F.one_hot(axes, 3) * done[..., None]).sum(dim=1)  # (B, 3) flips per axis
    odd = counts % 2 == 1
    x, y = x.clone(), y.clone()
    for a in range(3):
        if odd[:, a].any():
            m = _bcast(odd[:, a])
            x = torch.where(m, x.flip(a + 2), x)
            y = torch.where(m, y.flip(a + 2), y)
    return x, y


# ----------------------------------------------------------------------------------------------------------------
# local pixel shuffling


def _window_draws(
    spatial: Sequence[int], *, num_windows: int, max_frac: float, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample's windows: starts (K, 3), sides (K, 3) in [1, max(1, ⌊max_frac·size⌋)], and permutation keys
    (V,) U[0, 1), V = total window volume: window k's keys, in raster order of its voxels, follow window k − 1's."""
    hi = torch.tensor([max(1, int(max_frac * s + 1e-9)) for s in spatial], device=device)
    sides = _randint(1, hi, shape=(num_windows, 3), generator=generator, device=device)
    size = torch.tensor(list(spatial), device=device)
    starts = _randint(0, size - sides, shape=(num_windows, 3), generator=generator, device=device)
    keys = _uniform((int(sides.prod(dim=1).sum()),), generator=generator, device=device)
    return starts, sides, keys


def _shuffle_pairs(
    spatial: Sequence[int],
    starts: torch.Tensor,
    sides: torch.Tensor,
    keys: torch.Tensor,
    overlap: Overlap,
    sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat destination and source voxel indices (each (M,)) of a shuffle: ``out[dst] = x[src]``, with flat index
    ``s·N + raster index`` for windows of sample s (``sample`` (K,), default all 0; N = D·H·W).

    The voxels of all K windows are listed back to back (V entries, window by window, raster order inside a
    window); the window that owns a voxel is the last one of its sample covering it. Inside window k the pool
    (all its voxels for ``"last"``, the voxels it owns for ``"partition"``) is permuted: the pool voxel of raster
    rank i receives the pool voxel with the i-th smallest key. Only the owner's writes are kept, so destinations
    are unique.
    """
    _, h, w = spatial
    device = starts.device
    vol = sides.prod(dim=1)  # (K,)
    first = vol.cumsum(0) - vol  # (K,) first entry of each window
    wid = torch.repeat_interleave(torch.arange(starts.shape[0], device=device), vol)  # (V,) window of each entry
    j = torch.arange(keys.numel(), device=device) - first[wid]  # raster index inside the window
    sh, sw = sides[wid, 1], sides[wid, 2]
    org = starts[wid]
    flat = ((org[:, 0] + j // (sh * sw)) * h + org[:, 1] + (j // sw) % sh) * w + org[:, 2] + j % sw  # (V,)
    n = math.prod(spatial)
    num_samples = 1
    if sample is not None and sample.numel():
        flat = flat + sample[wid] * n
        num_samples = int(sample.max()) + 1
    owner = torch.full((num_samples * n,), -1, dtype=torch.long, device=device)
    owner.scatter_reduce_(0, flat, wid, reduce="amax")
    live = owner[flat] == wid
    pool = torch.ones_like(live) if overlap == "last" else live
    # one sort orders every window: by window, pool before the rest, then by key (exact in float64)
    order = (wid.double() * 2 + (~pool).double() + keys.double()).argsort(stable=True)
    before = pool.long().cumsum(0) - pool.long()  # pool entries before each entry
    (e,) = live.nonzero(as_tuple=True)  # live ⊆ pool: the kept (owner's) writes
    we = wid[e]
    rank = before[e] - before[first[we]]
    return flat[e], flat[order[first[we] + rank]]


def _check_overlap(overlap: str) -> None:
    if overlap not in ("last", "partition"):
        raise ValueError(f"overlap must be 'last' or 'partition', got {overlap!r}")


def local_shuffle(
    x: torch.Tensor,
    *,
    prob: float = 0.5,
    num_windows: int = 10_000,
    max_frac: float = 0.1,
    overlap: Overlap = "last",
    group: int | None = None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Models Genesis local pixel shuffling, vectorised: for each sample with ``rand < prob``, ``num_windows``
    windows with sides in [1, max(1, ⌊max_frac·size⌋)] per axis at uniform positions inside the cube, each with
    its own random permutation of its voxels (all channels permuted alike). Overlaps: see ``overlap`` in the
    module docstring (default ``"last"``: the release's semantics).

    x: (B, C, D, H, W) → (shuffled (B, C, D, H, W), windows (B, K, 6) int64 rows ``[d0, h0, w0, sd, sh, sw]``,
    all zero for samples left unshuffled). The windows of ``group`` samples are gathered and scattered at once
    (default: one sample at a time on CPU, where the index arrays then stay in cache — measured faster — and all
    samples at once on other devices); the result does not depend on ``group``.
    """
    _check_cube(x)
    _check_overlap(overlap)
    b, c, *spatial = x.shape
    apply = _uniform((b,), generator=generator, device=x.device) < prob
    windows = torch.zeros(b, num_windows, 6, dtype=torch.long, device=x.device)
    chosen = apply.nonzero().flatten().tolist()
    draws = [
        _window_draws(spatial, num_windows=num_windows, max_frac=max_frac, generator=generator, device=x.device)
        for _ in chosen
    ]
    out = x.clone()
    step = group or (1 if x.device.type == "cpu" else max(1, len(chosen)))
    for g0 in range(0, len(chosen), step):
        idx = chosen[g0 : g0 + step]
        starts, sides, keys = (torch.cat(parts) for parts in zip(*draws[g0 : g0 + step]))
        windows[idx] = torch.cat([starts, sides], dim=1).view(len(idx), num_windows, 6)
        sample = torch.arange(len(idx), device=x.device).repeat_interleave(num_windows)
        dst, src = _shuffle_pairs(spatial, starts, sides, keys, overlap, sample)
        sel = x[idx].reshape(len(idx), c, -1).transpose(0, 1).reshape(c, -1)  # (C, S·N)
        shuffled = sel.clone()
        shuffled[:, dst] = sel[:, src]
        out[idx] = shuffled.view(c, len(idx), *spatial).transpose(0, 1)
    return out, windows


def local_shuffle_loop(
    x: torch.Tensor,
    *,
    prob: float = 0.5,
    num_windows: int = 10_000,
    max_frac: float = 0.1,
    overlap: Overlap = "last",
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`local_shuffle`: the release's Python loop over windows (read each window from the
    input, shuffle, write it into the output; later windows overwrite earlier ones). Same draws, same semantics,
    same outputs as the vectorised version; slow (one iteration per window), for tests and benchmarks only."""
    _check_cube(x)
    _check_overlap(overlap)
    b, c, *spatial = x.shape
    apply = _uniform((b,), generator=generator, device=x.device) < prob
    windows = torch.zeros(b, num_windows, 6, dtype=torch.long, device=x.device)
    out = x.clone(memory_format=torch.contiguous_format)
    for i in apply.nonzero().flatten().tolist():
        starts, sides, keys = _window_draws(
            spatial, num_windows=num_windows, max_frac=max_frac, generator=generator, device=x.device
        )
        windows[i] = torch.cat([starts, sides], dim=1)
        boxes = windows[i].tolist()
        ends = sides.prod(dim=1).cumsum(0).tolist()
        regions = [(slice(None), slice(z, z + sd), slice(y, y + sh), slice(v, v + sw)) for z, y, v, sd, sh, sw in boxes]
        if overlap == "partition":
            owner = torch.full(spatial, -1, dtype=torch.long, device=x.device)
            for k, region in enumerate(regions):
                owner[region[1:]] = k
        for k, (region, (_, _, _, sd, sh, sw)) in enumerate(zip(regions, boxes)):
            window = x[i][region].reshape(c, -1)
            key = keys[ends[k] - sd * sh * sw : ends[k]]
            if overlap == "last":
                out[i][region] = window[:, key.argsort(stable=True)].reshape(c, sd, sh, sw)
            else:
                own = (owner[region[1:]] == k).reshape(-1)
                block = out[i][region].reshape(c, -1).clone()
                block[:, own] = window[:, own][:, key[own].argsort(stable=True)]
                out[i][region] = block.reshape(c, sd, sh, sw)
    return out, windows


# ----------------------------------------------------------------------------------------------------------------
# non-linear (Bézier) intensity transform


def bezier_lut(
    control_points: torch.Tensor,
    n: int = 1001,
    *,
    reverse: bool | torch.Tensor = False,
    samples: int | None = None,
) -> torch.Tensor:
    """Lookup tables of cubic Bézier intensity curves through (0, 0), P1, P2, (1, 1).

    control_points: (..., 2, 2) rows P1 = (x1, y1), P2 = (x2, y2) in [0, 1]² → (..., n) float64 table of the
    mapping on the uniform grid ``u_j = j / (n − 1)``. The curve is sampled at ``samples`` parameter values
    (default 4·n), made monotone with ``cummax`` (a no-op up to rounding: both coordinates are non-decreasing
    in t for control points in [0, 1]²) and resampled onto the grid by linear interpolation. ``reverse`` (bool
    or a bool tensor of shape ``...``) selects the reversed mapping ``r(u) = by(1 − τ(u))`` (see the module
    docstring): the forward table is non-decreasing from 0 to 1, the reversed one non-increasing from 1 to 0.
    """
    if n < 2:
        raise ValueError("a lookup table needs n >= 2 entries")
    cp = control_points.to(torch.float64)
    batch = cp.shape[:-2]
    m = samples or 4 * n
    t = torch.linspace(0.0, 1.0, m, dtype=torch.float64, device=cp.device)
    w1, w2, w3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3  # weight of P0 = (0, 0) drops out
    bx = (cp[..., 0, 0, None] * w1 + cp[..., 1, 0, None] * w2 + w3).cummax(dim=-1).values.clamp(0.0, 1.0)
    by = (cp[..., 0, 1, None] * w1 + cp[..., 1, 1, None] * w2 + w3).cummax(dim=-1).values.clamp(0.0, 1.0)
    rev = torch.as_tensor(reverse, dtype=torch.bool, device=cp.device).expand(batch)
    by = torch.where(rev[..., None], by.flip(-1), by)
    u = torch.linspace(0.0, 1.0, n, dtype=torch.float64, device=cp.device).expand(*batch, n).contiguous()
    hi = torch.searchsorted(bx.contiguous(), u).clamp(1, m - 1)
    lo = hi - 1
    x0, x1 = bx.gather(-1, lo), bx.gather(-1, hi)
    y0, y1 = by.gather(-1, lo), by.gather(-1, hi)
    step = x1 - x0
    frac = torch.where(step > 0, (u - x0) / step.clamp_min(1e-300), torch.zeros_like(u)).clamp(0.0, 1.0)
    lut = y0 + (y1 - y0) * frac
    lut[..., 0] = torch.where(rev, 1.0, 0.0)
    lut[..., -1] = torch.where(rev, 0.0, 1.0)
    return lut


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map each sample's values through its table by linear interpolation.

    x: (B, ...) in [0, 1]; lut: (B, n) values of the mapping at ``j / (n − 1)`` → (B, ...) in x.dtype.
    """
    b, n = lut.shape
    lut = lut.to(device=x.device, dtype=x.dtype)
    pos = x.reshape(b, -1).clamp(0.0, 1.0) * (n - 1)
    i0 = pos.floor().long().clamp(0, n - 2)
    frac = pos - i0
    lo, hi = lut.gather(1, i0), lut.gather(1, i0 + 1)
    return (lo + (hi - lo) * frac).clamp(0.0, 1.0).view_as(x)


def nonlinear(
    x: torch.Tensor,
    *,
    prob: float = 0.9,
    reverse_prob: float = 0.5,
    n: int = 1001,
    generator: torch.Generator,
) -> torch.Tensor:
    """Models Genesis non-linear intensity transform: for each sample with ``rand < prob``, a random cubic Bézier
    curve (P1, P2 uniform in [0, 1]²) maps the intensities; with probability ``reverse_prob`` the reversed curve
    (an inverting, non-increasing mapping; see the module docstring) is used instead.

    x: (B, C, D, H, W) in [0, 1] → (B, C, D, H, W) in [0, 1]; unselected samples are returned unchanged.
    """
    _check_cube(x)
    b = x.shape[0]
    apply = _uniform((b,), generator=generator, device=x.device) < prob
    cp = _uniform((b, 2, 2), generator=generator, device=x.device, dtype=torch.float64)
    rev = _uniform((b,), generator=generator, device=x.device) < reverse_prob
    out = apply_lut(x, bezier_lut(cp, n, reverse=rev))
    return torch.where(_bcast(apply), out, x)


# ----------------------------------------------------------------------------------------------------------------
# in- and out-painting


def _draw_boxes(
    b: int,
    spatial: Sequence[int],
    *,
    side_lo: Sequence[int],
    side_hi: Sequence[int],
    min_boxes: int,
    max_boxes: int,
    continue_prob: float,
    margin: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes per sample: starts (B, N, 3), sides (B, N, 3) in [side_lo, side_hi], active (B, N) bool, N = max_boxes.

    The first ``min_boxes`` boxes are always active; box i ≥ min_boxes is active while every draw
    ``rand < continue_prob`` up to it succeeded. Starts are in [m, size − side − m] with m = min(margin,
    ⌊(size − side) / 2⌋) (the release keeps boxes ``margin`` = 3 voxels off the border).
    """
    u = _uniform((b, max_boxes), generator=generator, device=device)
    cont = (u < continue_prob) | (torch.arange(max_boxes, device=device) < min_boxes)
    active = cont.long().cumprod(dim=1).bool()
    lo = torch.tensor(list(side_lo), device=device)
    hi = torch.tensor(list(side_hi), device=device)
    sides = _randint(lo, hi, shape=(b, max_boxes, 3), generator=generator, device=device)
    free = torch.tensor(list(spatial), device=device) - sides
    m = torch.minimum(torch.full_like(free, margin), free // 2)
    starts = _randint(m, free - m, shape=(b, max_boxes, 3), generator=generator, device=device)
    return starts, sides, active


def box_mask(starts: torch.Tensor, sides: torch.Tensor, active: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Union of the active boxes: starts, sides (B, N, 3), active (B, N) → (B, 1, D, H, W) bool."""
    axes = []
    for a, size in enumerate(spatial):
        r = torch.arange(size, device=starts.device)
        axes.append((r >= starts[..., a, None]) & (r < (starts[..., a] + sides[..., a])[..., None]))  # (B, N, size)
    inside = axes[0][..., :, None, None] & axes[1][..., None, :, None] & axes[2][..., None, None, :]
    return (inside & active[..., None, None, None]).any(dim=1, keepdim=True)


def _paint_boxes(
    x: torch.Tensor,
    *,
    side_lo: list[int],
    side_hi: list[int],
    min_boxes: int,
    max_boxes: int,
    continue_prob: float,
    margin: int,
    noise_inside: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw boxes per sample and fill with U[0, 1) noise inside them (in-painting) or outside them
    (out-painting); returns (painted cube, boxes' union mask (B, 1, D, H, W))."""
    b, _, *spatial = x.shape
    starts, sides, active = _draw_boxes(
        b,
        spatial,
        side_lo=side_lo,
        side_hi=side_hi,
        min_boxes=min_boxes,
        max_boxes=max_boxes,
        continue_prob=continue_prob,
        margin=margin,
        generator=generator,
        device=x.device,
    )
    mask = box_mask(starts, sides, active, spatial)
    noise = _uniform(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (torch.where(mask, noise, x) if noise_inside else torch.where(mask, x, noise)), mask


def inpaint(
    x: torch.Tensor,
    *,
    min_boxes: int = 0,
    max_boxes: int = 5,
    continue_prob: float = 0.95,
    min_frac: float = 1 / 6,
    max_frac: float = 1 / 3,
    margin: int = 3,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Models Genesis in-painting: per sample, boxes are added while ``rand < continue_prob`` (after the first
    ``min_boxes``; at most ``max_boxes``), each with sides in [⌊min_frac·size⌋, ⌊max_frac·size⌋] per axis, and
    filled with U[0, 1) noise (all channels).

    x: (B, C, D, H, W) → (painted (B, C, D, H, W), mask (B, 1, D, H, W) bool of the boxes' union). Outside the
    mask the cube is unchanged.
    """
    _check_cube(x)
    spatial = list(x.shape[2:])
    lo = [max(1, int(min_frac * s + 1e-9)) for s in spatial]
    hi = [max(low, int(max_frac * s + 1e-9)) for low, s in zip(lo, spatial)]
    kw = dict(min_boxes=min_boxes, max_boxes=max_boxes, continue_prob=continue_prob, margin=margin)
    return _paint_boxes(x, side_lo=lo, side_hi=hi, noise_inside=True, generator=generator, **kw)


def outpaint(
    x: torch.Tensor,
    *,
    min_boxes: int = 1,
    max_boxes: int = 5,
    continue_prob: float = 0.95,
    margin: int = 3,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Models Genesis out-painting: the cube is replaced by U[0, 1) noise except inside the kept boxes: the first
    ``min_boxes`` always, more while ``rand < continue_prob`` (at most ``max_boxes``), with side
    ``size − randint(⌊3·size/7⌋, ⌊4·size/7⌋)`` on each axis.

    x: (B, C, D, H, W) → (painted (B, C, D, H, W), mask (B, 1, D, H, W) bool of the kept region). Inside the
    mask the cube equals the input.
    """
    _check_cube(x)
    spatial = list(x.shape[2:])
    lo = [max(1, s - 4 * s // 7) for s in spatial]
    hi = [max(low, s - 3 * s // 7) for low, s in zip(lo, spatial)]
    kw = dict(min_boxes=min_boxes, max_boxes=max_boxes, continue_prob=continue_prob, margin=margin)
    return _paint_boxes(x, side_lo=lo, side_hi=hi, noise_inside=False, generator=generator, **kw)


def painting(
    x: torch.Tensor, *, prob: float = 0.9, outpaint_rate: float = 0.8, generator: torch.Generator
) -> torch.Tensor:
    """Per sample: with probability ``prob`` paint — out-paint with probability ``outpaint_rate``, else in-paint.

    x: (B, C, D, H, W) → (B, C, D, H, W).
    """
    _check_cube(x)
    u = _uniform((x.shape[0], 2), generator=generator, device=x.device)
    paint = u[:, 0] < prob
    out_sel = paint & (u[:, 1] < outpaint_rate)
    in_sel = paint & ~out_sel
    out = x.clone()
    if out_sel.any():
        out[out_sel] = outpaint(x[out_sel], generator=generator)[0]
    if in_sel.any():
        out[in_sel] = inpaint(x[in_sel], generator=generator)[0]
    return out


# ----------------------------------------------------------------------------------------------------------------
# elastic deformation


def gaussian_kernel1d(
    sigma: float, *, truncate: float = 4.0, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """Normalised Gaussian taps on [−r, r], r = ⌊truncate·sigma + 0.5⌋ (scipy's ``gaussian_filter`` extent)."""
    r = int(truncate * sigma + 0.5)
    k = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (k / sigma) ** 2)
    return (g / g.sum()).to(dtype)


def _smooth3d(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing with zero padding (scipy ``mode="constant"``): (N, D, H, W) → (N, D, H, W).

    Each 1D convolution is a matmul with the axis' banded (Toeplitz) convolution matrix, which on CPUs is an
    order of magnitude faster than ``conv1d`` with a 65-tap kernel and gives the same result.
    """
    g = gaussian_kernel1d(sigma, dtype=field.dtype, device=field.device)
    r = (g.numel() - 1) // 2
    out = field
    for dim in (1, 2, 3):
        size = field.shape[dim]
        i = torch.arange(size, device=field.device)
        lag = i[None, :] - i[:, None] + r  # conv[i, j] = g[j − i + r] where |j − i| ≤ r
        conv = torch.where((lag >= 0) & (lag <= 2 * r), g[lag.clamp(0, 2 * r)], torch.zeros((), dtype=g.dtype))
        out = (out.movedim(dim, -1) @ conv.T).movedim(-1, dim)
    return out


def elastic_displacement(
    shape: Sequence[int],
    *,
    alpha: float = 991.0,
    sigma: float = 8.0,
    generator: torch.Generator,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """In-plane displacement field of Semantic Genesis's elastic deformation, in voxels.

    shape: (B, D, H, W) → (B, 2, D, H, W): channel 0 moves rows (H), channel 1 columns (W); depth has no
    component. Each channel is, like the release's ``dx`` and ``dy`` (``purturbation.py`` lines 86–87), U[−1, 1]
    per voxel over the whole (D, H, W) grid, smoothed by a 3-D Gaussian of std ``sigma`` voxels (zero padding,
    truncated at 4σ: scipy's ``gaussian_filter(..., mode="constant", cval=0)``), times ``alpha``.
    """
    b, d, h, w = (int(s) for s in shape)
    device = device if device is not None else generator.device
    field = _uniform((b * 2, d, h, w), generator=generator, device=device, dtype=dtype) * 2 - 1
    if sigma > 0:
        field = _smooth3d(field, sigma)
    return (field * alpha).view(b, 2, d, h, w)


def warp_inplane(x: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Resample every depth slice at in-plane positions ``(h + dh, w + dw)``: bilinear, mirrored about the outer
    voxel edges outside the slice (scipy's ``map_coordinates(..., order=1, mode="reflect")``), depth untouched.

    x: (B, C, D, H, W); displacement: (B, 2, D, H, W) (rows, cols) in voxels → (B, C, D, H, W). Slice ``z`` of the
    output reads slice ``z`` of the input only.
    """
    _check_cube(x)
    b, c, d, h, w = x.shape
    if displacement.shape != (b, 2, d, h, w):
        raise ValueError(f"expected a displacement of shape {(b, 2, d, h, w)}, got {tuple(displacement.shape)}")
    disp = displacement.to(device=x.device, dtype=x.dtype)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1) + disp[:, 0]  # (B, D, H, W)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w) + disp[:, 1]
    # grid_sample's normalised coordinates with align_corners=False: −1 and 1 are the outer edges of the end voxels
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], dim=-1).view(b * d, h, w, 2)
    slices = x.transpose(1, 2).reshape(b * d, c, h, w)
    out = F.grid_sample(slices, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.view(b, d, c, h, w).transpose(1, 2).contiguous()


def elastic(x: torch.Tensor, *, alpha: float = 991.0, sigma: float = 8.0, generator: torch.Generator) -> torch.Tensor:
    """Semantic Genesis's elastic deformation (Simard et al. 2003), in-plane only, as the SG/TransVW releases'
    ``elastic_transform`` (``pytorch/utils/purturbation.py`` lines 79–93: ``map_coordinates`` reads at
    ``(y + dy, x + dx, z)``): rows and columns are displaced by smooth random fields (:func:`elastic_displacement`),
    depth never; resampled bilinearly slice by slice with mirrored borders (:func:`warp_inplane`).

    x: (B, C, D, H, W) → (B, C, D, H, W); values stay within the input's range (convex combinations).
    ``alpha = 0`` is the identity up to interpolation rounding.

    Size: the release's ``alpha = 991, sigma = 8`` (these defaults; the ``full`` preset) are for 64×64×32 cubes of
    ~1 mm CT; they displace by 4.6 voxels RMS in-plane (3.2 per axis) there. The miniature's 32×32×16 phantom
    cubes have vessel radii under 2 voxels, so its config uses ``alpha = 40, sigma = 4`` (σ scaled with the cube):
    0.53 voxels RMS in-plane displacement (0.37 per axis), measured over 512 draws on a 32×32×16 cube, border
    voxels included (the zero-padded smoothing shrinks the field near the faces). The release's values on that
    cube would give 3.9 voxels RMS (2.8 per axis).
    """
    _check_cube(x)
    b, _, d, h, w = x.shape
    disp = elastic_displacement(
        (b, d, h, w), alpha=alpha, sigma=sigma, generator=generator, device=x.device, dtype=x.dtype
    )
    return warp_inplane(x, disp)


# ----------------------------------------------------------------------------------------------------------------
# pipelines


def models_genesis(
    x: torch.Tensor, *, generator: torch.Generator, probs: MGProbs | None = None
) -> dict[str, torch.Tensor]:
    """Models Genesis input/target pair (also the restoration branch of TransVW).

    x: (B, C, D, H, W) in [0, 1] → ``{"input", "target"}``, both (B, C, D, H, W) in [0, 1]: target is the flipped
    cube; input is the flipped cube after local shuffle → Bézier intensity → painting (each with its probability).
    """
    probs = probs or MGProbs()
    inp, target = flip(x, x, prob=probs.flip, generator=generator)
    inp = local_shuffle(inp, prob=probs.shuffle, generator=generator)[0]
    inp = nonlinear(inp, prob=probs.nonlinear, generator=generator)
    inp = painting(inp, prob=probs.paint, outpaint_rate=probs.outpaint_rate, generator=generator)
    return {"input": inp, "target": target}


def semantic_genesis(
    x: torch.Tensor,
    *,
    generator: torch.Generator,
    probs: SGProbs | None = None,
    shuffle_windows: int = 5,
    alpha: float = 991.0,
    sigma: float = 8.0,
) -> dict[str, torch.Tensor]:
    """Semantic Genesis self-restoration pair: elastic deformation of the input, then exactly one perturbation per
    sample, drawn with ``probs``: 0 local shuffle (``shuffle_windows`` windows), 1 Bézier intensity, 2 in-painting
    with one box, 3 out-painting with one kept box.

    x: (B, C, D, H, W) in [0, 1] → ``{"input": (B, C, D, H, W), "target": x (the undeformed cube, a copy),
    "choice": (B,) int64 in 0..3}``.
    """
    probs = probs or SGProbs()
    deformed = elastic(x, alpha=alpha, sigma=sigma, generator=generator)
    u = _uniform((x.shape[0],), generator=generator, device=x.device, dtype=torch.float64)
    cdf = probs.as_tensor().cumsum(0).to(x.device)
    choice = torch.searchsorted(cdf, u, right=True).clamp_max(3)
    ops = (
        lambda v: local_shuffle(v, prob=1.0, num_windows=shuffle_windows, generator=generator)[0],
        lambda v: nonlinear(v, prob=1.0, generator=generator),
        lambda v: inpaint(v, min_boxes=1, max_boxes=1, generator=generator)[0],
        lambda v: outpaint(v, min_boxes=1, max_boxes=1, generator=generator)[0],
    )
    inp = deformed.clone()
    for k, op in enumerate(ops):
        sel = choice == k
        if sel.any():
            inp[sel] = op(deformed[sel])
    return {"input": inp, "target": x.clone(), "choice": choice}
