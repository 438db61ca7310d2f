"""A procedural, seeded dermoscopy cartoon with exact lesion masks and three diagnoses, for the MT-TransUNet recipe.

MT-TransUNet (Chen et al., "MT-TransUNet: Mediating Multi-Task Tokens in Transformers for Skin Lesion Segmentation
and Classification", arXiv 2112.01767) trains one Transformer to segment a skin lesion and to classify it as
melanoma, seborrheic keratosis or nevus (ISIC-2017), with a dual-task consistency between the segmentation and a
signed-distance-map head taken from DTC (Luo, Chen, Song and Wang, "Semi-supervised Medical Image Segmentation
through Dual-task Consistency", AAAI 2021), which lets images without a mask contribute. ISIC-2017 and PH2 cannot
ship with this package, so this module draws a dermoscopy-like image per lesion from a seeded generator, together
with its exact binary mask, its class and the parameters it was drawn with; :func:`normalised_sdf` turns masks
into DTC's ground-truth signed distance maps.

Geometry. Lengths are fractions of the image side, so ``size`` changes resolution, not content; pixel-scale
widths (edge fade, dots, hairs) are given at 64² and scale with ``size``. The outline is the polar curve

    r(θ) = r0 · (1 + Σ_{k=1..8} a_k cos(kθ + φ_k))

around a centre; the mask is exactly the set of pixels (centres) whose distance from the centre is below r(θ) at
their angle. ``asymmetry`` is Σ_{k≤4} |a_k| (low orders: egg shapes, lobes) and ``border_irregularity`` is
Σ_{k≥5} |a_k| (notches); the weights among the orders and the phases are random. The centre is pushed off the
image centre by ``off_centre`` in a random direction, then clamped so that the whole outline stays at least 1.5 px
(at 64²) inside the image whenever it fits, so masks rarely touch the border.

Classes (:data:`CLASSES`, ISIC-2017 order; drawn with ``LesionSpec.class_probs``) follow ABC-style rules with
overlapping ranges, so that no single cue (and not all of them together) decides the class:

- nevus (majority): near-symmetric (small low-order a_k), smooth border (tiny high-order a_k), one uniform brown,
  smaller and centred; its edge fades softly into the skin;
- seborrheic keratosis: moderate asymmetry and irregularity, a sharply demarcated edge (no fade), a waxy tan
  colour with a mottled texture, bright milia-like dots and dark crypts (comedo-like openings);
- melanoma: asymmetric and off-centre, a notched high-frequency border, several colours (a secondary brown, a
  black blotch, a blue-grey veil and sometimes red), larger on average; its edge fades softly into the skin.

Every class-dependent quantity (a range's ends, or a probability such as "has a blue-grey veil") is pulled
linearly towards its unweighted mean over the three classes by ``LesionSpec.overlap``: 0 keeps the table in
:data:`_CLASS_TABLE` (well separated, though ranges already overlap a little), 1 makes all three classes draw
from one distribution, so the image carries no information about the label. ``num_colours`` counts the base
colour plus each present secondary brown, black, blue-grey and red region (milia and crypts are structures, not
colours); it is at least 3 for most melanomas and 1 for most nevi at the default overlap. The edge fade is
appearance only: the soft alpha is a sigmoid of the radial distance to the outline, so it crosses 1/2 exactly on
the outline and the mask stays exact.

Rendering (reflectance times illumination, in [0, 1] RGB): skin of a per-image tone and hue around the domain's
mean, with a smooth texture; the lesion blended over it with opacity ``contrast`` × its edge alpha; a smooth
low-frequency illumination field plus a linear gradient, the domain's white balance and a radial vignette (the
dermatoscope's field of view); optional hairs (thin dark curved lines over lesion and skin, not in the mask);
additive Gaussian pixel noise; clip; uint8.

Domains (:data:`DOMAINS`): ``"isic"`` is the in-domain look (tan skin, mild illumination); ``"ph2"`` is a shifted
look (lighter, pinker skin, a cooler white balance, a stronger vignette and a steeper illumination gradient). The
class rules and the masks are identical across domains: the same seed and spec give the same labels, masks and
shape parameters in both, only the appearance changes.

Determinism: image ``i`` of ``seed`` is a pure function of (seed, i, size, domain, spec), drawn from its own
``numpy.random.SeedSequence([seed, i])`` spawned into streams for the label, the shape, the lesion's appearance,
the skin, the hairs and the pixel noise; each stream draws a fixed number of values whatever the knobs, so
``generate(10, seed=s)`` starts with ``generate(5, seed=s)``, and changing, say, ``hair_prob`` changes only hairs.

What it does not model: real dermoscopic structures (pigment network, globules, streaks, regression structures,
vessels, ulceration), other diagnoses (basal cell carcinoma, vascular lesions, ...), lesion evolution, scale
markers, ink, gel bubbles, rulers, specular glare, the dermatoscope's black circular frame, JPEG artefacts,
inter-annotator disagreement or label noise (every mask and label is exact), and any statistic of the real ISIC
or PH2 images. It is a test bed with the structure of the MT-TransUNet task, not a substitute for real data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

CLASSES: tuple[str, ...] = ("melanoma", "seborrheic_keratosis", "nevus")
REFERENCE_SIZE = 64  # pixel-scale widths are given at this size and scale with ``size``

_STREAMS = ("label", "shape", "lesion", "skin", "hair", "noise")
_N_ORDERS = 8  # harmonics of the outline
_N_DOTS = 12  # milia / crypt slots drawn per image (a fixed number, so streams stay aligned)
_N_HAIR_PTS = 160  # points per hair polyline

# Class table: per quantity, the value for (melanoma, seborrheic keratosis, nevus). Pairs are ranges drawn
# uniformly, scalars are probabilities. ``radius`` and ``offset`` are positions in [0, 1] within
# ``LesionSpec.radius_range`` and ``[0, LesionSpec.off_centre]``; ``tone`` is a position on the tan (0) - brown
# (0.5) - dark brown (1) axis; ``blur`` is the edge fade width in px at 64²; ``asym`` / ``irreg`` are Σ|a_k| over
# the low / high orders; ``wax`` is the amplitude of the lesion's internal mottling.
_CLASS_TABLE: dict[str, tuple] = {
    "radius": ((0.45, 1.0), (0.25, 0.8), (0.0, 0.55)),
    "offset": ((0.4, 1.0), (0.0, 0.6), (0.0, 0.4)),
    "asym": ((0.16, 0.32), (0.08, 0.20), (0.02, 0.10)),
    "irreg": ((0.10, 0.22), (0.03, 0.09), (0.0, 0.04)),
    "blur": ((0.8, 2.2), (0.0, 0.3), (1.0, 2.2)),
    "tone": ((0.4, 0.9), (0.0, 0.35), (0.35, 0.75)),
    "wax": ((0.04, 0.10), (0.12, 0.25), (0.0, 0.03)),
    "p_secondary": (0.9, 0.3, 0.1),
    "p_black": (0.95, 0.05, 0.03),
    "p_veil": (0.9, 0.03, 0.02),
    "p_red": (0.35, 0.05, 0.02),
    "p_milia": (0.05, 0.9, 0.05),
    "p_crypts": (0.05, 0.85, 0.05),
}

_TAN = np.array([0.78, 0.62, 0.42])
_BROWN = np.array([0.50, 0.32, 0.20])
_DARK_BROWN = np.array([0.28, 0.17, 0.10])
_BLACK = np.array([0.09, 0.07, 0.07])
_BLUE_GREY = np.array([0.42, 0.48, 0.58])
_RED = np.array([0.72, 0.34, 0.34])
_MILIA = np.array([0.96, 0.93, 0.82])
_CRYPT = np.array([0.20, 0.14, 0.10])
_HAIR = np.array([0.12, 0.09, 0.07])
_REDNESS = np.array([0.7, -0.55, -0.45])  # skin hue axes (unit length): pinker / yellower
_YELLOWNESS = np.array([0.45, 0.45, -0.77])


@dataclasses.dataclass(frozen=True)
class LesionSpec:
    """Difficulty knobs of the generator (all defaults give the recipe's miniature task).

    Attributes:
        class_probs: probabilities of (melanoma, seborrheic keratosis, nevus); non-negative, summing to 1.
        overlap: in [0, 1]; pulls every class-dependent range and probability towards the classes' mean
            (0 = well separated, 1 = classes indistinguishable from the image).
        radius_range: (low, high) of the base radius r0 as a fraction of the image side, 0 < low <= high <= 0.4;
            nevi use the lower part of the range, melanomas the upper part.
        off_centre: largest distance of the lesion centre from the image centre, fraction of the side, in
            [0, 0.3] (melanomas use the upper part of the range, nevi the lower part).
        contrast: lesion opacity over the skin, in [0, 1] (0 = invisible lesion).
        hair_prob: probability that an image has hairs, in [0, 1].
        max_hairs: most hairs on a hairy image (1 … max_hairs, uniform), an integer in [1, 12].
        noise_std: standard deviation of the additive pixel noise (image in [0, 1]), >= 0.
        illumination: amplitude of the smooth illumination field, in [0, 1).
        vignette: darkening at the image corners, in [0, 1).
        texture: amplitude of the skin texture, in [0, 0.5].
    """

    class_probs: tuple[float, float, float] = (0.2, 0.2, 0.6)
    overlap: float = 0.2
    radius_range: tuple[float, float] = (0.12, 0.30)
    off_centre: float = 0.12
    contrast: float = 0.85
    hair_prob: float = 0.3
    max_hairs: int = 6
    noise_std: float = 0.02
    illumination: float = 0.12
    vignette: float = 0.25
    texture: float = 0.05

    def __post_init__(self) -> None:
        probs = tuple(float(p) for p in self.class_probs)
        if len(probs) != len(CLASSES):
            raise ValueError(f"class_probs must have {len(CLASSES)} entries {CLASSES}, got {self.class_probs!r}")
        if not all(math.isfinite(p) and p >= 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"class_probs must be non-negative and sum to 1, got {self.class_probs!r}")
        object.__setattr__(self, "class_probs", probs)
        if len(tuple(self.radius_range)) != 2:
            raise ValueError(f"radius_range must be a (low, high) pair, got {self.radius_range!r}")
        lo, hi = (float(v) for v in self.radius_range)
        if not (0 < lo <= hi <= 0.4):
            raise ValueError(f"radius_range must satisfy 0 < low <= high <= 0.4, got {self.radius_range!r}")
        object.__setattr__(self, "radius_range", (lo, hi))
        _check_range(self, "overlap", 0.0, 1.0)
        _check_range(self, "off_centre", 0.0, 0.3)
        _check_range(self, "contrast", 0.0, 1.0)
        _check_range(self, "hair_prob", 0.0, 1.0)
        _check_range(self, "noise_std", 0.0, math.inf)
        _check_range(self, "illumination", 0.0, 1.0, open_high=True)
        _check_range(self, "vignette", 0.0, 1.0, open_high=True)
        _check_range(self, "texture", 0.0, 0.5)
        if isinstance(self.max_hairs, bool) or int(self.max_hairs) != self.max_hairs or not 1 <= self.max_hairs <= 12:
            raise ValueError(f"max_hairs must be an integer in [1, 12], got {self.max_hairs!r}")
        object.__setattr__(self, "max_hairs", int(self.max_hairs))

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, object] | None) -> LesionSpec:
        """The default spec with ``overrides`` applied (e.g. from a config); lists become tuples.

        Raises:
            ValueError: on an unknown key (the message names it and the valid ones) or an invalid value.
        """
        overrides = dict(overrides or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown LesionSpec key(s) {unknown}; valid keys: {', '.join(valid)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def _check_range(spec: LesionSpec, name: str, low: float, high: float, *, open_high: bool = False) -> None:
    value = getattr(spec, name)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and low <= v and (v < high if open_high else v <= high)
    if not ok:
        bound = f"[{low:g}, {high:g})" if open_high else f"[{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    object.__setattr__(spec, name, v)


@dataclasses.dataclass(frozen=True)
class Domain:
    """Acquisition look: how a clinic's dermatoscope and patients render the same lesions.

    Attributes:
        name: label of the domain.
        skin: mean skin reflectance (R, G, B) in [0, 1].
        tone_jitter: per-image lightness jitter of the skin (std of a common multiplicative factor).
        hue_jitter: per-image jitter of the skin colour along a pinker and a yellower axis (std), plus a third of
            that in grey.
        white_balance: per-channel gains (R, G, B) applied to the whole image.
        gradient: amplitude of the linear illumination gradient across the image (random direction).
        illumination_gain: multiplies ``LesionSpec.illumination``.
        vignette_gain: multiplies ``LesionSpec.vignette``.
    """

    name: str
    skin: tuple[float, float, float]
    tone_jitter: float
    hue_jitter: float
    white_balance: tuple[float, float, float]
    gradient: float
    illumination_gain: float
    vignette_gain: float


DOMAINS: dict[str, Domain] = {
    "isic": Domain(
        "isic",
        skin=(0.80, 0.62, 0.52),
        tone_jitter=0.06,
        hue_jitter=0.025,
        white_balance=(1.0, 1.0, 1.0),
        gradient=0.06,
        illumination_gain=1.0,
        vignette_gain=1.0,
    ),
    "ph2": Domain(
        "ph2",
        skin=(0.92, 0.70, 0.70),
        tone_jitter=0.04,
        hue_jitter=0.02,
        white_balance=(0.96, 1.0, 1.08),
        gradient=0.14,
        illumination_gain=1.4,
        vignette_gain=1.6,
    ),
}


def generate(
    n: int,
    *,
    seed: int,
    size: int = 64,
    domain: str = "isic",
    spec: LesionSpec | None = None,
) -> dict[str, np.ndarray]:
    """Draw images ``0 … n-1`` of ``seed`` (see the module docstring for what each holds).

    Args:
        n: number of images, >= 0.
        seed: non-negative integer.
        size: image side in pixels, >= 16.
        domain: a key of :data:`DOMAINS`.
        spec: difficulty knobs; ``None`` means ``LesionSpec()``.

    Returns:
        ``images`` uint8 (n, size, size, 3) RGB; ``masks`` uint8 (n, size, size) in {0, 1}; ``labels`` int64 (n,)
        indices into :data:`CLASSES`; and float64 (n,) diagnostics: ``radius`` (r0, fraction of the side),
        ``asymmetry`` (Σ_{k≤4}|a_k|), ``border_irregularity`` (Σ_{k≥5}|a_k|), ``num_colours``, ``off_centre``
        (distance of the centre from the image centre, fraction of the side) and ``edge_blur`` (fade width, px
        at 64²; 0 = sharp).
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or int(size) != size or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    if spec is None:
        spec = LesionSpec()
    elif not isinstance(spec, LesionSpec):
        raise TypeError(f"spec must be a LesionSpec or None, got {type(spec).__name__}")
    n, seed, size = int(n), int(seed), int(size)
    dom = DOMAINS[domain]
    table = _class_table(spec.overlap)
    cum = np.cumsum(spec.class_probs)

    out: dict[str, np.ndarray] = {
        "images": np.empty((n, size, size, 3), np.uint8),
        "masks": np.empty((n, size, size), np.uint8),
        "labels": np.empty(n, np.int64),
    }
    keys = ("radius", "asymmetry", "border_irregularity", "num_colours", "off_centre", "edge_blur")
    for k in keys:
        out[k] = np.empty(n, np.float64)
    for i in range(n):
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, i]).spawn(len(_STREAMS))]
        rs = dict(zip(_STREAMS, streams))
        label = min(int(np.searchsorted(cum, rs["label"].random(), side="right")), len(CLASSES) - 1)
        image, mask, params = _render(rs, label, size, dom, spec, table)
        out["images"][i] = image
        out["masks"][i] = mask
        out["labels"][i] = label
        for k in keys:
            out[k][i] = params[k]
    return out


