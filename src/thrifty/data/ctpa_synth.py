"""Synthetic CT pulmonary angiography (CTPA) exams with RSNA-STR labels, for the PE CAD recipe.

The PE CAD analysis (Islam et al., arXiv 2109.07029) detects pulmonary embolism (PE) on CTPA at image level
(``pe_present_on_image``) and exam level (the nine RSNA-STR exam labels in :data:`EXAM_LABELS`) with a two-stage
pipeline: a 2-D slice classifier on windowed, lung-cropped slices, then a sequence model over its slice features.
The RSNA-STR data cannot ship with this package, so this module draws a small CTPA exam per study from a seeded
generator, in Hounsfield units, with its slice labels, exam labels and the exact embolus masks.

Geometry and axes. An exam is a stack of ``S`` axial slices of ``size × size`` pixels (64² by default), ``S``
drawn per exam from ``CTPASpec.slices`` (24–80). Slice ``k`` lies at ``positions[k]`` mm, increasing towards the
head (slice 0 is the most inferior), and ``spacing`` is (z, y, x) in mm: a field of view of 320–380 mm and a
thorax of 220–280 mm spread over the ``S`` slices (so short exams are thick-sliced). Anatomy is laid out in
fractions of the body's semi-axes and of the exam's height ``t = k / (S - 1)``, so the same anatomy appears at
every slice count; pixel-scale lengths (vessel radii, drift) are given at 64² and scale with ``size``. An axial
slice shown with ``imshow`` is in the radiological convention: anterior at the top, the patient's right on the
image's left, so the *right* lung and tree are at small x, the *left* ones at large x.

What is modelled, per exam (sizes, positions, intensities and noise vary, the layout never does):

- air (-1000 HU) around an elliptic body (soft tissue ≈ 40 HU) with a subcutaneous fat rim (≈ -100 HU) and a
  soft-tissue chest wall of 1.5–2.5 pixels inside it;
- two lungs (≈ -850 HU with a smooth Gaussian texture) as ellipses that shrink towards the apex and the
  diaphragm; a vertebral body (≈ 400 HU) behind them;
- the heart on the lower slices: enhanced myocardium (≈ 90 HU) around a contrast-filled right ventricle (pulmonary
  contrast) and left ventricle (systemic contrast, dimmer), side by side across a septum; the ratio of their
  diameters is the exam's RV/LV ratio, constant over the heart's slices;
- the aorta (systemic contrast): ascending to the right of the pulmonary trunk, an arch on one or two slices
  and a descending aorta left of the spine;
- the pulmonary arteries (250–400 HU): a central trunk rising from the right ventricle, the right and left main
  pulmonary arteries as short capsules at the bifurcation level, and from each hilum one lobar branch running up
  and one running down the lung, each with 2–4 segmental side branches. A branch's centre follows a smooth path (a
  straight course towards a random peripheral target plus a smooth random wobble), its in-plane speed capped at
  ``vessel_drift`` pixels per slice and kept inside its lung; radii taper towards the periphery;
- emboli as filling defects (40–70 HU) inside a pulmonary artery lumen over 2–8 consecutive slices, placed in
  the trunk (*central*), the left tree or the right tree, only where the lumen is wide enough and does not overlap
  another pulmonary artery. *Acute*: a round defect near the lumen's centre, contrast all around (the "polo
  mint"), the artery slightly distended. *Chronic*: an eccentric, wall-adherent cap of the lumen on the side
  facing away from neighbouring contrast, the artery narrowed;
- indeterminate exams (``indeterminate_rate``, ≈ 3 %): poor opacification (90–150 HU in every vessel) and no
  emboli;
- an optional in-plane Gaussian blur (off by default) and white Gaussian noise (σ 15–30 HU per exam); the volume
  is rounded to ``int16`` and clipped to [-1024, 3071] HU, what a 12-bit CT stores.

Labels (RSNA-STR rules, derived from what was actually drawn): ``pe_present_on_image`` is 1 on exactly the slices
whose embolus mask is non-empty; emboli occupy disjoint runs of slices with at least one free slice between runs,
so every run of positive slices is one embolus. Positive exams get 5–15 % positive slices (at least one embolus
length; rarely fewer, when no artery has room for a run, and an exam whose emboli all find no room is negative).
``negative_exam_for_pe`` is 1 iff the exam has no embolus and is not indeterminate; indeterminate exams have only
``indeterminate`` = 1. ``central_pe`` / ``leftsided_pe`` / ``rightsided_pe`` say where emboli were placed (the main
pulmonary arteries are never hosts); exactly one RV/LV label is 1 for a positive exam (``≥ 1`` with probability
``rv_lv_gte_1_rate``) and both are 0 otherwise (negative exams have a normal heart). A positive exam is acute-only
(both chronic labels 0), ``chronic_pe`` (every defect chronic) or ``acute_and_chronic_pe`` (both kinds present; a
lone embolus is then chronic on its lower slices and acute above), never both.

What it does not model: real anatomy or its statistics (organs are ellipses, disks and capsules; no airways,
veins, oesophagus, liver, ribs, fissures, atria or valves), oblique vessels (every artery is cut as a disk),
real parenchymal texture, partial-volume effects, scanner or reconstruction differences, artefacts (motion,
breathing, streaks from dense contrast, beam hardening, flow artefacts that mimic emboli), infarcts, effusions,
mosaic perfusion, bronchial collaterals, contrast timing beyond one level per exam, and right-heart strain
beyond the chamber ratio. It is a test bed with the structure of the RSNA-STR task, not a substitute for it.

Determinism: exam ``index`` of ``seed`` is a pure function of (seed, index, spec), drawn from its own
``numpy.random.SeedSequence([seed, index])`` spawned into streams for the labels, the geometry, the vessel
paths, the emboli, the lung texture and the noise (the label stream always draws the same numbers), so
``generate(10, seed=s)`` starts with ``generate(5, seed=s)``.

Helpers for the recipe: :func:`window` (the card's stage-1 windowing, level 100 / width 700), :func:`lung_bbox`
(a threshold-based lung bounding box for the stage-1 crop) and :func:`defect_fraction` (a training-free
per-slice baseline score: defect-like voxels enclosed by contrast).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

EXAM_LABELS: tuple[str, ...] = (
    "negative_exam_for_pe",
    "indeterminate",
    "leftsided_pe",
    "rightsided_pe",
    "central_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "chronic_pe",
    "acute_and_chronic_pe",
)
LOCATIONS: tuple[str, ...] = ("central", "left", "right")
REFERENCE_SIZE = 64  # pixel-scale lengths are given at this size and scale with ``size``
AIR_HU = -1000.0
HU_RANGE = (-1024, 3071)  # what a 12-bit CT stores

_STREAMS = ("labels", "geometry", "vessels", "emboli", "texture", "noise")
_LABEL_INDEX = {name: i for i, name in enumerate(EXAM_LABELS)}
_LOC_LABEL = {"central": "central_pe", "left": "leftsided_pe", "right": "rightsided_pe"}
_DISTENSION = 1.15  # an acute embolus widens its artery by this factor
_MYOCARDIUM_HU = 90.0  # enhanced myocardium
_BONE_HU = (350.0, 450.0)


@dataclasses.dataclass(frozen=True)
class CTPASpec:
    """Difficulty knobs of the generator (the defaults are the PE CAD card's miniature).

    Pairs are inclusive (low, high) ranges drawn uniformly per exam (per embolus for ``defect_hu``,
    ``embolus_size`` and ``chronic_narrowing``). Pixel lengths are at 64² and scale with ``size``.

    Attributes:
        size: slice side in pixels, an integer in [32, 512].
        slices: range of the number of slices per exam, integers with 12 <= low <= high <= 1024.
        positive_rate: probability that a non-indeterminate exam has emboli, in [0, 1].
        positive_slice_share: range of the share of positive slices in a positive exam, 0 < low <= high <= 0.5
            (never fewer positive slices than one embolus, ``embolus_length[0]``).
        embolus_length: range of an embolus's extent in consecutive slices, integers with 1 <= low <= high <= 32.
        defect_hu: range of a filling defect's mean HU; ``high`` must lie below ``contrast_hu[0]``.
        contrast_hu: range of the pulmonary arteries' contrast level (HU).
        systemic_ratio: range of the aorta's and left ventricle's contrast relative to the pulmonary level,
            0 < low <= high <= 1.5.
        lung_hu: mean lung parenchyma HU, in [-1000, -500].
        lung_texture_hu: standard deviation of the smooth lung texture, >= 0.
        soft_tissue_hu: mean soft-tissue HU, in [-50, 150].
        fat_hu: mean fat HU, in [-200, 0].
        noise_hu: range of the per-exam noise σ (HU), 0 <= low <= high.
        indeterminate_rate: probability of a poorly opacified, indeterminate exam, in [0, 1].
        indeterminate_contrast_hu: range of the contrast level of an indeterminate exam (HU).
        chronic_rate: share of positive exams that are chronic-only, in [0, 1].
        acute_and_chronic_rate: share of positive exams with both kinds, in [0, 1]; with ``chronic_rate`` <= 1.
        rv_lv_gte_1_rate: share of positive exams with RV/LV >= 1, in [0, 1].
        rv_lv_ratio_gte_1: range of the RV/LV diameter ratio when it is >= 1 (1 <= low <= high <= 2).
        rv_lv_ratio_lt_1: range of the ratio otherwise, and for every negative or indeterminate exam
            (0.3 <= low <= high < 1).
        location_probs: probabilities of placing an embolus in the (central, left, right) arteries; non-negative,
            summing to 1. A location with no room for the embolus falls back to the others.
        embolus_size: range of a defect's size relative to the lumen radius (acute: the defect's radius; chronic:
            the cap's thickness), 0 < low <= high <= 0.9.
        chronic_narrowing: range of the lumen radius factor under a chronic defect, 0.3 <= low <= high <= 1.
        trunk_radius: range of the pulmonary trunk's radius in pixels, 2 <= low <= high <= 8.
        min_host_radius: an artery narrower than this (pixels) never hosts an embolus, in [1, 6].
        vessel_drift: cap on an artery's in-plane centre shift between neighbouring slices (pixels), in (0, 4].
        vessel_wobble: amplitude of the smooth random deviation of a branch from its straight course (pixels),
            in [0, 10].
        segmental_branches: range of segmental side branches per lobar branch, integers with 0 <= low <= high <= 4.
        blur_sigma: in-plane Gaussian blur (pixels) applied before the noise, in [0, 2]; 0 (default) keeps edges
            sharp, so defect voxels keep their HU exactly up to noise.
    """

    size: int = 64
    slices: tuple[int, int] = (24, 80)
    positive_rate: float = 0.5
    positive_slice_share: tuple[float, float] = (0.05, 0.15)
    embolus_length: tuple[int, int] = (2, 8)
    defect_hu: tuple[float, float] = (40.0, 70.0)
    contrast_hu: tuple[float, float] = (250.0, 400.0)
    systemic_ratio: tuple[float, float] = (0.55, 0.8)
    lung_hu: float = -850.0
    lung_texture_hu: float = 20.0
    soft_tissue_hu: float = 40.0
    fat_hu: float = -100.0
    noise_hu: tuple[float, float] = (15.0, 30.0)
    indeterminate_rate: float = 0.03
    indeterminate_contrast_hu: tuple[float, float] = (90.0, 150.0)
    chronic_rate: float = 0.12
    acute_and_chronic_rate: float = 0.08
    rv_lv_gte_1_rate: float = 0.4
    rv_lv_ratio_gte_1: tuple[float, float] = (1.05, 1.5)
    rv_lv_ratio_lt_1: tuple[float, float] = (0.65, 0.95)
    location_probs: tuple[float, float, float] = (0.2, 0.4, 0.4)
    embolus_size: tuple[float, float] = (0.45, 0.7)
    chronic_narrowing: tuple[float, float] = (0.6, 0.8)
    trunk_radius: tuple[float, float] = (3.5, 4.5)
    min_host_radius: float = 2.0
    vessel_drift: float = 0.8
    vessel_wobble: float = 2.0
    segmental_branches: tuple[int, int] = (2, 4)
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        _check_int(self, "size", 32, 512)
        _check_pair(self, "slices", 12, 1024, integer=True)
        _check_pair(self, "positive_slice_share", 0.0, 0.5, open_low=True)
        _check_pair(self, "embolus_length", 1, 32, integer=True)
        _check_pair(self, "defect_hu", -100.0, 200.0)
        _check_pair(self, "contrast_hu", 0.0, 1500.0)
        _check_pair(self, "systemic_ratio", 0.0, 1.5, open_low=True)
        _check_pair(self, "noise_hu", 0.0, 200.0)
        _check_pair(self, "indeterminate_contrast_hu", -100.0, 1500.0)
        _check_pair(self, "rv_lv_ratio_gte_1", 1.0, 2.0)
        _check_pair(self, "rv_lv_ratio_lt_1", 0.3, 1.0, open_high=True)
        _check_pair(self, "embolus_size", 0.0, 0.9, open_low=True)
        _check_pair(self, "chronic_narrowing", 0.3, 1.0)
        _check_pair(self, "trunk_radius", 2.0, 8.0)
        _check_pair(self, "segmental_branches", 0, 4, integer=True)
        for name in ("positive_rate", "indeterminate_rate", "chronic_rate", "acute_and_chronic_rate"):
            _check_number(self, name, 0.0, 1.0)
        _check_number(self, "rv_lv_gte_1_rate", 0.0, 1.0)
        _check_number(self, "lung_hu", -1000.0, -500.0)
        _check_number(self, "lung_texture_hu", 0.0, 200.0)
        _check_number(self, "soft_tissue_hu", -50.0, 150.0)
        _check_number(self, "fat_hu", -200.0, 0.0)
        _check_number(self, "min_host_radius", 1.0, 6.0)
        _check_number(self, "vessel_drift", 0.0, 4.0, open_low=True)
        _check_number(self, "vessel_wobble", 0.0, 10.0)
        _check_number(self, "blur_sigma", 0.0, 2.0)
        if self.chronic_rate + self.acute_and_chronic_rate > 1.0 + 1e-9:
            raise ValueError(
                f"chronic_rate + acute_and_chronic_rate must be at most 1, got "
                f"{self.chronic_rate} + {self.acute_and_chronic_rate}"
            )
        if self.defect_hu[1] >= self.contrast_hu[0]:
            raise ValueError(
                f"defect_hu must lie below contrast_hu (a filling defect is darker than contrast), got "
                f"defect_hu={self.defect_hu}, contrast_hu={self.contrast_hu}"
            )
        try:
            probs = tuple(float(p) for p in self.location_probs)
        except (TypeError, ValueError):
            raise ValueError(f"location_probs must be three numbers, got {self.location_probs!r}") from None
        if len(probs) != len(LOCATIONS):
            raise ValueError(f"location_probs must have {len(LOCATIONS)} entries {LOCATIONS}, got {probs!r}")
        if not all(math.isfinite(p) and p >= 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"location_probs must be non-negative and sum to 1, got {self.location_probs!r}")
        object.__setattr__(self, "location_probs", probs)

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, object] | None) -> CTPASpec:
        """The default spec with ``overrides`` applied (e.g. from a config); lists become tuples.

        Raises:
            ValueError: on an unknown key (the message names it and the valid ones) or an invalid value.
        """
        overrides = dict(overrides or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown CTPASpec key(s) {unknown}; valid keys: {', '.join(valid)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})

    def to_dict(self) -> dict[str, object]:
        """The fields as plain JSON-able values (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _as_number(name: str, value: object, *, integer: bool = False) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if integer and v != int(v):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return v


def _bounds(low: float, high: float, open_low: bool, open_high: bool) -> str:
    return f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


def _inside(v: float, low: float, high: float, open_low: bool, open_high: bool) -> bool:
    return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)


def _check_number(
    spec: CTPASpec, name: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False
) -> None:
    v = _as_number(name, getattr(spec, name))
    if not _inside(v, low, high, open_low, open_high):
        raise ValueError(f"{name} must be in {_bounds(low, high, open_low, open_high)}, got {getattr(spec, name)!r}")
    object.__setattr__(spec, name, v)


def _check_int(spec: CTPASpec, name: str, low: int, high: int) -> None:
    v = _as_number(name, getattr(spec, name), integer=True)
    if not low <= v <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {getattr(spec, name)!r}")
    object.__setattr__(spec, name, int(v))


def _check_pair(
    spec: CTPASpec,
    name: str,
    low: float,
    high: float,
    *,
    integer: bool = False,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    value = getattr(spec, name)
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = (_as_number(name, v, integer=integer) for v in items)
    if not (_inside(lo, low, high, open_low, open_high) and _inside(hi, low, high, open_low, open_high) and lo <= hi):
        raise ValueError(
            f"{name} must be (low, high) with low <= high, both in {_bounds(low, high, open_low, open_high)}, "
            f"got {value!r}"
        )
    object.__setattr__(spec, name, (int(lo), int(hi)) if integer else (lo, hi))


# ---------------------------------------------------------------------------------------------------------------
# records


@dataclasses.dataclass(frozen=True, eq=False)
class Vessel:
    """One pulmonary artery as drawn: a disk per slice on slices ``start … start + len(radii) - 1``.

    Attributes:
        name: "trunk", "right_lobar_0", "left_lobar_1_seg_0", ...
        location: "central" (the trunk), "left" or "right" (the patient's side; left is at large x).
        start: first slice.
        centres: float64 (n, 2) disk centres (y, x) in pixels.
        radii: float64 (n,) radii in pixels as rendered (widened under acute, narrowed under chronic emboli).
        hu: contrast level of the lumen.
    """

    name: str
    location: str
    start: int
    centres: np.ndarray
    radii: np.ndarray
    hu: float

    @property
    def slices(self) -> range:
        return range(self.start, self.start + len(self.radii))


@dataclasses.dataclass(frozen=True)
class Embolus:
    """One filling defect over consecutive slices ``start … start + length - 1`` of artery ``vessel``.

    ``kinds[j]`` is "acute" or "chronic" for slice ``start + j``; ``hu`` is the defect's level before noise.
    """

    location: str
    vessel: str
    start: int
    length: int
    kinds: tuple[str, ...]
    hu: float

    @property
    def slices(self) -> range:
        return range(self.start, self.start + self.length)


@dataclasses.dataclass(frozen=True, eq=False)
class Exam:
    """One synthetic CTPA study (see the module docstring).

    Attributes:
        volume: int16 (S, H, W) in HU, slice 0 the most inferior.
        slice_labels: uint8 (S,) ``pe_present_on_image``.
        exam_labels: uint8 (9,) in :data:`EXAM_LABELS` order (``labels`` gives them as a dict).
        study_id: "ctpa-<seed>-<index>", unique per (seed, index); ``study_uid`` is a DICOM UID derived from it.
        emboli_masks: bool (S, H, W), the filling-defect voxels.
        spacing: (z, y, x) voxel size in mm.
        positions: float64 (S,) slice z positions in mm (increasing with the slice index).
        seed, index: what the exam was drawn from.
        contrast_hu: pulmonary contrast level; noise_hu: noise σ; rv_lv_ratio: RV/LV diameter ratio drawn.
        emboli: the emboli placed; vessels: the pulmonary arteries drawn (trunk, lobar and segmental branches).
    """

    volume: np.ndarray
    slice_labels: np.ndarray
    exam_labels: np.ndarray
    study_id: str
    emboli_masks: np.ndarray
    spacing: tuple[float, float, float]
    positions: np.ndarray
    seed: int
    index: int
    contrast_hu: float
    noise_hu: float
    rv_lv_ratio: float
    emboli: tuple[Embolus, ...]
    vessels: tuple[Vessel, ...]

    @property
    def labels(self) -> dict[str, int]:
        """The exam labels by name."""
        return {name: int(v) for name, v in zip(EXAM_LABELS, self.exam_labels)}

    @property
    def n_slices(self) -> int:
        return int(self.volume.shape[0])

    @property
    def study_uid(self) -> str:
        """A valid DICOM UID ("2.25." + a 128-bit integer) derived from ``study_id``."""
        return f"2.25.{int(hashlib.sha256(self.study_id.encode()).hexdigest()[:32], 16)}"


# ---------------------------------------------------------------------------------------------------------------
# generation


def generate(n: int, *, seed: int, spec: CTPASpec | None = None) -> list[Exam]:
    """Exams ``0 … n-1`` of ``seed``; exam ``i`` is ``generate_exam(seed, index=i, spec=spec)``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return [generate_exam(seed, index=i, spec=spec) for i in range(int(n))]


def generate_exam(seed: int, *, index: int = 0, spec: CTPASpec | None = None) -> Exam:
    """Exam ``index`` of ``seed``, drawn from ``numpy.random.SeedSequence([seed, index])``."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if spec is None:
        spec = CTPASpec()
    elif not isinstance(spec, CTPASpec):
        raise TypeError(f"spec must be a CTPASpec or None, got {type(spec).__name__}")
    seed, index = int(seed), int(index)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(len(_STREAMS))]
    rs = dict(zip(_STREAMS, streams))

    # labels stream: always the same four numbers
    u_ind, u_pos, u_type, u_rvlv = rs["labels"].random(4)
    indeterminate = u_ind < spec.indeterminate_rate
    positive = (not indeterminate) and u_pos < spec.positive_rate
    if u_type < spec.chronic_rate:
        pe_type = "chronic"
    elif u_type < spec.chronic_rate + spec.acute_and_chronic_rate:
        pe_type = "acute_and_chronic"
    else:
        pe_type = "acute"
    rv_lv_high = positive and u_rvlv < spec.rv_lv_gte_1_rate

    geo = _draw_geometry(rs["geometry"], spec, indeterminate=indeterminate, rv_lv_high=rv_lv_high)
    vessels = _draw_vessels(rs["vessels"], spec, geo)
    emboli, plans = _place_emboli(rs["emboli"], spec, geo, vessels, pe_type) if positive else ((), [])
    volume, masks = _render(rs, spec, geo, vessels, plans)

    slice_labels = masks.any(axis=(1, 2)).astype(np.uint8)
    exam_labels = np.zeros(len(EXAM_LABELS), np.uint8)
    if indeterminate:
        exam_labels[_LABEL_INDEX["indeterminate"]] = 1
    elif not emboli:
        exam_labels[_LABEL_INDEX["negative_exam_for_pe"]] = 1
    else:
        for e in emboli:
            exam_labels[_LABEL_INDEX[_LOC_LABEL[e.location]]] = 1
        exam_labels[_LABEL_INDEX["rv_lv_ratio_gte_1" if geo["rv_lv_ratio"] >= 1 else "rv_lv_ratio_lt_1"]] = 1
        kinds = {k for e in emboli for k in e.kinds}
        if kinds == {"chronic"}:
            exam_labels[_LABEL_INDEX["chronic_pe"]] = 1
        elif kinds == {"acute", "chronic"}:
            exam_labels[_LABEL_INDEX["acute_and_chronic_pe"]] = 1

    S = geo["S"]
    return Exam(
        volume=volume,
        slice_labels=slice_labels,
        exam_labels=exam_labels,
        study_id=f"ctpa-{seed}-{index}",
        emboli_masks=masks,
        spacing=geo["spacing"],
        positions=geo["z0"] + geo["spacing"][0] * np.arange(S, dtype=np.float64),
        seed=seed,
        index=index,
        contrast_hu=geo["contrast"],
        noise_hu=geo["noise"],
        rv_lv_ratio=geo["rv_lv_ratio"],
        emboli=tuple(emboli),
        vessels=tuple(v for v in vessels if v.name != "_capsule"),
    )


def _draw_geometry(rng: np.random.Generator, spec: CTPASpec, *, indeterminate: bool, rv_lv_high: bool) -> dict:
    """Everything that is not a pulmonary-artery path: sizes, positions, levels, intensities, spacing."""
    size = spec.size
    sc = size / REFERENCE_SIZE
    u = rng.uniform
    S = int(rng.integers(spec.slices[0], spec.slices[1] + 1))
    g: dict = {"S": S, "size": size, "sc": sc}
    cy, cx = size / 2 - 0.5 + u(-1.5, 1.5) * sc, size / 2 - 0.5 + u(-1.5, 1.5) * sc
    ay, ax = u(0.30, 0.34) * size, u(0.41, 0.45) * size
    g.update(cy=cy, cx=cx, ay=ay, ax=ax, fat_w=u(1.2, 2.2) * sc, wall_w=u(1.5, 2.5) * sc)
    g["soft"] = spec.soft_tissue_hu + u(-8, 8)
    g["fat"] = spec.fat_hu + u(-15, 15)
    g["lung"] = spec.lung_hu + u(-25, 25)
    g["bone"] = u(*_BONE_HU)
    # lungs: (cy, cx, semi_y, semi_x); right lung at small x
    g["lungs"] = {
        "right": (cy + u(-0.03, 0.03) * ay, cx - u(0.50, 0.56) * ax, u(0.70, 0.78) * ay, u(0.31, 0.35) * ax),
        "left": (cy + u(-0.03, 0.03) * ay, cx + u(0.52, 0.58) * ax, u(0.68, 0.76) * ay, u(0.29, 0.33) * ax),
    }
    t = np.linspace(0.0, 1.0, S)
    apex = 1.0 - 0.4 * np.clip((t - u(0.72, 0.8)) / 0.25, 0.0, 1.0) ** 1.5
    base = 0.8 + 0.2 * np.clip(t / u(0.08, 0.15), 0.0, 1.0)
    g["lung_profile"] = apex * base
    g["body_profile"] = 1.0 + 0.03 * np.sin(np.pi * (t + u(0, 1)))
    g["spine"] = (cy + 0.78 * ay, cx + u(-0.5, 0.5) * sc, 0.16 * ay)

    # levels (slice indices)
    t_ht = u(0.36, 0.44)
    t_b = t_ht + u(0.12, 0.17)
    t_arch = t_b + u(0.12, 0.2)
    k_ht = int(np.rint(t_ht * (S - 1)))
    k_b = max(int(np.rint(t_b * (S - 1))), k_ht + 3)
    k_arch = min(max(int(np.rint(t_arch * (S - 1))), k_b + 2), S - 2)
    g.update(k_ht=k_ht, k_b=k_b, k_arch=k_arch)

    # contrast and intensities
    g["contrast"] = u(*(spec.indeterminate_contrast_hu if indeterminate else spec.contrast_hu))
    g["systemic"] = g["contrast"] * u(*spec.systemic_ratio)
    g["noise"] = u(*spec.noise_hu)

    # heart: RV (anterior, patient's right) and LV side by side along an axis pointing posterior-left
    g["rv_lv_ratio"] = u(*(spec.rv_lv_ratio_gte_1 if rv_lv_high else spec.rv_lv_ratio_lt_1))
    r_lv = u(4.0, 5.0) * sc
    theta = math.radians(u(20.0, 40.0))
    g["heart"] = {
        "centre": (cy - u(0.2, 0.3) * ay, cx + u(0.1, 0.18) * ax),
        "axis": (math.sin(theta), math.cos(theta)),
        "r_lv": r_lv,
        "r_rv": g["rv_lv_ratio"] * r_lv,
        "wall": 1.5 * sc,
        "septum": 1.5 * sc,
        "phase": u(0.1, 0.2),
    }
    # aorta
    r_a = u(2.6, 3.2) * sc
    g["aorta"] = {
        "ascending": (cy - u(0.05, 0.12) * ay, cx - u(0.14, 0.18) * ax, r_a),
        "descending": (cy + u(0.45, 0.52) * ay, cx + u(0.17, 0.22) * ax, 0.85 * r_a),
    }
    # pulmonary geometry
    g["trunk_radius"] = u(*spec.trunk_radius) * sc
    g["trunk_path"] = (
        (cy - u(0.28, 0.36) * ay, cx + u(0.04, 0.1) * ax),
        (cy - u(0.08, 0.16) * ay, cx + u(0.08, 0.13) * ax),
    )
    g["hila"] = {
        "right": (cy + u(0.0, 0.1) * ay, cx - u(0.33, 0.38) * ax),
        "left": (cy + u(-0.05, 0.05) * ay, cx + u(0.33, 0.38) * ax),
    }
    fov = u(320.0, 380.0)
    g["spacing"] = (round(u(220.0, 280.0) / S, 4), round(fov / size, 4), round(fov / size, 4))
    g["z0"] = round(-u(50.0, 250.0), 2)
    return g


def _path(
    rng: np.random.Generator,
    start: np.ndarray,
    target: np.ndarray,
    n: int,
    *,
    drift: float,
    wobble: float,
) -> np.ndarray:
    """(n, 2) centres: from ``start`` towards ``target`` plus a smooth wobble, steps capped at ``drift``."""
    s = np.linspace(0.0, 1.0, n)[:, None]
    amp = rng.uniform(-1.0, 1.0, (2, 2)) * wobble / 2
    freq = rng.uniform(0.5, 2.0, (2, 2))
    phase = rng.uniform(0.0, 2 * np.pi, (2, 2))
    wob = np.zeros((n, 2))
    for j in range(2):
        wob += amp[j] * (np.sin(np.pi * freq[j] * s + phase[j]) - np.sin(phase[j]))
    p = start + (target - start) * s + wob
    if n > 1:
        d = np.diff(p, axis=0)
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        d *= np.minimum(1.0, drift / np.maximum(norm, 1e-12))
        p = np.concatenate([start[None], start + np.cumsum(d, axis=0)])
    return p


def _project_into(p: np.ndarray, centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """Pull points (n, 2) radially into ellipses (n, 2 semi-axes) about ``centre`` (n, 2) where they lie outside."""
    q = (p - centre) / semi
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    return centre + semi * q / np.maximum(norm, 1.0)


def _lung_ellipses(geo: dict, side: str, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ly, lx, sy, sx = geo["lungs"][side]
    f = geo["lung_profile"][ks][:, None]
    return np.broadcast_to(np.array([ly, lx]), (len(ks), 2)), np.array([sy, sx]) * f


def _draw_vessels(rng: np.random.Generator, spec: CTPASpec, geo: dict) -> list[Vessel]:
    """Trunk, main pulmonary arteries (capsules, stored as '_capsule' records) and the lobar/segmental trees."""
    S, sc, k_ht, k_b = geo["S"], geo["sc"], geo["k_ht"], geo["k_b"]
    drift, wobble = spec.vessel_drift * sc, spec.vessel_wobble * sc
    contrast = geo["contrast"]
    r_t = geo["trunk_radius"]
    out: list[Vessel] = []

    k0 = max(k_ht - 1, 0)
    n = k_b - k0 + 1
    a, b = (np.array(p) for p in geo["trunk_path"])
    centres = _path(rng, a, b, n, drift=drift, wobble=0.25 * wobble)
    radii = r_t * np.linspace(1.0, 0.95, n)
    out.append(Vessel("trunk", "central", k0, centres, radii, contrast * rng.uniform(0.97, 1.03)))
    top = centres[-1]

    for side in ("right", "left"):
        hilum = np.array(geo["hila"][side])
        cap_ks = [k for k in (k_b, k_b + 1) if k < S]
        cap = np.stack([np.concatenate([top, hilum]) for _ in cap_ks])  # (n, 4): y0, x0, y1, x1 per slice
        out.append(Vessel("_capsule", side, cap_ks[0], cap, np.full(len(cap_ks), 0.75 * r_t), contrast))
        lateral = np.pi if side == "right" else 0.0  # the patient's side as an angle in the (y, x) plane
        for label, (lo, hi) in (("up", (0.86, 0.96)), ("down", (0.04, 0.14))):
            k_end = int(np.rint(rng.uniform(lo, hi) * (S - 1)))
            ks = np.arange(k_b + 1, k_end + 1) if label == "up" else np.arange(k_b - 1, k_end - 1, -1)
            ks = ks[(ks >= 0) & (ks < S)]  # slices in the branch's course order
            angle = lateral + rng.uniform(-0.6, 0.6)
            r0 = r_t * rng.uniform(0.65, 0.75)
            r1 = r0 * rng.uniform(0.4, 0.55)
            n_seg = int(rng.integers(spec.segmental_branches[0], spec.segmental_branches[1] + 1))
            seg = rng.uniform(0.0, 1.0, (n_seg, 5))  # branch point, length, side, angle, taper
            if len(ks) < 2:
                continue
            name = f"{side}_lobar_{label}"
            parent = _branch(rng, geo, side, name, ks, hilum, angle, r0, r1, drift, wobble, contrast)
            out.append(parent)
            for m in range(n_seg):
                at = int(len(ks) * (0.1 + 0.5 * seg[m, 0]))
                ks_c = ks[at:]
                ks_c = ks_c[: max(3, int(np.rint(len(ks_c) * (0.6 + 0.4 * seg[m, 1]))))]
                if len(ks_c) < 3:
                    continue
                row = int(ks_c[0]) - parent.start
                rp = 0.8 * float(parent.radii[row])
                turn = (1.0 if seg[m, 2] < 0.5 else -1.0) * (0.5 + 0.7 * seg[m, 3])
                child_name = f"{name}_seg_{m}"
                child = _branch(
                    rng,
                    geo,
                    side,
                    child_name,
                    ks_c,
                    parent.centres[row],
                    angle + turn,
                    rp,
                    rp * (0.4 + 0.15 * seg[m, 4]),
                    drift,
                    wobble,
                    contrast,
                )
                out.append(child)
    return out


def _branch(
    rng: np.random.Generator,
    geo: dict,
    side: str,
    name: str,
    ks: np.ndarray,
    start: np.ndarray,
    angle: float,
    r0: float,
    r1: float,
    drift: float,
    wobble: float,
    contrast: float,
) -> Vessel:
    """A branch along slices ``ks`` (in course order) from ``start`` towards a peripheral lung point."""
    n = len(ks)
    lc, semi = _lung_ellipses(geo, side, ks[-1:])
    rho = rng.uniform(0.35, 0.75)
    target = lc[0] + rho * semi[0] * np.array([math.sin(angle), math.cos(angle)])
    centres = _path(rng, np.asarray(start, float), target, n, drift=drift, wobble=wobble)
    radii = np.maximum(np.linspace(r0, r1, n), 0.75)  # at least the pixel nearest the centre
    lc, semi = _lung_ellipses(geo, side, ks)
    centres = _project_into(centres, lc, np.maximum(semi * 0.9 - (radii[:, None] + 1.0), 1.0))
    order = np.argsort(ks)
    hu = contrast * rng.uniform(0.94, 1.02)
    return Vessel(name, side, int(ks.min()), centres[order], radii[order], hu)


def _capsule_distance(py: np.ndarray, px: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Distance from points to the segment seg = (y0, x0, y1, x1)."""
    y0, x0, y1, x1 = seg
    dy, dx = y1 - y0, x1 - x0
    L2 = max(dy * dy + dx * dx, 1e-12)
    t = np.clip(((py - y0) * dy + (px - x0) * dx) / L2, 0.0, 1.0)
    return np.hypot(py - y0 - t * dy, px - x0 - t * dx)


def _hostable(spec: CTPASpec, geo: dict, vessels: list[Vessel]) -> dict[str, np.ndarray]:
    """Per pulmonary artery, a bool per slice: wide enough and clear of every other pulmonary artery."""
    sc = geo["sc"]
    min_r = spec.min_host_radius * sc
    out: dict[str, np.ndarray] = {}
    for v in vessels:
        if v.name == "_capsule":
            continue
        ok = v.radii >= min_r
        for j, k in enumerate(v.slices):
            if not ok[j]:
                continue
            if v.name == "trunk" and not geo["k_ht"] < k < geo["k_b"]:
                ok[j] = False
                continue
            cy, cx = v.centres[j]
            reach = _DISTENSION * v.radii[j] + 0.5 * sc
            for w in vessels:
                if w is v or k not in w.slices:
                    continue
                row = k - w.start
                if w.name == "_capsule":
                    d = float(_capsule_distance(np.array(cy), np.array(cx), w.centres[row]))
                else:
                    d = float(np.hypot(*(w.centres[row] - (cy, cx))))
                if d < reach + w.radii[row]:
                    ok[j] = False
                    break
        out[v.name] = ok
    return out


def _run_lengths(rng: np.random.Generator, spec: CTPASpec, S: int) -> list[int]:
    """Lengths of the emboli of a positive exam: disjoint runs adding up to 5–15 % of the slices."""
    lo_len, hi_len = spec.embolus_length
    lo = max(lo_len, math.ceil(spec.positive_slice_share[0] * S))
    hi = max(lo, math.floor(spec.positive_slice_share[1] * S))
    total = int(rng.integers(lo, hi + 1))
    k_min, k_max = math.ceil(total / hi_len), max(1, total // lo_len)
    k = k_max if k_min > k_max else int(rng.integers(k_min, k_max + 1))  # runs never shorter than ``lo_len``
    lengths = np.full(k, min(lo_len, total // k))
    for _ in range(total - int(lengths.sum())):
        room = np.flatnonzero(lengths < hi_len)
        if not len(room):
            break
        lengths[rng.choice(room)] += 1
    return [int(x) for x in lengths]


def _place_emboli(
    rng: np.random.Generator, spec: CTPASpec, geo: dict, vessels: list[Vessel], pe_type: str
) -> tuple[list[Embolus], list[dict]]:
    """Choose host arteries and slices for each run, their kinds and shapes; narrow/widen the hosts' radii."""
    S = geo["S"]
    host = _hostable(spec, geo, vessels)
    by_name = {v.name: v for v in vessels if v.name != "_capsule"}
    used = np.zeros(S + 2, bool)  # slice k is used[k + 1]; runs keep one free slice between them
    lengths = _run_lengths(rng, spec, S)
    probs = np.array(spec.location_probs)
    placed: list[tuple[str, Vessel, int, int]] = []
    for length in lengths:
        choice = None
        first = LOCATIONS[int(rng.choice(len(LOCATIONS), p=probs))]
        others = sorted((loc for loc in LOCATIONS if loc != first), key=lambda loc: -probs[LOCATIONS.index(loc)])
        order = [first] + [loc for loc in others if probs[LOCATIONS.index(loc)] > 0]
        for ln in range(length, spec.embolus_length[0] - 1, -1):
            for loc in order:
                cands = []
                for v in by_name.values():
                    if v.location != loc:
                        continue
                    ok = host[v.name]
                    for j in range(len(ok) - ln + 1):
                        k = v.start + j
                        if ok[j : j + ln].all() and not used[k : k + ln + 2].any():
                            cands.append((v, k))
                if cands:
                    v, k = cands[int(rng.integers(len(cands)))]
                    choice = (loc, v, k, ln)
                    break
            if choice is not None:
                break
        if choice is None:
            continue
        loc, v, k, ln = choice
        used[k + 1 : k + ln + 1] = True
        placed.append(choice)

    # kinds per slice
    n = len(placed)
    kinds_per: list[list[str]] = []
    if pe_type == "acute_and_chronic" and n >= 2:
        chronic_ids = set(rng.choice(n, size=int(rng.integers(1, n)), replace=False).tolist())
        kinds_per = [["chronic" if i in chronic_ids else "acute"] * ln for i, (_, _, _, ln) in enumerate(placed)]
    elif pe_type == "acute_and_chronic" and n == 1:
        ln = placed[0][3]
        n_chronic = max(1, ln // 2)
        kinds_per = [["chronic"] * n_chronic + ["acute"] * (ln - n_chronic)]
    else:
        kinds_per = [[("chronic" if pe_type == "chronic" else "acute")] * ln for (_, _, _, ln) in placed]

    emboli: list[Embolus] = []
    plans: list[dict] = []
    sc = geo["sc"]
    for (loc, v, k, ln), kinds in zip(placed, kinds_per):
        hu = float(rng.uniform(*spec.defect_hu))
        size = rng.uniform(*spec.embolus_size, ln)
        narrowing = rng.uniform(*spec.chronic_narrowing, ln)
        offset_angle = rng.uniform(0.0, 2 * np.pi, ln)
        offset_frac = rng.uniform(0.0, 0.1, ln)
        cap_jitter = rng.uniform(-np.pi / 4, np.pi / 4, ln)
        for j, kind in enumerate(kinds):
            row = k + j - v.start
            r = float(v.radii[row])
            c = v.centres[row].copy()
            if kind == "acute":
                r_l = _DISTENSION * r
                off = offset_frac[j] * r_l
                r_d = float(np.clip(size[j] * r_l, 0.75 * sc, max(r_l - 1.05 - off, 0.6)))
                centre = c + off * np.array([math.sin(offset_angle[j]), math.cos(offset_angle[j])])
                plans.append({"slice": k + j, "kind": "acute", "centre": centre, "radius": r_d, "hu": hu})
            else:
                r_l = max(narrowing[j] * r, 1.2 * sc)
                away = _away_from_neighbours(geo, vessels, v, k + j, c)
                ang = math.atan2(away[0], away[1]) + cap_jitter[j]
                u = np.array([math.sin(ang), math.cos(ang)])
                h = min(max(1.0, size[j] * r_l), r_l)
                plans.append({"slice": k + j, "kind": "chronic", "centre": c, "axis": u, "depth": r_l - h, "hu": hu})
            v.radii[row] = r_l
            plans[-1]["lumen"] = (c, r_l)
        emboli.append(Embolus(loc, v.name, k, ln, tuple(kinds), hu))
    emboli.sort(key=lambda e: e.start)
    return emboli, plans


def _away_from_neighbours(geo: dict, vessels: list[Vessel], v: Vessel, k: int, c: np.ndarray) -> np.ndarray:
    """Unit vector from the nearest other contrast structure (artery, aorta, heart) towards ``c``."""
    best, vec = math.inf, None
    points = []
    for w in vessels:
        if w is v or k not in w.slices:
            continue
        row = k - w.start
        if w.name == "_capsule":
            y0, x0, y1, x1 = w.centres[row]
            t = np.clip(np.dot(c - (y0, x0), (y1 - y0, x1 - x0)) / max((y1 - y0) ** 2 + (x1 - x0) ** 2, 1e-12), 0, 1)
            points.append((np.array([y0 + t * (y1 - y0), x0 + t * (x1 - x0)]), w.radii[row]))
        else:
            points.append((w.centres[row], w.radii[row]))
    for key in ("ascending", "descending"):
        ay, ax_, ar = geo["aorta"][key]
        points.append((np.array([ay, ax_]), ar))
    if k <= geo["k_ht"]:
        points.append((np.array(geo["heart"]["centre"]), geo["heart"]["r_lv"]))
    for p, r in points:
        d = float(np.hypot(*(c - p))) - r
        if d < best:
            best, vec = d, c - p
    if vec is None or not np.any(vec):
        return np.array([1.0, 0.0])
    return vec / np.linalg.norm(vec)


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _ellipse(yy, xx, cy, cx, sy, sx) -> np.ndarray:
    return ((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2 <= 1.0


def _paint_disks(vol: np.ndarray, start: int, centres: np.ndarray, radii: np.ndarray, value: float) -> None:
    """Paint one disk per slice ``start + j`` (centre (y, x), radius) with ``value``, within its bounding box."""
    n, (H, W) = len(radii), vol.shape[1:]
    if n == 0:
        return
    rmax = float(radii.max())
    y0 = max(math.floor(centres[:, 0].min() - rmax), 0)
    y1 = min(math.ceil(centres[:, 0].max() + rmax) + 1, H)
    x0 = max(math.floor(centres[:, 1].min() - rmax), 0)
    x1 = min(math.ceil(centres[:, 1].max() + rmax) + 1, W)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float64)[None, :, None]
    xx = np.arange(x0, x1, dtype=np.float64)[None, None, :]
    mask = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2 <= radii[:, None, None] ** 2
    np.copyto(vol[start : start + n, y0:y1, x0:x1], np.float32(value), where=mask)


def _render(
    rs: dict[str, np.random.Generator], spec: CTPASpec, geo: dict, vessels: list[Vessel], plans: list[dict]
) -> tuple[np.ndarray, np.ndarray]:
    S, size, sc = geo["S"], geo["size"], geo["sc"]
    vol = np.full((S, size, size), AIR_HU, np.float32)
    yy = np.arange(size, dtype=np.float32)[None, :, None]
    xx = np.arange(size, dtype=np.float32)[None, None, :]
    col = np.ones((S, 1, 1), np.float32)

    # body, fat rim, soft tissue
    bp = geo["body_profile"].astype(np.float32)[:, None, None]
    ay, ax = geo["ay"] * bp, geo["ax"] * bp
    body = _ellipse(yy, xx, geo["cy"], geo["cx"], ay, ax)
    vol[body] = geo["fat"]
    inner = _ellipse(yy, xx, geo["cy"], geo["cx"], ay - geo["fat_w"], ax - geo["fat_w"])
    vol[inner] = geo["soft"]

    # lungs with texture and a small antero-posterior gradient
    lung = np.zeros_like(inner)
    lp = geo["lung_profile"].astype(np.float32)[:, None, None]
    for side in ("right", "left"):
        ly, lx, sy, sx = geo["lungs"][side]
        lung |= _ellipse(yy, xx, ly * col, lx * col, sy * lp, sx * lp)
    wall = geo["fat_w"] + geo["wall_w"]  # the chest wall keeps the lungs off the fat rim
    lung &= _ellipse(yy, xx, geo["cy"], geo["cx"], ay - wall, ax - wall)
    tex_rng = rs["texture"]
    field = ndimage.gaussian_filter(
        tex_rng.standard_normal((S, size, size), dtype=np.float32), sigma=(0.7, 1.5 * sc, 1.5 * sc), mode="wrap"
    )
    field *= spec.lung_texture_hu / max(float(field.std()), 1e-6)
    gradient = 25.0 * (yy - geo["cy"]) / geo["ay"]
    lung_hu = geo["lung"] + field + gradient
    vol[lung] = lung_hu[lung]

    # spine
    sy_, sx_, sr = geo["spine"]
    _paint_disks(vol, 0, np.tile([sy_, sx_], (S, 1)), np.full(S, sr), geo["bone"])

    # heart on slices 0 … k_ht
    h = geo["heart"]
    k_ht = geo["k_ht"]
    nh = k_ht + 1
    tt = np.linspace(0.0, 1.0, nh)
    prof = 0.55 + 0.45 * np.sin(np.pi * (h["phase"] + (1 - h["phase"]) * tt))
    u = np.array(h["axis"])
    hc = np.array(h["centre"])
    r_rv, r_lv = h["r_rv"] * prof, h["r_lv"] * prof
    extent = 2 * r_rv + 2 * r_lv + h["septum"]
    c_rv = hc[None] + u[None] * (-extent / 2 + r_rv)[:, None]
    c_lv = hc[None] + u[None] * (extent / 2 - r_lv)[:, None]
    heart_block = vol[:nh].copy()
    _paint_disks(heart_block, 0, c_rv, r_rv + h["wall"], _MYOCARDIUM_HU)
    _paint_disks(heart_block, 0, c_lv, r_lv + h["wall"], _MYOCARDIUM_HU)
    _paint_disks(heart_block, 0, c_rv, r_rv, geo["contrast"] * 0.97)
    _paint_disks(heart_block, 0, c_lv, r_lv, geo["systemic"])
    np.copyto(vol[:nh], heart_block, where=inner[:nh])

    # aorta: descending (0 … arch), ascending (heart top - 2 … arch), arch capsule above
    k_arch = geo["k_arch"]
    dy, dx, dr = geo["aorta"]["descending"]
    ay_, ax_, ar = geo["aorta"]["ascending"]
    _paint_disks(vol, 0, np.tile([dy, dx], (k_arch + 1, 1)), np.full(k_arch + 1, dr), geo["systemic"])
    k_as = max(k_ht - 2, 0)
    _paint_disks(
        vol, k_as, np.tile([ay_, ax_], (k_arch - k_as + 1, 1)), np.full(k_arch - k_as + 1, ar), geo["systemic"]
    )
    yy2, xx2 = yy[0], xx[0]
    for k in range(k_arch + 1, min(k_arch + 3, S)):
        d = _capsule_distance(yy2, xx2, np.array([ay_, ax_, dy, dx]))
        vol[k][d <= 0.9 * ar] = geo["systemic"]

    # pulmonary arteries: trunk, main arteries (capsules), lobar and segmental branches
    for v in vessels:
        if v.name == "_capsule":
            for j, k in enumerate(v.slices):
                d = _capsule_distance(yy2, xx2, v.centres[j])
                vol[k][d <= v.radii[j]] = v.hu
        else:
            _paint_disks(vol, v.start, v.centres, v.radii, v.hu)

    # emboli
    masks = np.zeros((S, size, size), bool)
    for p in plans:
        k = p["slice"]
        c, r_l = p["lumen"]
        lumen = (yy2 - c[0]) ** 2 + (xx2 - c[1]) ** 2 <= r_l**2
        if p["kind"] == "acute":
            cd = p["centre"]
            m = ((yy2 - cd[0]) ** 2 + (xx2 - cd[1]) ** 2 <= p["radius"] ** 2) & lumen
            if not m.any():
                m = np.zeros_like(lumen)
                m[int(np.rint(cd[0])), int(np.rint(cd[1]))] = True
        else:
            ax_u = p["axis"]
            proj = (yy2 - c[0]) * ax_u[0] + (xx2 - c[1]) * ax_u[1]
            m = lumen & (proj >= p["depth"])
            if not m.any():
                m = lumen & (proj >= proj[lumen].max()) if lumen.any() else m
            if not m.any():
                m = np.zeros_like(lumen)
                m[int(np.rint(c[0])), int(np.rint(c[1]))] = True
        vol[k][m] = p["hu"]
        masks[k] |= m

    if spec.blur_sigma > 0:
        vol = ndimage.gaussian_filter(vol, sigma=(0.0, spec.blur_sigma * sc, spec.blur_sigma * sc))
    noise = rs["noise"].standard_normal((S, size, size), dtype=np.float32)
    vol += np.float32(geo["noise"]) * noise
    np.rint(vol, out=vol)
    np.clip(vol, *HU_RANGE, out=vol)
    return vol.astype(np.int16), masks


# ---------------------------------------------------------------------------------------------------------------
# helpers for the recipe


def window(volume: np.ndarray, level: float = 100.0, width: float = 700.0) -> np.ndarray:
    """Map HU to [0, 1] float32: ``level - width/2`` → 0, ``level + width/2`` → 1, clipped (default [-250, 450])."""
    if not (math.isfinite(float(width)) and float(width) > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if not math.isfinite(float(level)):
        raise ValueError(f"level must be finite, got {level!r}")
    lo = float(level) - float(width) / 2
    out = (np.asarray(volume, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def lung_bbox(
    volume: np.ndarray, *, air_hu: float = -400.0, margin: int = 2, min_voxels: int = 20
) -> tuple[int, int, int, int]:
    """Half-open box (y0, y1, x0, x1) around air-like voxels inside the body, over all slices.

    ``volume`` is (H, W) or (S, H, W) in HU. Air-like voxels (< ``air_hu``) connected in-plane to the slice border
    are outside the body and ignored; the rest are taken as lung. The box grows by ``margin`` pixels and is clipped
    to the slice. With fewer than ``min_voxels`` lung voxels (no lung, e.g. abdomen-only slices) it is the whole
    slice ``(0, H, 0, W)``.
    """
    vol = np.asarray(volume)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3 or 0 in vol.shape:
        raise ValueError(f"volume must be a non-empty (H, W) or (S, H, W) array, got shape {np.shape(volume)}")
    _, H, W = vol.shape
    air = vol < air_hu
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # in-plane 4-connectivity: no leaks through diagonals
    labels, _ = ndimage.label(air, structure=structure)
    border = np.unique(
        np.concatenate(
            [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    lung = air & ~np.isin(labels, border)
    if int(lung.sum()) < min_voxels:
        return 0, H, 0, W
    ys = np.flatnonzero(lung.any(axis=(0, 2)))
    xs = np.flatnonzero(lung.any(axis=(0, 1)))
    m = max(int(margin), 0)
    return max(int(ys[0]) - m, 0), min(int(ys[-1]) + 1 + m, H), max(int(xs[0]) - m, 0), min(int(xs[-1]) + 1 + m, W)


#: the settings (defect HU low, defect HU high, contrast HU) the trivial baseline chooses from on validation; the
#: first is :func:`defect_fraction`'s default. Partial volume (``blur_sigma``) lifts small defects above 80 HU and
#: dims thin arteries below 200 HU, so no single setting suits every generator.
DEFECT_FRACTION_GRID: tuple[tuple[float, float, float], ...] = tuple(
    (30.0, hi, c) for c in (150.0, 200.0) for hi in (80.0, 120.0, 160.0, 200.0)
)


def defect_fraction_grid(
    volume: np.ndarray, grid: tuple[tuple[float, float, float], ...] = DEFECT_FRACTION_GRID
) -> np.ndarray:
    """:func:`defect_fraction` under every setting of ``grid``: float64 (S, G) for an (S, H, W) volume."""
    if not grid:
        raise ValueError("grid must hold at least one (defect HU low, defect HU high, contrast HU) setting")
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be (S, H, W), got shape {np.shape(volume)}")
    regions: dict[float, np.ndarray] = {}  # the enclosed region depends on the contrast threshold only
    columns = []
    for lo, hi, c in grid:
        if c not in regions:
            regions[c] = _enclosed_region(vol, c, 1)
        columns.append(_fraction_in(vol, regions[c], (lo, hi)))
    return np.stack(columns, axis=1)


def defect_fraction(
    volume: np.ndarray,
    *,
    hu_range: tuple[float, float] = (30.0, 80.0),
    contrast_hu: float = 150.0,
    closing: int = 1,
) -> np.ndarray:
    """A training-free per-slice PE score: the share of the contrast-enclosed region that looks like a defect.

    Per slice: the contrast mask (HU >= ``contrast_hu``) is closed in-plane ``closing`` times (3×3) and its holes
    are filled, so the region covers the lumens and anything they enclose; the score is the fraction of that
    region's voxels with HU in ``hu_range`` (0 for a slice without contrast). Returns float64 (S,) for an
    (S, H, W) volume, (1,) for one (H, W) slice. It is imperfect on purpose: wall-adherent (chronic) defects are
    not enclosed, small defects barely move the fraction of a slice full of vessels, and soft tissue trapped
    between neighbouring vessels looks like a defect (slice-level AUC ≈ 0.95 on default cohorts).
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3:
        raise ValueError(f"volume must be (H, W) or (S, H, W), got shape {np.shape(volume)}")
    if isinstance(closing, bool) or int(closing) != closing or closing < 0:
        raise ValueError(f"closing must be a non-negative integer, got {closing!r}")
    return _fraction_in(vol, _enclosed_region(vol, contrast_hu, int(closing)), hu_range)


def _enclosed_region(vol: np.ndarray, contrast_hu: float, closing: int) -> np.ndarray:
    """(S, H, W) bool: the contrast mask closed in-plane ``closing`` times (3×3), its holes filled."""
    square = np.zeros((3, 3, 3), bool)
    square[1] = True  # in-plane only
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndimage.generate_binary_structure(2, 1)
    region = vol >= contrast_hu
    if closing > 0:
        region = ndimage.binary_closing(region, structure=square, iterations=closing)
    return ndimage.binary_fill_holes(region, structure=cross)


def _fraction_in(vol: np.ndarray, region: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """(S,) float64: per slice, the share of ``region`` with HU in ``hu_range`` (0 where the region is empty)."""
    lo, hi = (float(v) for v in hu_range)
    hits = region & (vol >= lo) & (vol <= hi)
    n_region = region.sum(axis=(1, 2))
    return np.where(n_region > 0, hits.sum(axis=(1, 2)) / np.maximum(n_region, 1), 0.0).astype(np.float64)


__all__ = [
    "DEFECT_FRACTION_GRID",
    "EXAM_LABELS",
    "LOCATIONS",
    "CTPASpec",
    "Embolus",
    "Exam",
    "Vessel",
    "defect_fraction",
    "defect_fraction_grid",
    "generate",
    "generate_exam",
    "lung_bbox",
    "window",
]
