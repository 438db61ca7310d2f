"""A procedural, seeded chest-radiograph cartoon with seven findings, for the "Data, assemble" recipe.

Label-Assemble ("Data, Assemble"; Kang, Lu, Yuille and Zhou, arXiv 2109.12265, ISBI 2023) trains one classifier
on several chest X-ray sources whose label sets are disjoint: a small target source labels only the class of
interest, an assembled source labels other findings and comes from another scanner. Real radiographs (NIH
ChestX-ray14, CheXpert, COVIDx) cannot ship with this package, so this module draws a frontal (PA) radiograph
cartoon per "patient" from a seeded generator, with a multi-label finding vector, one mask per finding and an
acquisition *domain* that renders the same anatomy the way a given source's scanner would.

Geometry. Anatomy is defined in a canonical frame, x to the image's right and y downwards, both spanning
[-1, 1] over the image; lengths are fractions of the field of view, so ``size`` changes resolution, not anatomy.
In a PA view the patient's left is on the image's right, so the heart bulges to the image's right. Every image
is the canonical anatomy under a pose (rotation ±5°, scale 0.92–1.08, shift ±1.5 % of the field of view): the
pose is applied once, by evaluating every shape on the inversely transformed pixel grid, which is an affine
resample of the continuous image without interpolation blur; the masks are evaluated on the same grid, so they
move with the image. Edges are soft (about half a pixel) so that small structures are not jagged.

What is modelled, per image (shapes, sizes and intensities all vary, the layout never does):

- a dark background around a bright soft-tissue silhouette (thicker, so brighter, in the middle) with shoulders
  and a neck, a bright spine / mediastinum column and a dark trachea down to the carina;
- two dark lung fields, rounded and medially tilted at the apices, closed at the bottom by diaphragm domes (the
  right hemidiaphragm, on the image's left, higher) with sharp costophrenic angles; the abdomen below is bright
  and a gastric air bubble sits under the left dome in most images;
- the heart, two half-ellipses joined at a vertical line near the midline (the larger on the image's right),
  sheared so that its apex sits low on the right; it cuts the lungs and merges with the abdomen below;
- five to seven faint posterior rib arcs per side (bright bands, peak mid-hemithorax, falling laterally) and two
  clavicles over the apices;
- lung markings: radial, branching, vessel-like ridges of noise drawn in polar coordinates around each hilum,
  fading towards the periphery, plus a fine parenchymal texture.

Findings (column order of :data:`FINDINGS`; each has a random size and opacity, so some positives are subtle):

- ``nodule`` (8 %): a round opacity of radius 2–4 px at 64² somewhere inside one lung;
- ``effusion`` (12 %): basal fluid in one or both costophrenic angles, its upper border a meniscus rising
  laterally; from a blunted angle to a third of the lung; it hides that hemidiaphragm;
- ``cardiomegaly`` (20 %): the label *is* the rule cardiothoracic ratio > 0.5, where the ratio is the heart's
  widest span over the internal thoracic width (between the lungs' lateral margins at their widest) in the
  canonical frame; normals draw a ratio in 0.38–0.49, cardiomegaly in 0.51–0.62; its mask is the heart;
- ``pneumothorax`` (4 %): in one lung, an apical-lateral crescent of air, 2–5 px thick at 64² (darker, no lung
  markings and no parenchymal texture) outside a thin bright visceral pleural line; its mask is the crescent;
- ``consolidation`` (10 %): a dense, lobulated, focal opacity (a thresholded blob of smooth noise) in one lung;
  ``consolidation="lobar"`` draws it 1.5× larger, from ground-glass faint to dense
  (:data:`LOBAR_CONSOLIDATION_OPACITY`), with the target haze's patchy texture; ``consolidation="peripheral"``
  draws the target's own pattern (peripheral patchy haze, more at the base) in one lung only, at the
  consolidation's strength: a unilateral look-alike of the target, as bacterial pneumonia is of COVID-19's
  bilateral peripheral ground glass on real films (the release assembles ChestX-ray14's *Pneumonia* images with
  COVIDx: the "negative examples" of the paper);
- ``atelectasis`` (4 %): a plate-like band (1–4 px) widening laterally into a wedge across a lower lung, plus
  volume loss: that side's hemidiaphragm rises a little (the only finding that changes the anatomy);
- ``ground_glass`` (6 %, the rare target, :data:`TARGET`): bilateral, peripheral, faint haze, a low-frequency
  patchy opacity added to the outer part of both lungs (more at the bases) through which the lung markings stay
  visible; its mask is the peripheral lung region it covers, in both lungs.

Labels are independent Bernoulli draws with the given prevalences (:data:`DEFAULT_PREVALENCE`, overridable per
finding). The difficulty knob is ``strength``: a per-finding multiplier of visibility (default 1) applied to the
finding's opacity or contrast (for cardiomegaly, to the ratio's distance from the 0.5 threshold, so the label
rule still holds); the target's opacity is ``strength["ground_glass"]`` times a per-image factor in 0.2–1.0
(at most +0.14 before the domain styling, on lungs at about 0.2), so the faintest positives are close to
invisible. At strength 1 no single pixel and not the global mean intensity solves the target (AUC about 0.75
and 0.6 on 1,500 images): per-image exposure, lung density and gamma jitter and the other opacities (effusion,
consolidation, atelectasis, nodules) also raise lung intensity, while the haze's signature is its bilateral
peripheral pattern. A small CNN reaches a target AUC of about 0.84 from 60 labelled images (15 positive) and
about 0.98 from 2,000 (half positive).

Acquisition domains (:data:`DOMAINS`) are applied last, in this order: a per-image gamma drawn from the
domain's range, contrast about 0.5, brightness offset, Gaussian blur (``blur_sigma`` in pixels at 64², scaled
with ``size``), additive Gaussian noise, clip to [0, 1]. Domain ``"A"`` is the target hospital (mild); ``"B"``
is the assembled source's scanner (flatter, brighter and blurrier, with A's noise).

Determinism: image ``i`` of ``seed`` is a pure function of (seed, i, domain, size, prevalence, strength). It has
its own ``numpy.random.SeedSequence([seed, i])`` (the seed ``numpy.random.default_rng([seed, i])`` would use),
spawned into independent streams for the labels, the pose, the anatomy, the texture, the domain and each
finding. Hence ``generate(10, seed=s).subset(range(5))`` equals ``generate(5, seed=s)``, and changing a
prevalence or a strength changes only what it must: the same seed with prevalence 1 instead of 0 for a finding
draws the same patient, pose, texture and noise, with the finding added (atelectasis also raises a diaphragm,
cardiomegaly enlarges the heart). Patient ids are ``seed * 1_000_000 + i``.

What it does not model: real anatomy or its statistics (no patient data; every organ is an ellipse, a
superellipse or a parabola), lateral or AP views, supine films, scapulae, breasts, hila as masses, lobes and
fissures, the aortic knob, bone texture, devices (lines, tubes, pacemakers, electrodes), text markers,
collimation, scatter or grids, label noise or uncertain labels (every label is exact), report-derived labels,
co-occurring findings (all are independent except that cardiomegaly *is* its ratio rule), the mediastinal shift
of large effusions, pneumothoraces or atelectasis, tension, air bronchograms, cavitation, calcification,
interstitial patterns other than ground glass, and disease severity beyond the size and opacity draws. It is a
test bed with the structure of the Label-Assemble task, not a substitute for a real chest X-ray dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

FINDINGS: tuple[str, ...] = (
    "nodule",
    "effusion",
    "cardiomegaly",
    "pneumothorax",
    "consolidation",
    "atelectasis",
    "ground_glass",
)
TARGET: str = "ground_glass"
DEFAULT_PREVALENCE: dict[str, float] = {
    "nodule": 0.08,
    "effusion": 0.12,
    "cardiomegaly": 0.20,
    "pneumothorax": 0.04,
    "consolidation": 0.10,
    "atelectasis": 0.04,
    "ground_glass": 0.06,
}
#: how consolidation may look (``generate(consolidation=...)``; the module docstring describes each)
CONSOLIDATION_STYLES: tuple[str, ...] = ("dense", "lobar", "peripheral")
#: the lobar style's opacity range: the share of the way from the lung towards water density (dense: 0.45-0.85)
LOBAR_CONSOLIDATION_OPACITY: tuple[float, float] = (0.08, 0.85)
CTR_THRESHOLD = 0.5  # cardiomegaly: cardiothoracic ratio above this
ID_STRIDE = 1_000_000  # patient id = seed * ID_STRIDE + index
REFERENCE_SIZE = 64  # pixel lengths (blur, texture scales) are given at this size and scale with ``size``

_COL = {name: k for k, name in enumerate(FINDINGS)}
_STREAMS = ("labels", "pose", "anatomy", "texture", "domain", *FINDINGS)
_S = {name: k for k, name in enumerate(_STREAMS)}


@dataclasses.dataclass(frozen=True)
class Domain:
    """Acquisition style: how a source's scanner renders the same anatomy.

    Attributes:
        name: label of the domain.
        gamma: per-image gamma is drawn uniformly from this (low, high) range; < 1 brightens.
        contrast: scales ``image - 0.5``.
        brightness: added after the contrast.
        noise_std: standard deviation of the additive Gaussian noise.
        blur_sigma: Gaussian blur (pixels at 64², scaled with the image size) applied before the noise; 0 = none.
    """

    name: str
    gamma: tuple[float, float]
    contrast: float
    brightness: float
    noise_std: float
    blur_sigma: float

    def __post_init__(self) -> None:
        lo, hi = self.gamma
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"domain {self.name!r}: gamma range must satisfy 0 < low <= high, got {self.gamma}")
        if not (self.contrast > 0 and math.isfinite(self.contrast)):
            raise ValueError(f"domain {self.name!r}: contrast must be positive, got {self.contrast}")
        if not math.isfinite(self.brightness):
            raise ValueError(f"domain {self.name!r}: brightness must be finite, got {self.brightness}")
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise ValueError(f"domain {self.name!r}: noise_std must be >= 0, got {self.noise_std}")
        if not (self.blur_sigma >= 0 and math.isfinite(self.blur_sigma)):
            raise ValueError(f"domain {self.name!r}: blur_sigma must be >= 0, got {self.blur_sigma}")


DOMAINS: dict[str, Domain] = {
    "A": Domain("A", gamma=(0.9, 1.1), contrast=1.0, brightness=0.0, noise_std=0.02, blur_sigma=0.0),
    # calibrated on validation (data_assemble README): the first B (gamma 0.6-0.8, contrast 0.75, brightness +0.08,
    # noise 0.05, blur 0.6) was so far from A that findings learnt on B scored near chance on A; the second
    # (noise 0.035) was told from A by one statistic (the Laplacian's spread, AUC 1.0 after the intensity
    # window), so a label that B's images share could be learnt as the scanner (calibration step 27)
    "B": Domain("B", gamma=(0.75, 0.9), contrast=0.85, brightness=0.05, noise_std=0.02, blur_sigma=0.4),
}


@dataclasses.dataclass
class ChestBatch:
    """A batch of synthetic radiographs.

    Attributes:
        images: (N, 1, S, S) float32 in [0, 1].
        labels: (N, 7) uint8, columns in :data:`FINDINGS` order.
        masks: (N, 7, S, S) bool, each finding's region; all False where the label is 0 (for cardiomegaly the
            heart silhouette, only when positive).
        ids: (N,) int64 patient ids, ``seed * 1_000_000 + index``.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx) -> ChestBatch:
        """Rows ``idx`` (indices, a range, a slice or a boolean mask) as a new batch (copies)."""
        if isinstance(idx, slice):
            rows = np.arange(len(self))[idx]
        else:
            rows = np.asarray(idx)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            rows = rows.astype(np.int64).reshape(-1)
        return ChestBatch(self.images[rows], self.labels[rows], self.masks[rows], self.ids[rows])