def normalised_sdf(masks: np.ndarray) -> np.ndarray:
    """DTC's normalised signed distance map of binary masks, (N, H, W) or (H, W), as float32 of the same shape.

    Follows DTC's ``compute_sdf`` (Luo et al., AAAI 2021): with ``d_in`` the Euclidean distance transform of the
    foreground (distance of a lesion pixel to the nearest background pixel, 0 outside) and ``d_out`` that of the
    background, ``sdf = (d_out - min d_out) / (max d_out - min d_out) - (d_in - min d_in) / (max d_in - min d_in)``,
    then ``sdf = 0`` on the inner boundary (foreground pixels with a background 4-neighbour; the image edge is not
    a boundary, as with ``skimage.segmentation.find_boundaries(mode="inner")``). So the map is negative inside,
    positive outside, exactly 0 on the boundary, and each side is min-max normalised separately: -1 at the lesion
    pixel(s) deepest inside (unless every lesion pixel is a boundary pixel) and +1 at the background pixel(s)
    farthest away. Hence ``sigmoid(-k * sdf) >= 0.5`` for large ``k`` recovers the mask. An empty mask and an
    all-foreground mask (where DTC would divide by zero) both give an all-zero map. Any non-zero value is
    foreground.
    """
    arr = np.asarray(masks)
    if arr.ndim not in (2, 3):
        raise ValueError(f"masks must be (H, W) or (N, H, W), got shape {arr.shape}")
    single = arr.ndim == 2
    fg_all = (arr != 0).reshape((1, *arr.shape) if single else arr.shape)
    out = np.zeros(fg_all.shape, np.float32)
    for b, fg in enumerate(fg_all):
        if not fg.any() or fg.all():
            continue
        d_in = ndimage.distance_transform_edt(fg)
        d_out = ndimage.distance_transform_edt(~fg)
        sdf = _minmax(d_out) - _minmax(d_in)
        pad = np.pad(fg, 1, mode="edge")
        all_fg_nbrs = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        sdf[fg & ~all_fg_nbrs] = 0.0
        out[b] = sdf
    return out[0] if single else out


def _minmax(d: np.ndarray) -> np.ndarray:
    lo, hi = d.min(), d.max()
    return (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)


# ----------------------------------------------------------------------------------------------------------------
# rendering


@functools.lru_cache(maxsize=4)
def _class_table(overlap: float) -> dict[str, np.ndarray]:
    """The class table pulled towards its per-quantity class mean: arrays (3,) for probabilities, (3, 2) ranges."""
    out = {}
    for key, values in _CLASS_TABLE.items():
        v = np.asarray(values, np.float64)
        out[key] = (1.0 - overlap) * v + overlap * v.mean(axis=0, keepdims=True)
    return out


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x: columns, y: rows) as fractions of the side, in (0, 1)."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@functools.lru_cache(maxsize=16)
def _interp(size: int, cells: int) -> np.ndarray:
    """(size, cells) Gaussian-RBF interpolation matrix: ``A @ N @ A.T`` turns a cells² lattice into a smooth field."""
    centres = np.linspace(-0.5 / cells, 1 + 0.5 / cells, cells)
    x = (np.arange(size) + 0.5) / size
    spacing = centres[1] - centres[0]
    a = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / spacing) ** 2)
    a /= np.sqrt((a**2).sum(axis=1, keepdims=True))  # unit-variance field for unit white lattice noise
    a.flags.writeable = False
    return a