def _check_overrides(values: Mapping[str, float] | None, what: str, *, upper: float | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (values or {}).items():
        if key not in _COL:
            raise ValueError(f"unknown finding {key!r} in {what}; known: {', '.join(FINDINGS)}")
        v = float(value)
        if not math.isfinite(v) or v < 0 or (upper is not None and v > upper):
            bound = f"[0, {upper:g}]" if upper is not None else ">= 0"
            raise ValueError(f"{what}[{key!r}] must be in {bound}, got {value!r}")
        out[key] = v
    return out


def _resolve_domain(domain: str | Domain) -> Domain:
    if isinstance(domain, Domain):
        return domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[domain]


def generate(
    n: int,
    *,
    seed: int,
    domain: str | Domain = "A",
    size: int = 64,
    prevalence: Mapping[str, float] | None = None,
    strength: Mapping[str, float] | None = None,
    consolidation: str = "dense",
) -> ChestBatch:
    """Draw images ``0 … n-1`` of ``seed`` (see the module docstring for what each holds).

    Args:
        n: number of images (at most 1,000,000 so that ids stay unique).
        seed: non-negative integer.
        domain: a key of :data:`DOMAINS` or a :class:`Domain`.
        size: image side in pixels (≥ 16).
        prevalence: per-finding overrides of :data:`DEFAULT_PREVALENCE`, each in [0, 1].
        strength: per-finding visibility multipliers (default 1.0 each), each ≥ 0.
        consolidation: its appearance, a key of :data:`CONSOLIDATION_STYLES`: ``"dense"`` (a focal dense
            blob), ``"lobar"`` (larger, faint to dense, with the haze's texture) or ``"peripheral"`` (the target's
            haze in one lung: a unilateral look-alike of the target); see the module docstring.
    """
    if consolidation not in CONSOLIDATION_STYLES:
        raise ValueError(f"unknown consolidation style {consolidation!r}; known: {', '.join(CONSOLIDATION_STYLES)}")
    if int(n) != n or n < 0 or n > ID_STRIDE:
        raise ValueError(f"n must be an integer in [0, {ID_STRIDE}], got {n!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(size) != size or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    n, seed, size = int(n), int(seed), int(size)
    dom = _resolve_domain(domain)
    prev = dict(DEFAULT_PREVALENCE)
    prev.update(_check_overrides(prevalence, "prevalence", upper=1.0))
    stren = dict.fromkeys(FINDINGS, 1.0)
    stren.update(_check_overrides(strength, "strength", upper=None))
    p_vec = np.array([prev[f] for f in FINDINGS])
    s_vec = np.array([stren[f] for f in FINDINGS])

    images = np.empty((n, 1, size, size), np.float32)
    labels = np.empty((n, len(FINDINGS)), np.uint8)
    masks = np.zeros((n, len(FINDINGS), size, size), bool)
    for i in range(n):
        images[i, 0], labels[i] = _render(seed, i, dom, size, p_vec, s_vec, masks[i], consolidation)
    ids = seed * ID_STRIDE + np.arange(n, dtype=np.int64)
    return ChestBatch(images, labels, masks, ids)


# ----------------------------------------------------------------------------------------------------------------
# rendering


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float64) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    v, u = np.meshgrid(c, c, indexing="ij")  # u: columns (x), v: rows (y)
    u.flags.writeable = False
    v.flags.writeable = False
    return u, v


def _pick(cond: np.ndarray, a: float, b: float) -> np.ndarray:
    """``a`` where ``cond`` else ``b``, as float32 (np.where of Python floats would give float64)."""
    return np.where(cond, np.float32(a), np.float32(b))


def _sig(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(z)


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise, rescaled to unit standard deviation (expected)."""
    sigma = sigma_px * size / REFERENCE_SIZE
    field = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma, mode="wrap")
    return field * (2.0 * math.sqrt(math.pi) * sigma)  # std of 2-D Gaussian-filtered unit white noise


def _patchiness(rng: np.random.Generator, size: int) -> np.ndarray:
    """The ground glass's texture: a low-frequency field in [0.3, 1] (one draw of smooth noise from ``rng``)."""
    return 0.3 + 0.7 * _sig(1.2 * _smooth_noise(rng, size, 3.0) + 0.6)


def _haze(rng: np.random.Generator, visibility: float, region: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """The ground-glass layer: a low-frequency patchy haze over ``region`` (weights in [0, 1]), more at the bases
    (``y`` grows downwards), at most ``0.14 * visibility`` above the lung; lung markings stay visible under it."""
    basal = np.clip((y + 0.3) / 0.9, 0.0, 1.0)
    return 0.14 * visibility * region * (0.6 + 0.4 * basal) * _patchiness(rng, size)


@dataclasses.dataclass
class _Lung:
    cx: float  # centre (mirrored x: distance from the midline, lateral positive)
    wx: float  # half-width
    cy: float  # y of the widest level
    wt: float  # vertical semi-axis above cy (apex)
    wb: float  # vertical semi-axis below cy (cut by the diaphragm)
    shear: float  # apex tilted medially by this much
    yb: float  # diaphragm: costophrenic level
    dh: float  # dome height

    @property
    def lateral(self) -> float:
        return self.cx + self.wx

    def coords(self, xx: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (p, q): p lateral, q downwards, ±1 on the outline's widest points and at the apex."""
        q = (y - self.cy) / _pick(self.cy > y, self.wt, self.wb)
        p = (xx - self.cx - self.shear * np.minimum(q, 0.0)) / self.wx
        return p, q

    def fields(self, xx: np.ndarray, y: np.ndarray, edge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(f, envelope, lung): f is 0 at the centre, 1 on the outline (a circle above the widest level, a
        superellipse of order 4 below it); envelope the outline's inside ignoring the diaphragm; lung = envelope
        closed by the diaphragm dome."""
        p, q = self.coords(xx, y)
        qn, qp = np.minimum(q, 0.0), np.maximum(q, 0.0)
        f = np.where(q < 0, np.sqrt(p * p + qn * qn), np.sqrt(np.sqrt((p * p) ** 2 + (qp * qp) ** 2)))
        envelope = _sig((1.0 - f) * (self.wx / edge))
        lung = envelope * _sig((self.diaphragm(xx) - y) / edge)
        return f, envelope, lung

    def diaphragm(self, xx: np.ndarray | float) -> np.ndarray | float:
        t = (xx - self.cx) / (1.1 * self.wx)
        return self.yb - self.dh * (1.0 - t * t)


def _draw_lung(rng: np.random.Generator) -> _Lung:
    return _Lung(
        cx=rng.uniform(0.41, 0.46),
        wx=rng.uniform(0.30, 0.35),
        cy=rng.uniform(-0.16, -0.08),
        wt=rng.uniform(0.60, 0.68),
        wb=0.85,
        shear=rng.uniform(0.06, 0.12),
        yb=rng.uniform(0.60, 0.68),
        dh=rng.uniform(0.14, 0.20),
    )


def _point_in_lung(rng: np.random.Generator, lung: _Lung, heart_fn, *, r_max: float, margin: float):
    """A random point well inside ``lung`` (mirrored coordinates), away from the heart and the diaphragm."""
    for _ in range(50):
        ang = rng.uniform(0, 2 * np.pi)
        rad = r_max * math.sqrt(rng.uniform())
        p, q = rad * math.cos(ang), rad * math.sin(ang)
        y = lung.cy + q * (lung.wt if q < 0 else lung.wb)
        xx = lung.cx + lung.shear * min(q, 0.0) + p * lung.wx
        if y < lung.diaphragm(xx) - margin and heart_fn(xx, y) > 1.0 + margin / 0.25:
            return xx, y
    return lung.cx + 0.3 * lung.wx, lung.cy  # upper-lateral lung: always inside


def _render(
    seed: int,
    index: int,
    dom: Domain,
    size: int,
    p_vec: np.ndarray,
    s_vec: np.ndarray,
    mask_out: np.ndarray,
    consolidation: str,
) -> tuple[np.ndarray, np.ndarray]:
    ss = np.random.SeedSequence([seed, index])
    rngs = [np.random.default_rng(child) for child in ss.spawn(len(_STREAMS))]
    r_lab, r_pose, r_an, r_tex, r_dom = (rngs[_S[k]] for k in ("labels", "pose", "anatomy", "texture", "domain"))
    rf = {f: rngs[_S[f]] for f in FINDINGS}

    lab = (r_lab.random(len(FINDINGS)) < p_vec).astype(np.uint8)
    st = dict(zip(FINDINGS, s_vec.tolist()))

    # ---- pose: canonical coordinates of every pixel
    theta = math.radians(r_pose.uniform(-5.0, 5.0))
    scale = r_pose.uniform(0.92, 1.08)
    tx, ty = r_pose.uniform(-0.03, 0.03, size=2).tolist()
    u, v = _pixel_grid(size)
    c, s = math.cos(theta), math.sin(theta)
    du, dv = u - tx, v - ty
    X = (c * du + s * dv) / scale
    Y = (-s * du + c * dv) / scale
    edge = 1.0 / size  # half a pixel in canonical units
    right = X > 0  # image's right = patient's left lung
    XX = np.abs(X)  # mirrored: distance from the midline

    # ---- anatomy parameters (fixed draw order)
    body_w = r_an.uniform(0.86, 0.94)
    neck_w = r_an.uniform(0.24, 0.32)
    shoulder_y = r_an.uniform(-0.84, -0.76)
    tissue = r_an.uniform(0.50, 0.56)
    bg = r_an.uniform(0.02, 0.06)
    depth = r_an.uniform(0.34, 0.46)
    lungs = [_draw_lung(r_an), _draw_lung(r_an)]  # [image-left (patient right), image-right (patient left)]
    lungs[0].yb -= r_an.uniform(0.02, 0.06)  # right hemidiaphragm higher
    hx = r_an.uniform(0.02, 0.07)
    hy = r_an.uniform(0.18, 0.26)
    hb = r_an.uniform(0.24, 0.30)
    h_right = r_an.uniform(0.60, 0.68)
    h_shear = r_an.uniform(0.35, 0.60)
    ctr_margin = r_an.uniform(0.01, 0.12)
    rib_period = r_an.uniform(0.17, 0.21)
    rib_amp = r_an.uniform(0.035, 0.06)
    rib_phase = r_an.uniform(0.0, 1.0, size=2).tolist()
    rib_curv = r_an.uniform(0.7, 1.0)
    clav_y = r_an.uniform(-0.66, -0.58)
    clav_amp = r_an.uniform(0.10, 0.16)
    mark_amp = r_an.uniform(0.12, 0.16)
    bubble = r_an.random() < 0.6
    bubble_xy = (r_an.uniform(0.25, 0.45), r_an.uniform(0.08, 0.14))
    bubble_r = r_an.uniform(0.06, 0.10)
    gain, offset = r_an.uniform(0.94, 1.06), r_an.uniform(-0.035, 0.035)

    # ---- finding parameters that change anatomy
    ra = rf["atelectasis"]
    at_side = int(ra.integers(2))
    at_raise = ra.uniform(0.04, 0.09)
    if lab[_COL["atelectasis"]]:
        lungs[at_side].yb -= at_raise * min(1.0, st["atelectasis"])
        lungs[at_side].dh *= 0.85

    # cardiomegaly: the label is the ratio rule; strength scales the margin to the threshold
    ctr_sign = 1.0 if lab[_COL["cardiomegaly"]] else -1.0
    margin = min(0.2, 0.01 + (ctr_margin - 0.01) * st["cardiomegaly"])  # 0.3-0.7: a ratio on the label's side
    ctr = CTR_THRESHOLD + ctr_sign * margin  # margin >= 0.01: never on the threshold
    thorax_w = lungs[0].lateral + lungs[1].lateral

    def heart_fn(ratio: float):
        """The heart's radius (1 on its outline) for a cardiothoracic ratio: its widest horizontal span is
        [hx - al, hx + ar] at y = hy; a shear (apex low on the right) keeps every horizontal chord's length."""
        ar, al = h_right * ratio * thorax_w, (1.0 - h_right) * ratio * thorax_w

        def f(x, y):
            dx = x - hx - h_shear * (y - hy)
            return np.sqrt((dx / _pick(dx < 0, al, ar)) ** 2 + ((y - hy) / hb) ** 2)

        return f

    fh = heart_fn(ctr)(X, Y)
    # findings placed "away from the heart" avoid the largest heart, so they do not move with the cardiomegaly label
    avoid = heart_fn(max(ctr, 0.62))
    heart = _sig((1.0 - fh) * (hb / edge))

    # ---- lungs
    f_side = np.empty_like(X)
    env = np.empty_like(X)
    lung = np.empty_like(X)
    dia = np.empty_like(X)
    for k, ln in enumerate(lungs):
        sel = right if k else ~right
        f_k, env_k, lung_k = ln.fields(XX[sel], Y[sel], edge)
        f_side[sel], env[sel], lung[sel] = f_k, env_k, lung_k
        dia[sel] = ln.diaphragm(XX[sel])
    lung *= 1.0 - heart
    lx = _pick(right, lungs[1].cx, lungs[0].cx)  # per-pixel lung parameters
    lwx = _pick(right, lungs[1].wx, lungs[0].wx)

    # ---- body and bones
    bw = neck_w + (body_w - neck_w) * _sig((Y - shoulder_y) / 0.05)
    body = _sig((bw - XX) / (2 * edge))
    thick = np.clip(1.0 - (X / body_w) ** 2, 0.0, 1.0)
    img = bg + body * (tissue - bg + 0.10 * thick)
    img += body * 0.13 * np.exp(-((X / 0.085) ** 4))  # spine and mediastinum
    img += 0.05 * heart
    trachea = np.exp(-((X / 0.035) ** 2)) * _sig((-0.22 - Y) / 0.03)
    img -= 0.12 * trachea
    if bubble:
        bx, by = bubble_xy
        d_b = np.sqrt(((X - bx) / bubble_r) ** 2 + ((Y - lungs[1].diaphragm(bx) - by) / (0.7 * bubble_r)) ** 2)
        img -= 0.14 * _sig((1.0 - d_b) * 4.0) * _sig((Y - lungs[1].diaphragm(XX) - 0.02) / edge) * right
    img -= depth * lung

    # ribs: bright arcs peaking mid-hemithorax, falling medially and laterally
    xp = lx - 0.1
    phase = (Y - rib_curv * (XX - xp) ** 2 - 0.25 * XX) / rib_period + _pick(right, rib_phase[1], rib_phase[0])
    ribs = ((0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 3) * _sig((XX - 0.10) / 0.03)
    ribs *= _sig((lx + lwx + 0.08 - XX) / 0.03) * _sig((Y + 0.80) / 0.04) * _sig((0.55 - Y) / 0.05)
    img += rib_amp * ribs * (0.5 + 0.5 * lung)
    # clavicles over the apices
    clav_c = clav_y - 0.16 * (XX - 0.06) + 0.25 * (XX - 0.4) ** 2
    clav = np.exp(-(((Y - clav_c) / 0.045) ** 2)) * _sig((XX - 0.07) / 0.02) * _sig((0.70 - XX) / 0.04)
    img += clav_amp * clav

    # ---- lung markings: radial ridges of polar noise around each hilum, plus fine parenchyma
    hil_x = lx - 0.26
    hil_y = -0.02
    rx, ry = XX - hil_x, Y - hil_y
    rr = np.sqrt(rx * rx + ry * ry)
    ang = np.arctan2(ry, rx)  # mirrored: 0 lateral, -pi/2 up, +pi/2 down
    n_t, n_r = 96, 12
    table = ndimage.gaussian_filter(r_tex.standard_normal((n_t, n_r), dtype=np.float32), (1.0, 1.4), mode="wrap")
    table /= table.std() + 1e-12
    it = (ang / (2 * np.pi) + _pick(right, 1.0, 0.5)) * n_t  # the two lungs read opposite halves of the table
    ir = np.clip(rr / 0.9, 0.0, 1.0) * (n_r - 1)
    tv = ndimage.map_coordinates(table, [it.ravel(), ir.ravel()], order=1, mode="grid-wrap").reshape(X.shape)
    ridge = np.exp(-((tv / 0.35) ** 2))
    fade = np.exp(-rr / 0.6) * _sig((rr - 0.06) / 0.04)
    markings = mark_amp * ridge * fade
    parenchyma = 0.012 * _smooth_noise(r_tex, size, 0.7)
    texture = markings + parenchyma

    # ---- findings (geometry drawn from each finding's own stream, always, in a fixed order)
    pos = {f: bool(lab[_COL[f]]) for f in FINDINGS}
    sidesel = (~right, right)

    # pneumothorax: apical-lateral crescent of air inside a pleural line
    rp = rf["pneumothorax"]
    pt_side = int(rp.integers(2))
    pt_t = rp.uniform(0.20, 0.45)
    pt_vis = rp.uniform(0.6, 1.0) * st["pneumothorax"]
    crescent = np.zeros_like(X)
    if pos["pneumothorax"]:
        ln = lungs[pt_side]
        pp, qq = ln.coords(XX, Y)
        where = _sig((pp + 0.25 - 0.6 * np.minimum(qq, 0.0)) / 0.12) * _sig((0.55 - qq) / 0.1)
        inner = 1.0 - pt_t
        crescent = lung * sidesel[pt_side] * _sig((f_side - inner) * (ln.wx / edge)) * where
        pleura = np.exp(-((((f_side - inner) * ln.wx) / (0.9 * edge)) ** 2)) * lung * sidesel[pt_side] * where
        mask_out[_COL["pneumothorax"]] = crescent > 0.5
    img += texture * (1.0 - min(1.0, pt_vis) * crescent) * lung
    if pos["pneumothorax"]:
        img -= 0.12 * pt_vis * crescent
        img += 0.16 * pt_vis * pleura * (1.0 - crescent)

    # ground glass: bilateral peripheral patchy haze, markings kept
    rg = rf["ground_glass"]
    gg_f0 = rg.uniform(0.50, 0.62)
    gg_vis = rg.uniform(0.2, 1.0) * st["ground_glass"]
    if pos["ground_glass"]:
        periph = _sig((f_side - gg_f0) / 0.07) * lung
        img += _haze(rg, gg_vis, periph, Y, size) * (1.0 - crescent)
        mask_out[_COL["ground_glass"]] = periph > 0.5

    level = tissue + 0.05  # water density, what fluid and airless lung look like

    # nodule
    rn = rf["nodule"]
    nd_side = int(rn.integers(2))
    nd_r = rn.uniform(2.0, 4.0) / REFERENCE_SIZE * 2.0
    nd_amp = rn.uniform(0.10, 0.28) * st["nodule"]
    nd_xy = _point_in_lung(rn, lungs[nd_side], _mirrored(avoid, nd_side), r_max=0.75, margin=nd_r)
    if pos["nodule"]:
        nx = nd_xy[0] if nd_side else -nd_xy[0]
        d_n = np.sqrt((X - nx) ** 2 + (Y - nd_xy[1]) ** 2)
        nod = _sig((nd_r - d_n) / edge)
        img += nd_amp * nod * (1.0 - 0.3 * (d_n / nd_r) ** 2)
        mask_out[_COL["nodule"]] = d_n < nd_r

    # consolidation: lobulated dense blob in one lung
    rc = rf["consolidation"]
    co_side = int(rc.integers(2))
    co_r = rc.uniform(0.12, 0.24)
    if consolidation == "lobar":  # lobar rather than focal: an area the haze's texture can show in
        co_r *= 1.5
    co_a = rc.uniform(0.45, 0.85) * st["consolidation"]
    co_xy = _point_in_lung(rc, lungs[co_side], _mirrored(avoid, co_side), r_max=0.7, margin=0.3 * co_r)
    if pos["consolidation"] and consolidation == "peripheral":  # the target's haze, in one lung
        co_f0 = rc.uniform(0.50, 0.62)
        co_vis = rc.uniform(0.2, 1.0) * st["consolidation"]
        cons = _sig((f_side - co_f0) / 0.07) * lung * sidesel[co_side]
        img += _haze(rc, co_vis, cons, Y, size) * (1.0 - crescent)
        mask_out[_COL["consolidation"]] = (cons > 0.5) & (lung > 0.5)
    elif pos["consolidation"]:
        cx_ = co_xy[0] if co_side else -co_xy[0]
        d_c = np.sqrt((X - cx_) ** 2 + (Y - co_xy[1]) ** 2) / co_r
        lob = (1.0 - d_c) + 0.45 * _smooth_noise(rc, size, 1.3)
        cons = _sig(lob / 0.12) * lung * sidesel[co_side]
        mask_out[_COL["consolidation"]] = (cons > 0.5) & (lung > 0.5)
        if consolidation == "lobar":  # the haze's texture, from ground-glass faint to dense (drawn after the rest)
            co_a = rc.uniform(*LOBAR_CONSOLIDATION_OPACITY) * st["consolidation"]
            cons = cons * _patchiness(rc, size)
        img += min(1.0, co_a) * cons * (level - img) * 0.9

    # atelectasis: plate-like band widening laterally into a wedge, lower lung
    at_y = ra.uniform(0.25, 0.42)
    at_tilt = ra.uniform(-0.35, 0.10)
    at_w0, at_w1 = ra.uniform(0.012, 0.02), ra.uniform(0.03, 0.06)
    at_a = ra.uniform(0.40, 0.75) * st["atelectasis"]
    if pos["atelectasis"]:
        ln = lungs[at_side]
        t_ax = np.clip((XX - (ln.cx - 0.6 * ln.wx)) / (1.4 * ln.wx), 0.0, 1.0)
        centre = ln.cy + at_y + at_tilt * (XX - ln.cx)
        half = at_w0 + (at_w1 - at_w0) * t_ax
        band = _sig((half - np.abs(Y - centre)) / edge) * _sig((XX - (ln.cx - 0.6 * ln.wx)) / (2 * edge))
        band *= lung * sidesel[at_side]
        img += min(1.0, at_a) * band * (level - img) * 0.85
        mask_out[_COL["atelectasis"]] = (band > 0.5) & (lung > 0.5)

    # effusion: meniscus-topped basal fluid, hides the hemidiaphragm
    re = rf["effusion"]
    ef_both = re.random() < 0.4
    ef_side = int(re.integers(2))
    ef_h = re.uniform(0.05, 0.38, size=2).tolist()
    ef_rise = re.uniform(0.06, 0.16, size=2).tolist()
    ef_a = (re.uniform(0.65, 0.95, size=2) * st["effusion"]).tolist()
    if pos["effusion"]:
        fluid_all = np.zeros_like(X)
        for k in (0, 1) if ef_both else (ef_side,):
            ln = lungs[k]
            t_lat = np.clip((XX - (ln.cx - ln.wx)) / (2 * ln.wx), 0.0, 1.0)
            y_top = ln.yb - ef_h[k] - ef_rise[k] * t_lat**2
            fluid = env * sidesel[k] * _sig((Y - y_top) / edge) * _sig((ln.yb + 0.04 - Y) / edge) * (1.0 - heart)
            dens = min(1.0, ef_a[k]) * (0.75 + 0.25 * np.clip((Y - y_top) / 0.15, 0.0, 1.0))
            img += fluid * dens * (level - img)
            fluid_all = np.maximum(fluid_all, fluid)
        mask_out[_COL["effusion"]] = fluid_all > 0.5

    if pos["cardiomegaly"]:
        mask_out[_COL["cardiomegaly"]] = (heart > 0.5) & (dia > Y)  # the silhouette above the diaphragm

    # ---- exposure, then the acquisition domain
    img = np.clip(img * gain + offset, 0.0, 1.0)
    gamma = r_dom.uniform(*dom.gamma)
    img = img**gamma
    img = (img - 0.5) * dom.contrast + 0.5 + dom.brightness
    if dom.blur_sigma > 0:
        img = ndimage.gaussian_filter(img, dom.blur_sigma * size / REFERENCE_SIZE, mode="nearest")
    if dom.noise_std > 0:
        img = img + dom.noise_std * r_dom.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0), lab


def _mirrored(heart_f, side: int):
    """The heart's radius function at a point given in a lung's mirrored coordinates (side 1 = image right)."""
    sign = 1.0 if side else -1.0
    return lambda xx, y: float(heart_f(sign * xx, y))