def _smooth(rng: np.random.Generator, k: int, size: int, cells: int) -> np.ndarray:
    """``k`` smooth random fields (k, size, size) with about zero mean and unit standard deviation."""
    a = _interp(size, cells)
    return a @ rng.standard_normal((k, cells, cells)) @ a.T


@functools.lru_cache(maxsize=8)
def _angles() -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, 2 * np.pi, 256, endpoint=False)
    z = np.exp(1j * t)
    return t, z[None, :] ** np.arange(1, _N_ORDERS + 1)[:, None]


def _outline(r0: float, coef: np.ndarray, zk: np.ndarray) -> np.ndarray:
    """r(θ) = r0 (1 + Re Σ_k c_k z^k), with c_k = a_k e^{iφ_k} and z = e^{iθ}; ``zk`` holds z^k along axis 0."""
    return r0 * (1.0 + np.tensordot(coef, zk, axes=1).real)


def _splat(acc: np.ndarray, px: np.ndarray, py: np.ndarray, w: np.ndarray | float = 1.0) -> None:
    """Add ``w`` at sub-pixel positions (in pixels, centre of pixel j at j + 0.5) with bilinear weights."""
    size = acc.shape[0]
    fx, fy = px - 0.5, py - 0.5
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = fx - x0, fy - y0
    w = np.broadcast_to(np.asarray(w, np.float64), px.shape)
    for dx, dy, ww in ((0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)), (0, 1, (1 - tx) * ty), (1, 1, tx * ty)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        np.add.at(acc, (yi[ok], xi[ok]), (w * ww)[ok])


def _u(rng_value: float, lo_hi: np.ndarray) -> float:
    return float(lo_hi[0] + rng_value * (lo_hi[1] - lo_hi[0]))


def _render(
    rs: dict[str, np.random.Generator],
    label: int,
    size: int,
    dom: Domain,
    spec: LesionSpec,
    table: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    scale = size / REFERENCE_SIZE
    x, y = _grid(size)
    c = {k: v[label] for k, v in table.items()}

    # ---- shape (fixed draws: 5 uniforms, 2 x 8 Dirichlet-ish weights, 8 phases)
    rg = rs["shape"]
    u = rg.random(5)
    w_lo = rg.exponential(size=4)
    w_hi = rg.exponential(size=4) * np.array([1.0, 1.2, 1.4, 1.6])  # notches: weight the highest orders more
    phases = rg.uniform(0, 2 * np.pi, _N_ORDERS)
    lo_r, hi_r = spec.radius_range
    r0 = lo_r + _u(u[0], c["radius"]) * (hi_r - lo_r)
    asym = _u(u[1], c["asym"])
    irreg = _u(u[2], c["irreg"])
    amps = np.concatenate([asym * w_lo / w_lo.sum(), irreg * w_hi / w_hi.sum()])
    coef = amps * np.exp(1j * phases)
    t, zk = _angles()
    r_t = _outline(r0, coef, zk)
    # centre: pushed off by ``offset`` in a random direction, then clamped so that the outline fits
    offset = _u(u[3], c["offset"]) * spec.off_centre
    psi = 2 * np.pi * u[4]
    margin = 1.5 / REFERENCE_SIZE
    centre = []
    for v0, proj in ((0.5 + offset * math.cos(psi), r_t * np.cos(t)), (0.5 + offset * math.sin(psi), r_t * np.sin(t))):
        lo, hi = margin - proj.min(), 1 - margin - proj.max()
        centre.append(min(max(v0, lo), hi) if lo <= hi else 0.5 * (lo + hi))
    cx, cy = centre
    dx, dy = x - cx, y - cy
    rho = np.hypot(dx, dy)
    z = np.where(rho > 0, (dx + 1j * dy) / np.where(rho > 0, rho, 1.0), 1.0 + 0j)
    zpow = z.copy()
    acc = np.zeros_like(rho, dtype=np.complex128)
    for k in range(_N_ORDERS):
        acc += coef[k] * zpow
        zpow *= z
    r_pix = r0 * (1.0 + acc.real)
    dist_px = (rho - r_pix) * size  # radial signed distance to the outline, px (negative inside)
    mask = dist_px < 0

    # ---- lesion appearance (fixed draws)
    rl = rs["lesion"]
    ul = rl.random(12)
    fields = _smooth(rl, 4, size, 9)  # secondary, black, veil, red regions
    wax_field = _smooth(rl, 1, size, 14)[0]
    dots = rl.random((2, _N_DOTS, 2))  # (milia / crypts, slot, (angle, radius))
    blur = _u(ul[0], c["blur"])
    blur_px = blur * scale
    if blur < 0.05:
        blur = 0.0
        alpha = mask.astype(np.float64)
    else:
        alpha = 0.5 - 0.5 * np.tanh(dist_px / (2 * blur_px))  # sigmoid(-d / blur): 1/2 exactly on the outline
    tone = _u(ul[1], c["tone"])
    base = _TAN + (_BROWN - _TAN) * min(tone, 0.5) * 2 + (_DARK_BROWN - _BROWN) * max(tone - 0.5, 0.0) * 2
    wax = _u(ul[2], c["wax"])
    les = base[None, None, :] * (1.0 + wax * wax_field)[..., None]
    has = [ul[3] < c["p_secondary"], ul[4] < c["p_black"], ul[5] < c["p_veil"], ul[6] < c["p_red"]]
    secondary = _DARK_BROWN if tone < 0.5 else _TAN * 0.9
    colours = (secondary, _BLACK, _BLUE_GREY, _RED)
    thresholds = (0.0, 0.6, 0.2, 0.8)  # region of field > threshold (about 50 %, 27 %, 42 %, 21 % of the image)
    strengths = (0.9, 0.95, 0.7, 0.6)  # the veil is semi-transparent
    for present, col, thr, s, field in zip(has, colours, thresholds, strengths, fields):
        if present:
            a = s * (0.5 + 0.5 * np.tanh((field - thr) / 0.2))
            les += a[..., None] * (col - les)
    num_colours = 1 + sum(bool(h) for h in has)
    # milia (bright) and crypts (dark), inside the outline
    for kind, (p_key, col, n_key) in enumerate((("p_milia", _MILIA, 7), ("p_crypts", _CRYPT, 8))):
        if ul[kind + 9] >= c[p_key]:
            continue
        count = 3 + int(ul[n_key] * (_N_DOTS - 2))
        ang, rad = dots[kind, :count, 0] * 2 * np.pi, np.sqrt(dots[kind, :count, 1]) * 0.8
        r_ang = r0 * (1.0 + (coef[None, :] * np.exp(1j * np.outer(ang, np.arange(1, _N_ORDERS + 1)))).sum(1).real)
        px = (cx + rad * r_ang * np.cos(ang)) * size
        py = (cy + rad * r_ang * np.sin(ang)) * size
        spots = np.zeros((size, size))
        _splat(spots, px, py)
        sigma = 0.7 * scale
        spots = np.clip(ndimage.gaussian_filter(spots, sigma) * (2 * np.pi * sigma**2) * 1.3, 0.0, 1.0)
        les += spots[..., None] * (col - les)

    # ---- skin, illumination, vignette (fixed draws)
    rk = rs["skin"]
    us = rk.standard_normal(4)
    ang_g = rk.uniform(0, 2 * np.pi)
    tex = _smooth(rk, 1, size, 22)[0]
    illum_field = _smooth(rk, 1, size, 3)[0]
    hue = us[1] * _REDNESS + us[2] * _YELLOWNESS + 0.3 * us[3] * np.ones(3) / math.sqrt(3)
    skin = np.asarray(dom.skin) * (1.0 + dom.tone_jitter * us[0]) + dom.hue_jitter * hue
    skin = np.clip(skin, 0.05, 1.0)
    refl = skin[None, None, :] * (1.0 + spec.texture * tex)[..., None]
    a_les = (spec.contrast * alpha)[..., None]
    refl += a_les * (np.clip(les, 0.0, 1.0) - refl)
    illum = 1.0 + spec.illumination * dom.illumination_gain * illum_field
    illum += dom.gradient * ((x - 0.5) * math.cos(ang_g) + (y - 0.5) * math.sin(ang_g)) * 2
    rad2 = ((x - 0.5) ** 2 + (y - 0.5) ** 2) * 2  # 1 at the corners
    illum *= 1.0 - min(spec.vignette * dom.vignette_gain, 0.95) * rad2**2
    img = refl * (illum[..., None] * np.asarray(dom.white_balance))

    # ---- hairs (fixed draws: a curved polyline per slot)
    rh = rs["hair"]
    uh = rh.random(2)
    hp = rh.random((spec.max_hairs, 6))
    if uh[0] < spec.hair_prob:
        count = 1 + int(uh[1] * spec.max_hairs)
        acc_h = np.zeros((size, size))
        s = np.linspace(-0.5, 0.5, _N_HAIR_PTS)
        for h in hp[:count]:
            x0, y0, th0 = h[0], h[1], h[2] * 2 * np.pi
            length, curv = 0.4 + 0.8 * h[3], (h[4] - 0.5) * 6.0
            th = th0 + curv * s * length
            ds = length / (_N_HAIR_PTS - 1)
            px = (x0 + np.cumsum(np.cos(th)) * ds - 0.5 * length * math.cos(th0)) * size
            py = (y0 + np.cumsum(np.sin(th)) * ds - 0.5 * length * math.sin(th0)) * size
            _splat(acc_h, px, py, (0.5 + 0.5 * h[5]) * size * ds)  # about one unit of ink per pixel of length
        a_h = np.clip(acc_h, 0.0, 1.0)[..., None]
        img += a_h * (_HAIR * illum[..., None] - img)

    # ---- pixel noise
    noise = rs["noise"].standard_normal(img.shape)
    img = np.clip(img + spec.noise_std * noise, 0.0, 1.0)
    image = np.rint(img * 255.0).astype(np.uint8)
    params = {
        "radius": r0,
        "asymmetry": asym,
        "border_irregularity": irreg,
        "num_colours": float(num_colours),
        "off_centre": math.hypot(cx - 0.5, cy - 0.5),
        "edge_blur": blur,
    }
    return image, mask.astype(np.uint8), params
