"""A procedural 3-D chest-CT phantom for the Models Genesis / Semantic Genesis / TransVW recipe.

Models Genesis (Zhou et al., MedIA 2021, arXiv 2004.07882), Semantic Genesis (Haghighi et al., MICCAI 2020) and
TransVW (Haghighi et al., IEEE TMI 2021) pretrain 3-D networks by self-supervision on unlabelled chest CT and
then fine-tune them on target tasks, among them lung-nodule false-positive reduction (classify candidate cubes:
true nodule or not) and nodule segmentation. Real CT (LUNA16, LIDC-IDRI) cannot be shipped with this package,
so this module draws a small chest CT per "patient" from a seeded random generator, with everything those
tasks need: a volume in Hounsfield units, an organ label map, a lung mask, nodules with their mask and a list of
nodule candidates, most of them false positives on vessels.

Geometry and axes. A volume has shape (D, H, W) = (z, y, x), 48 × 64 × 64 by default, ``float32`` HU. Axis
directions follow DICOM's LPS: z grows towards the head (superior), y towards the back (posterior), x towards
the patient's left, so an axial slice ``volume[k]`` shown with ``imshow`` is in the radiological convention
(patient's right on the image's left, anterior at the top). Anatomy is defined in a canonical frame whose
lengths are fractions of the field of view (organs) or voxels (tubes, nodules), and every patient is the
canonical anatomy under a pose: scale ``s`` (±10 %), rotation about z (±8°), a small tilt about x (±3°) and a
shift (±4 voxels per axis), all about the volume centre: ``p = c + t + s · R · q``. Geometry is isotropic in
voxels; the voxel spacing (default (2.5, 1.5, 1.5) mm, z first) is metadata, recorded in every
:class:`Patient` and written into the NIfTI affine, not a physical model (the phantom is a miniature chest).

What is modelled, per patient (anatomy, pose, intensities and noise all vary, the layout never does):

- air (-1000 HU) around an elliptic body (soft tissue 40 ± 10 HU) with a subcutaneous fat rim (-100 HU,
  1.6–2.6 voxels) and a chest-wall muscle layer that is thicker at the back;
- two lungs (-850 HU, smooth Gaussian texture σ 30 HU, +-25 HU antero-posterior gravity gradient) filling the
  rib cage, with apices, diaphragmatic domes (the right higher), costophrenic recesses and a cardiac notch;
- pulmonary vessel trees (≈ 40 HU), grown by recursive random branching from each hilum (Murray's law for
  child radii, a large child that deviates little and a small one that deviates more), rasterised as tapered
  capsules with partial-volume occupancy, pruned where they would leave the lung;
- the airway: trachea, carina, main and lobar bronchi, air-filled with a thin soft-tissue wall;
- the heart (myocardium ≈ 40 HU, blood pool ≈ 50 HU), the aorta (ascending, arch, descending left of the spine);
- the spine (vertebral bodies of cancellous bone 400–700 HU with a 1000 HU cortex, discs, canal, arch, spinous
  and transverse processes), ribs (≈ 700 HU) as inclined curved tubes around the thorax, and a sternum;
- optional nodules (radius 1.5–5 voxels, mildly lobulated; some spiculated with thin spikes): solid (0–100 HU),
  ground-glass (−700 to −300 HU) or part-solid (ground glass around a solid core of 30–60 % of the radius);
  free in the parenchyma, juxta-vascular (touching a vessel) or juxta-pleural (cut by the chest wall);
- blob-like vessel segments: short thick capsules (radius 2–3) at bifurcations, the nodule mimics of real CT;
- nodule candidates for false-positive reduction: every nodule centre (label 1) and false positives (label 0)
  at vessel bifurcations, vessel crossings, vessel segments, vessel blobs, intrapulmonary bronchi and the
  pleura. The hard ones exist so that no training-free rule solves the task: the mean of the central 3×3×3
  voxels, 99.9 test AUC on version 1 of this phantom, gives 71.9 AUC on the Genesis recipe's validation
  patients (:mod:`thrifty.methods.genesis.trivial`; a test keeps it at or below 80);
- a Gaussian blur (σ 0.5 voxel) standing in for the scanner's point-spread function and spatially correlated
  Gaussian noise (σ 20 HU ± 25 % per patient).

What it does not model: real anatomy or its statistics (organ shapes are ellipses, capsules and parabolic
domes; no liver, stomach, oesophagus, great veins, lymph nodes, scapulae, clavicles, fissures or lobes),
real parenchymal or bone texture, partial-volume effects beyond the blur and the soft rasterisation, any
artefact (motion, breathing, beam hardening, streaks, metal, truncation rings), contrast agents, scanner or
reconstruction-kernel differences, physical anisotropy of the voxels, and cavitary or calcified nodules. It is a
test bed with the structure of the target tasks, not a substitute for LUNA16 / LIDC-IDRI.

Determinism: patient ``index`` of ``seed`` is always the same volume: each patient has its own
``numpy.random.SeedSequence([seed, index])``, split into independent streams for the pose, the anatomy, the
vessels, the nodules, the noise and the candidates, so switching nodules off leaves the anatomy untouched.

Caching: :func:`cached_cohort` keeps one ``.npz`` per patient under ``root/ct_phantom-<digest>``, where the
digest covers the seed, the shape, ``with_nodules``, every :class:`PhantomConfig` field and the generator
version, so a changed configuration never reuses stale files. :func:`write_cohort` / :func:`read_patient`
are the file format; :func:`to_nifti` writes a volume (or a label map) for other tools.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

VERSION = 2  # 2: ground-glass / part-solid, small and juxta-vascular / juxta-pleural nodules; vessel blobs

AIR, BODY, FAT, LUNG, VESSEL, AIRWAY, HEART, AORTA, BONE, NODULE = range(10)
LABELS: dict[int, str] = {
    AIR: "air",
    BODY: "body",  # soft tissue: muscle, mediastinum, abdomen below the diaphragm, discs, cord, bronchial walls
    FAT: "fat",  # subcutaneous fat rim
    LUNG: "lung",  # lung parenchyma
    VESSEL: "vessel",  # intrapulmonary vessels
    AIRWAY: "airway",  # airway lumen (trachea, main and lobar bronchi); the walls are BODY
    HEART: "heart",  # myocardium and blood pool
    AORTA: "aorta",
    BONE: "bone",  # spine (bodies and posterior elements), ribs, sternum
    NODULE: "nodule",
}
CANDIDATE_KINDS = ("nodule", "bifurcation", "crossing", "vessel", "blob", "airway", "pleura")
NODULE_TYPES = ("solid", "ground_glass", "part_solid")
ATTACHMENTS = ("none", "vascular", "pleural")
DEFAULT_SHAPE = (48, 64, 64)
DEFAULT_SPACING = (2.5, 1.5, 1.5)
AIR_HU = -1000.0
_HU_RANGE = (-1024.0, 3071.0)  # what a 12-bit CT stores
_FP_WEIGHTS = {"bifurcation": 0.3, "crossing": 0.15, "vessel": 0.15, "blob": 0.25, "airway": 0.05, "pleura": 0.1}

PathLike = str | os.PathLike[str]


class PhantomError(ValueError):
    """A bad phantom argument or cache file; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """Everything that shapes a cohort besides its seed, shape and ``with_nodules`` (all part of the cache key).

    Attributes:
        spacing: voxel size (z, y, x) in mm, recorded and written to NIfTI (metadata only).
        scale_jitter: the pose scale is ``1 ± scale_jitter`` (uniform).
        rotation_deg: rotation about the z axis, uniform in ± this.
        tilt_deg: rotation about the x (left-right) axis, uniform in ± this.
        shift_vox: shift per axis, uniform in ± this many voxels.
        shape_jitter: relative jitter of organ sizes and positions in the canonical frame.
        intensity_jitter_hu: per-patient offset of each tissue's mean HU, uniform in ± this.
        noise_hu: standard deviation of the correlated Gaussian noise.
        noise_jitter: the noise σ of a patient is ``noise_hu · (1 ± noise_jitter)``.
        blur_sigma: Gaussian point-spread function in voxels (0 switches it off).
        nodules_per_patient: inclusive range of the number of nodules when nodules are on (fewer only if the
            lungs have no room left, which the defaults never hit in practice).
        nodule_radius: range of nodule radii in voxels (the default's lower end makes about a fifth of the nodules
            small, radius 1.5–2.5, barely thicker than the largest vessels).
        nodule_hu: range of a solid nodule's (and a part-solid nodule's core's) mean HU.
        spiculated_fraction: probability that a nodule is spiculated.
        ground_glass_fraction: probability that a nodule is subsolid: hazy, ``ground_glass_hu``, below vessel
            density; of those, ``part_solid_fraction`` get a solid core of 30–60 % of the radius.
        juxta_vascular_fraction, juxta_pleural_fraction: probabilities that a nodule is placed touching a vessel
            (its surface half a voxel from a vessel voxel) or the pleura (the chest wall cuts it), instead of free
            in the parenchyma.
        blobs_per_patient: inclusive range of blob-like vessel segments: short thick capsules (radius
            ``blob_radius``, 1–5 voxels long, along the parent vessel) at bifurcations, the nodule mimics of real CT;
            each is a false-positive candidate of kind "blob".
        false_positives: false-positive candidates per patient (fewer if the pools run dry).
        vessel_min_radius: vessels thinner than this (voxels) stop branching.
        vessel_max_depth: branching generations after the trunks.
    """

    spacing: tuple[float, float, float] = DEFAULT_SPACING
    scale_jitter: float = 0.10
    rotation_deg: float = 8.0
    tilt_deg: float = 3.0
    shift_vox: float = 4.0
    shape_jitter: float = 0.04
    intensity_jitter_hu: float = 10.0
    noise_hu: float = 20.0
    noise_jitter: float = 0.25
    blur_sigma: float = 0.5
    nodules_per_patient: tuple[int, int] = (1, 3)
    nodule_radius: tuple[float, float] = (1.5, 5.0)
    nodule_hu: tuple[float, float] = (10.0, 90.0)
    spiculated_fraction: float = 0.3
    ground_glass_fraction: float = 0.35
    ground_glass_hu: tuple[float, float] = (-700.0, -300.0)
    part_solid_fraction: float = 0.5
    juxta_vascular_fraction: float = 0.25
    juxta_pleural_fraction: float = 0.2
    blobs_per_patient: tuple[int, int] = (4, 8)
    blob_radius: tuple[float, float] = (2.0, 3.0)
    false_positives: int = 24
    vessel_min_radius: float = 0.4
    vessel_max_depth: int = 10

    def __post_init__(self) -> None:
        for name in (
            "spacing",
            "nodules_per_patient",
            "nodule_radius",
            "nodule_hu",
            "ground_glass_hu",
            "blobs_per_patient",
            "blob_radius",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in self.spacing):
            raise PhantomError(f"spacing must be three positive numbers (z, y, x) in mm, got {self.spacing}")
        if not 0 <= self.scale_jitter < 0.5:
            raise PhantomError(f"scale_jitter must be in [0, 0.5), got {self.scale_jitter}")
        for name in ("rotation_deg", "tilt_deg", "shift_vox", "shape_jitter", "intensity_jitter_hu", "noise_hu"):
            if getattr(self, name) < 0:
                raise PhantomError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.noise_jitter < 1 or self.blur_sigma < 0 or self.shape_jitter >= 0.2:
            raise PhantomError("need 0 <= noise_jitter < 1, blur_sigma >= 0 and shape_jitter < 0.2")
        lo, hi = self.nodules_per_patient
        if not 0 <= lo <= hi:
            raise PhantomError(f"nodules_per_patient must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        rlo, rhi = self.nodule_radius
        if not 1.0 <= rlo <= rhi <= 8.0:
            raise PhantomError(f"nodule_radius must be (lo, hi) with 1 <= lo <= hi <= 8 voxels, got {(rlo, rhi)}")
        if self.nodule_hu[0] > self.nodule_hu[1] or not 0 <= self.spiculated_fraction <= 1:
            raise PhantomError("nodule_hu must be (lo, hi) with lo <= hi and spiculated_fraction in [0, 1]")
        if not -1000 < self.ground_glass_hu[0] <= self.ground_glass_hu[1] < 0:
            raise PhantomError(
                f"ground_glass_hu must be (lo, hi) with -1000 < lo <= hi < 0, got {self.ground_glass_hu}"
            )
        for name in (
            "ground_glass_fraction",
            "part_solid_fraction",
            "juxta_vascular_fraction",
            "juxta_pleural_fraction",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise PhantomError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.juxta_vascular_fraction + self.juxta_pleural_fraction > 1:
            raise PhantomError("juxta_vascular_fraction + juxta_pleural_fraction must be at most 1")
        b_lo, b_hi = self.blobs_per_patient
        if not 0 <= b_lo <= b_hi or not 1.0 <= self.blob_radius[0] <= self.blob_radius[1] <= 5.0:
            raise PhantomError("need 0 <= blobs_per_patient lo <= hi and 1 <= blob_radius lo <= hi <= 5 voxels")
        if self.false_positives < 0 or self.vessel_min_radius <= 0 or not 0 <= self.vessel_max_depth <= 12:
            raise PhantomError("need false_positives >= 0, vessel_min_radius > 0 and 0 <= vessel_max_depth <= 12")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhantomConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PhantomError(f"unknown PhantomConfig fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class Pose:
    """How a patient's anatomy sits in the volume: voxel ``p = c + shift + scale · R · q`` for canonical ``q``.

    ``c`` is the volume centre ``(shape - 1) / 2`` and ``R = Rz(yaw) · Rx(tilt)`` acts on (z, y, x) vectors.
    """

    scale: float
    yaw_deg: float
    tilt_deg: float
    shift: tuple[float, float, float]

    def rotation(self) -> np.ndarray:
        """(3, 3) rotation on (z, y, x) column vectors: yaw about z (in the y-x plane) after tilt about x."""
        a, b = math.radians(self.yaw_deg), math.radians(self.tilt_deg)
        rz = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        rx = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
        return rz @ rx

    def to_voxel(self, q: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Canonical offsets q (..., 3) in voxels → voxel coordinates (..., 3), (z, y, x)."""
        centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
        return centre + np.asarray(self.shift) + self.scale * (np.asarray(q, dtype=np.float64) @ self.rotation().T)

    def to_canonical(self, p: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Voxel coordinates p (..., 3) → canonical offsets (..., 3); the inverse of :meth:`to_voxel`."""
        centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
        return (np.asarray(p, dtype=np.float64) - centre - np.asarray(self.shift)) @ self.rotation() / self.scale


@dataclasses.dataclass(frozen=True)
class Nodule:
    """A nodule: integer voxel ``center`` (z, y, x), base ``radius`` in voxels, ``spiculated`` flag, mean ``hu``
    (of the ground glass for a subsolid one), ``type`` (one of :data:`NODULE_TYPES`; a part-solid nodule's core has
    ``core_radius`` and ``core_hu``) and ``attachment`` (one of :data:`ATTACHMENTS`)."""

    center: tuple[int, int, int]
    radius: float
    spiculated: bool
    hu: float
    type: str = "solid"
    attachment: str = "none"
    core_radius: float = 0.0
    core_hu: float = 0.0


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A nodule candidate at voxel ``center`` (z, y, x): ``label`` 1 true nodule, 0 false positive.

    ``kind`` is one of :data:`CANDIDATE_KINDS`: "nodule" for true ones; "bifurcation", "crossing", "vessel"
    (on vessel voxels), "blob" (a blob-like thick vessel segment), "airway" (a bronchus inside the lung) or
    "pleura" (the lung's edge) for false positives.
    """

    center: tuple[int, int, int]
    label: int
    kind: str


@dataclasses.dataclass(eq=False)
class Patient:
    """One phantom patient.

    Attributes:
        index, seed: which patient of which cohort.
        volume: (D, H, W) ``float32`` Hounsfield units.
        labels: (D, H, W) ``uint8`` organ labels, codes in :data:`LABELS`.
        lung_mask: (D, H, W) bool, both lungs including their vessels, bronchi and nodules.
        nodule_mask: (D, H, W) bool, equal to ``labels == NODULE``.
        nodules: the nodules, in placement order.
        candidates: true nodules first (one per nodule, at its centre), then false positives.
        spacing: voxel size (z, y, x) in mm.
        pose: the patient's pose.
        config: the configuration it was generated with.
        with_nodules: whether nodules were asked for.
    """

    index: int
    seed: int
    volume: np.ndarray
    labels: np.ndarray
    lung_mask: np.ndarray
    nodule_mask: np.ndarray
    nodules: list[Nodule]
    candidates: list[Candidate]
    spacing: tuple[float, float, float]
    pose: Pose
    config: PhantomConfig
    with_nodules: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)  # type: ignore[return-value]

    def candidate_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidate centres (n, 3) int64 (z, y, x) and labels (n,) int64."""
        centers = np.array([c.center for c in self.candidates], dtype=np.int64).reshape(-1, 3)
        return centers, np.array([c.label for c in self.candidates], dtype=np.int64)


# --------------------------------------------------------------------------------------------- canonical anatomy


@dataclasses.dataclass
class _Anatomy:
    """Per-patient anatomy in the canonical frame. Positions are fractions of the half field of view (z, y, x),
    thicknesses and tube radii are voxels (already multiplied by the in-plane size factor ``g``)."""

    body_a: float
    body_b: float
    body_y0: float
    body_modes: np.ndarray  # (2, 2): amplitude and phase of the cos 2θ and cos 3θ outline modes
    body_taper: float
    fat_t: float
    musc_t: float
    musc_post: float
    musc_ant: float
    rib_t: float
    rib_zh: float
    rib_pitch: float
    rib_phase: float
    rib_slope: float
    lung_gap: float
    apex_top: np.ndarray  # (2,) right, left
    dome_top: np.ndarray  # (2,) right, left
    medial: float
    heart_c: np.ndarray  # (3,)
    heart_ax: np.ndarray  # (3,) z, long, short
    heart_angle: float
    spine_y: float
    spine_r: float
    vert_pitch: float
    vert_phase: float
    disc_t: float
    aorta: np.ndarray  # (k, 3) polyline
    aorta_r: np.ndarray  # (k,) radius at each vertex
    airway_a: np.ndarray  # (n, 3)
    airway_b: np.ndarray  # (n, 3)
    airway_r: np.ndarray  # (n,) lumen radius
    airway_central: np.ndarray  # (n,) bool: trachea and main bronchi (outside the lungs)
    airway_wall: float
    hilum: np.ndarray  # (2, 3) right, left
    trunk_dirs: np.ndarray  # (t, 3) canonical voxel directions (z, y, x)
    trunk_side: np.ndarray  # (t,) 0 right, 1 left
    trunk_r: np.ndarray  # (t,)
    hu: dict[str, float]


def _sample_anatomy(rng: np.random.Generator, cfg: PhantomConfig, g: float) -> _Anatomy:
    sj = cfg.shape_jitter

    def rel(base: float, k: float = 1.0) -> float:
        return float(base * (1.0 + k * rng.uniform(-sj, sj)))

    def off(base: float, k: float = 1.0) -> float:
        return float(base + k * rng.uniform(-sj, sj))

    aorta = np.array(
        [
            [-0.10, -0.20, -0.02],
            [0.40, -0.20, -0.02],
            [0.55, -0.12, 0.12],
            [0.55, 0.05, 0.19],
            [0.42, 0.14, 0.16],
            [-1.10, 0.14, 0.16],
        ]
    )
    aorta[:, 1:] += rng.uniform(-sj, sj, size=2) * 0.5
    aorta_r = g * np.array([2.0, 2.0, 1.9, 1.8, 1.7, 1.6]) * rel(1.0, 2.0)
    carina = np.array([off(0.30), -0.02, 0.0])
    hilum = np.array([[off(0.14), 0.03, -off(0.22)], [off(0.08), 0.03, off(0.24)]])
    airway_a = np.array([[1.10, -0.02, 0.0], carina, carina, hilum[0], hilum[0], hilum[1], hilum[1]])
    airway_b = np.array(
        [
            carina,
            hilum[0],
            hilum[1],
            [off(0.42), 0.05, -0.36],
            [off(-0.30), 0.16, -0.34],
            [off(0.40), 0.05, 0.37],
            [off(-0.30), 0.16, 0.35],
        ]
    )
    airway_r = g * np.array([1.9, 1.4, 1.3, 0.9, 1.0, 0.9, 1.0]) * rel(1.0, 2.0)
    base_dirs = np.array(
        [
            [1.0, 0.0, 0.35],
            [0.7, 0.6, 0.5],
            [-1.0, 0.55, 0.3],
            [-0.8, -0.45, 0.45],
            [0.05, -0.55, 1.0],
            [0.1, 0.9, 0.6],
        ]
    )
    dirs, sides = [], []
    for side, sign in ((0, -1.0), (1, 1.0)):
        d = base_dirs * np.array([1.0, 1.0, sign]) + rng.normal(0.0, 0.15, size=base_dirs.shape)
        dirs.append(d / np.linalg.norm(d, axis=1, keepdims=True))
        sides += [side] * len(d)
    trunk_dirs = np.concatenate(dirs)
    return _Anatomy(
        body_a=rel(0.82),
        body_b=rel(0.62),
        body_y0=off(0.04, 0.5),
        body_modes=np.array([[rng.uniform(0, 0.03), rng.uniform(0, 2 * np.pi)] for _ in range(2)]),
        body_taper=rng.uniform(0.02, 0.06),
        fat_t=g * rng.uniform(1.6, 2.6),
        musc_t=g * rel(0.8, 2.0),
        musc_post=g * rel(3.5, 2.0),
        musc_ant=g * rel(0.6, 2.0),
        rib_t=g * 1.8,
        rib_zh=g * 1.0,
        rib_pitch=rel(0.33, 2.0),
        rib_phase=rng.uniform(0, 1),
        rib_slope=rel(0.22, 3.0),
        lung_gap=g * 0.4,
        apex_top=np.array([off(0.74, 0.5), off(0.74, 0.5)]),
        dome_top=np.array([off(-0.30), off(-0.42)]),
        medial=0.08,
        heart_c=np.array([off(-0.40), off(-0.17, 0.5), off(0.07, 0.5)]),
        heart_ax=np.array([rel(0.36), rel(0.34), rel(0.24)]),
        heart_angle=math.radians(rng.uniform(28.0, 42.0)),
        spine_y=off(0.24, 0.5),
        spine_r=g * rel(3.8),
        vert_pitch=rel(0.30),
        vert_phase=rng.uniform(0, 1),
        disc_t=g * 1.4,
        aorta=aorta,
        aorta_r=aorta_r,
        airway_a=airway_a,
        airway_b=airway_b,
        airway_r=airway_r,
        airway_central=np.array([True, True, True, False, False, False, False]),
        airway_wall=g * 0.8,
        hilum=hilum + np.array([-0.08, -0.03, 0.0]),
        trunk_dirs=trunk_dirs,
        trunk_side=np.array(sides),
        trunk_r=g * 1.5 * rng.uniform(0.9, 1.1, size=len(sides)),
        hu=_sample_hu(rng, cfg.intensity_jitter_hu),
    )


def _sample_hu(rng: np.random.Generator, j: float) -> dict[str, float]:
    def u(base: float, k: float = 1.0) -> float:
        return float(base + k * rng.uniform(-j, j))

    body = u(40.0)
    blood = body + float(rng.uniform(5.0, 15.0))
    return {
        "body": body,
        "fat": u(-100.0),
        "lung": u(-850.0),
        "vessel": body + float(rng.uniform(0.0, 10.0)),
        "blood": blood,
        "cord": body - 10.0,
        "disc": u(80.0),
        "rib": u(700.0, 5.0),
        "cortex": u(1000.0, 3.0),
        "cancellous": float(rng.uniform(400.0, 700.0)),
        "posterior": u(850.0, 5.0),
    }


def _sample_pose(rng: np.random.Generator, cfg: PhantomConfig) -> Pose:
    scale = 1.0 + float(rng.uniform(-cfg.scale_jitter, cfg.scale_jitter))
    yaw = float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    tilt = float(rng.uniform(-cfg.tilt_deg, cfg.tilt_deg))
    shift = tuple(float(v) for v in rng.uniform(-cfg.shift_vox, cfg.shift_vox, size=3))
    return Pose(scale, yaw, tilt, shift)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- rasterisers


def _rasterise_capsules(
    shape: tuple[int, int, int], a: np.ndarray, b: np.ndarray, ra: np.ndarray, rb: np.ndarray
) -> np.ndarray:
    """Soft occupancy in [0, 1] of tapered capsules, shape (D, H, W) ``float32``.

    Capsule i runs from voxel ``a[i]`` to ``b[i]`` ((n, 3), z y x) with radius ``ra[i]`` → ``rb[i]``; a voxel at
    distance d from the axis gets ``clip(r - d + 0.5, 0, 1)`` (so ``>= 0.5`` means inside). All capsules are
    rasterised together over their bounding boxes (no Python loop) and combined by maximum.
    """
    out = np.zeros(int(np.prod(shape)), dtype=np.float32)
    a = np.asarray(a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 3)
    ra = np.broadcast_to(np.asarray(ra, dtype=np.float64), (len(a),))
    rb = np.broadcast_to(np.asarray(rb, dtype=np.float64), (len(a),))
    if len(a) == 0:
        return out.reshape(shape)
    dims = np.asarray(shape)
    pad = np.maximum(ra, rb)[:, None] + 1.0
    lo = np.clip(np.floor(np.minimum(a, b) - pad).astype(np.int64), 0, dims)
    hi = np.clip(np.ceil(np.maximum(a, b) + pad).astype(np.int64) + 1, 0, dims)
    ext = np.maximum(hi - lo, 0)
    counts = ext.prod(axis=1)
    total = int(counts.sum())
    if total == 0:
        return out.reshape(shape)
    cid = np.repeat(np.arange(len(a)), counts)
    local = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    ny, nx = ext[cid, 1], ext[cid, 2]
    iz = local // (ny * nx)
    rem = local - iz * ny * nx
    iy = rem // nx
    ix = rem - iy * nx
    z, y, x = lo[cid, 0] + iz, lo[cid, 1] + iy, lo[cid, 2] + ix
    ab = b - a
    inv_len2 = 1.0 / np.maximum((ab * ab).sum(axis=1), 1e-12)
    pz, py, px = z - a[cid, 0], y - a[cid, 1], x - a[cid, 2]
    t = np.clip((pz * ab[cid, 0] + py * ab[cid, 1] + px * ab[cid, 2]) * inv_len2[cid], 0.0, 1.0)
    dz, dy, dx = pz - t * ab[cid, 0], py - t * ab[cid, 1], px - t * ab[cid, 2]
    dist = np.sqrt(dz * dz + dy * dy + dx * dx)
    occ = np.clip(ra[cid] + t * (rb - ra)[cid] - dist + 0.5, 0.0, 1.0).astype(np.float32)
    keep = occ > 0
    flat = (z[keep] * shape[1] + y[keep]) * shape[2] + x[keep]
    np.maximum.at(out, flat, occ[keep])
    return out.reshape(shape)


def _lookup(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``mask`` at the nearest voxels of points (n, 3); False outside the volume."""
    idx = np.rint(np.asarray(points).reshape(-1, 3)).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.asarray(mask.shape)), axis=1)
    out = np.zeros(len(idx), dtype=bool)
    out[ok] = mask[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return out


def _canonical_grid(shape: tuple[int, int, int], pose: Pose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical voxel offsets (Z, Y, X) of every voxel, each (D, H, W) ``float32``."""
    centre = (np.asarray(shape) - 1) / 2 + np.asarray(pose.shift)
    rot = pose.rotation().astype(np.float32)
    p = [
        (np.arange(shape[0], dtype=np.float32) - np.float32(centre[0]))[:, None, None],
        (np.arange(shape[1], dtype=np.float32) - np.float32(centre[1]))[None, :, None],
        (np.arange(shape[2], dtype=np.float32) - np.float32(centre[2]))[None, None, :],
    ]
    inv_s = np.float32(1.0 / pose.scale)
    # q = R^T p / s
    return tuple(  # type: ignore[return-value]
        ((rot[0, i] * p[0] + rot[1, i] * p[1] + rot[2, i] * p[2]) * inv_s).astype(np.float32) for i in range(3)
    )


# -------------------------------------------------------------------------------------------------- generation


def _tree(
    rng: np.random.Generator,
    anat: _Anatomy,
    cfg: PhantomConfig,
    pose: Pose,
    shape: tuple[int, int, int],
    half: np.ndarray,
    lung: np.ndarray,
) -> dict[str, np.ndarray]:
    """Grow the vessel trees generation by generation (vectorised over all branches), in voxel space.

    Returns segment arrays: ``a``, ``b`` (n, 3), ``ra``, ``rb`` (n,), ``parent`` (n,) (-1 for trunks),
    ``children`` (n,) (how many kept children).
    """
    rot = pose.rotation()
    starts = pose.to_voxel(anat.hilum[anat.trunk_side] * half, shape)
    dirs = anat.trunk_dirs @ rot.T
    radii = anat.trunk_r * pose.scale
    lengths = np.full(len(radii), 7.0) * pose.scale * (half[2] / 32.0)
    parent = np.full(len(radii), -1, dtype=np.int64)
    seg_a, seg_b, seg_ra, seg_rb, seg_parent = [], [], [], [], []
    n_seen = 0
    for depth in range(cfg.vessel_max_depth + 1):
        if len(starts) == 0:
            break
        ends = starts + dirs * lengths[:, None]
        if depth > 0:  # trunks start in the hilum, outside the lung; branches must stay inside it
            ok = _lookup(lung, ends)
            half_ends = starts + dirs * (0.5 * lengths)[:, None]
            ok_half = _lookup(lung, half_ends) & _lookup(lung, starts + dirs * (0.25 * lengths)[:, None])
            ends = np.where(ok[:, None], ends, half_ends)
            keep = ok | ok_half
            starts, ends, dirs, radii, parent = starts[keep], ends[keep], dirs[keep], radii[keep], parent[keep]
        r_end = radii * 0.94
        ids = np.arange(n_seen, n_seen + len(starts))
        n_seen += len(starts)
        seg_a.append(starts)
        seg_b.append(ends)
        seg_ra.append(radii)
        seg_rb.append(r_end)
        seg_parent.append(parent)
        # Murray's law r^3 = r1^3 + r2^3 with a random asymmetry lam = r_small / r_big
        k = len(starts)
        lam = rng.uniform(0.45, 0.95, size=k)
        r_big = r_end / np.cbrt(1.0 + lam**3)
        r_small = lam * r_big
        v = rng.standard_normal((k, 3))
        e = v - (v * dirs).sum(axis=1, keepdims=True) * dirs
        e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-9)
        a_big = np.radians(rng.uniform(10.0, 30.0, size=k))[:, None]
        a_small = np.radians(rng.uniform(35.0, 65.0, size=k))[:, None]
        d_big = np.cos(a_big) * dirs + np.sin(a_big) * e
        d_small = np.cos(a_small) * dirs - np.sin(a_small) * e
        len_big = r_big * rng.uniform(2.5, 4.5, size=k) + 1.0
        len_small = r_small * rng.uniform(2.5, 4.5, size=k) + 1.0
        grow_big = r_big >= cfg.vessel_min_radius
        grow_small = r_small >= cfg.vessel_min_radius
        starts = np.concatenate([ends[grow_big], ends[grow_small]])
        dirs = np.concatenate([d_big[grow_big], d_small[grow_small]])
        radii = np.concatenate([r_big[grow_big], r_small[grow_small]])
        lengths = np.concatenate([len_big[grow_big], len_small[grow_small]])
        parent = np.concatenate([ids[grow_big], ids[grow_small]])
    par = np.concatenate(seg_parent)
    children = np.bincount(par[par >= 0], minlength=len(par))
    return {
        "a": np.concatenate(seg_a),
        "b": np.concatenate(seg_b),
        "ra": np.concatenate(seg_ra),
        "rb": np.concatenate(seg_rb),
        "parent": par,
        "children": children,
    }


def _nodule_centre(
    rng: np.random.Generator,
    r: float,
    attachment: str,
    depth: np.ndarray,
    edge_depth: np.ndarray,
    vessel_occ: np.ndarray,
    vessel_voxels: np.ndarray,
    nodules: list[Nodule],
) -> np.ndarray | None:
    """A centre for a nodule of radius ``r`` and ``attachment``, or None when 25 draws found no room.

    ``none``: at least ``r + 1`` voxels inside the lung, overlapping vessels by at most 20 %; ``vascular``: the
    surface half a voxel from a random vessel voxel (inside the lung); ``pleural``: ``r − 1.5`` to ``r − 0.5``
    voxels from the lung's outer edge (``edge_depth``, not from a bronchus), so the chest wall cuts it (the
    occupancy is masked by the lung afterwards). ``depth`` is the distance to anything that is not parenchyma.
    """
    shape = depth.shape
    if attachment == "pleural":
        near = (edge_depth >= max(1.0, r - 1.5)) & (edge_depth <= max(1.5, r - 0.5))
        pool = np.flatnonzero(near & (depth >= np.minimum(edge_depth, 1.0)))
    elif attachment == "vascular":
        pool = vessel_voxels
    else:
        pool = np.flatnonzero(depth >= r + 1.0)
    for j in rng.permutation(len(pool))[:25]:
        c = np.array(np.unravel_index(int(pool[j]), shape))
        if attachment == "vascular":
            u = rng.standard_normal(3)
            c = np.rint(c + u / np.linalg.norm(u) * (r + 0.5)).astype(np.int64)
            if np.any(c < 0) or np.any(c >= shape) or depth[tuple(c)] < 0.6 * r + 1.0:
                continue
        if any(np.linalg.norm(c - np.array(m.center)) < r + m.radius + 3.0 for m in nodules):
            continue
        if attachment == "none":
            k = math.ceil(r + 1.0)
            box = tuple(slice(int(v) - k, int(v) + k + 1) for v in c)
            gz, gy, gx = np.ogrid[-k : k + 1, -k : k + 1, -k : k + 1]
            if vessel_occ[box][gz * gz + gy * gy + gx * gx <= r * r].mean() > 0.2:
                continue
        return c
    return None


def _blobs(
    rng: np.random.Generator, cfg: PhantomConfig, tree: dict[str, np.ndarray], lung: np.ndarray
) -> dict[str, np.ndarray]:
    """Blob-like vessel segments: at ``cfg.blobs_per_patient`` bifurcations inside the lung, a capsule of radius
    ``cfg.blob_radius`` and half-length 0.5–2.5 voxels along the parent segment. Returns ``center``, ``a``, ``b``
    (n, 3) and ``r`` (n,)."""
    lo, hi = cfg.blobs_per_patient
    k = int(rng.integers(lo, hi + 1))
    idx = np.flatnonzero(tree["children"] >= 2)
    idx = idx[_lookup(lung, tree["b"][idx])] if len(idx) else idx
    pick = rng.permutation(len(idx))[: min(k, len(idx))]
    n = len(pick)
    half_len = rng.uniform(0.5, 2.5, size=n)
    radius = rng.uniform(*cfg.blob_radius, size=n)
    centre = tree["b"][idx[pick]]
    d = tree["b"][idx[pick]] - tree["a"][idx[pick]]
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
    return {"center": centre, "a": centre - d * half_len[:, None], "b": centre + d * half_len[:, None], "r": radius}


def _place_nodules(
    rng: np.random.Generator,
    cfg: PhantomConfig,
    lung: np.ndarray,
    labels: np.ndarray,
    vessel_occ: np.ndarray,
) -> tuple[list[Nodule], np.ndarray, np.ndarray]:
    """Place and rasterise nodules. Returns the nodules, their soft occupancy (D, H, W) and mean HU per voxel.

    Each nodule draws, in this order: radius, type (solid / ground glass / part-solid), attachment (free,
    juxta-vascular, juxta-pleural), then its centre, spiculation and HU; a nodule that finds no room is retried a
    little smaller (down to the lowest radius), then as a free nodule.
    """
    shape = lung.shape
    occ = np.zeros(shape, dtype=np.float32)
    hu = np.zeros(shape, dtype=np.float32)
    lo, hi = cfg.nodules_per_patient
    n = int(rng.integers(lo, hi + 1))
    r_lo, r_hi = cfg.nodule_radius
    clear = np.isin(labels, (LUNG, VESSEL))  # no nodule in a bronchus or outside the lungs
    clear[[0, -1]] = clear[:, [0, -1]] = clear[:, :, [0, -1]] = False  # nor cut by the volume's border
    depth = ndimage.distance_transform_edt(clear) if n else None
    edge_depth = ndimage.distance_transform_edt(lung) if n else None
    big_vessels = (vessel_occ >= 0.5) & clear
    vessel_voxels = np.flatnonzero(big_vessels) if n else np.zeros(0, np.int64)
    nodules: list[Nodule] = []
    spikes_a, spikes_b, spikes_r = [], [], []
    for _ in range(n):
        r = float(rng.uniform(r_lo, r_hi))
        u_type, u_attach = float(rng.random()), float(rng.random())
        if u_type < cfg.ground_glass_fraction * (1 - cfg.part_solid_fraction):
            kind = "ground_glass"
        elif u_type < cfg.ground_glass_fraction:
            kind = "part_solid"
        else:
            kind = "solid"
        if u_attach < cfg.juxta_vascular_fraction:
            attachment = "vascular" if len(vessel_voxels) else "none"
        elif u_attach < cfg.juxta_vascular_fraction + cfg.juxta_pleural_fraction:
            attachment = "pleural"
        else:
            attachment = "none"
        center = None
        while center is None:  # the drawn radius if it fits somewhere, else a little smaller, down to r_lo
            center = _nodule_centre(rng, r, attachment, depth, edge_depth, vessel_occ, vessel_voxels, nodules)
            if center is None:
                if r > r_lo:
                    r = max(r_lo, 0.9 * r)
                elif attachment != "none":
                    attachment = "none"
                else:
                    break
        if center is None:
            break  # the lungs are full: fewer nodules than drawn
        spiculated = bool(rng.random() < cfg.spiculated_fraction)
        solid_hu = round(float(rng.uniform(*cfg.nodule_hu)), 3)
        glass_hu = round(float(rng.uniform(*cfg.ground_glass_hu)), 3)
        core = round(r * float(rng.uniform(0.3, 0.6)), 4) if kind == "part_solid" else 0.0
        nod = Nodule(
            tuple(int(v) for v in center),  # type: ignore[arg-type]
            round(r, 4),
            spiculated,
            solid_hu if kind == "solid" else glass_hu,
            kind,
            attachment,
            core,
            solid_hu if kind == "part_solid" else 0.0,
        )
        nodules.append(nod)
        _draw_nodule(rng, nod, occ, hu)
        if spiculated:
            m = int(rng.integers(6, 13))
            u = rng.standard_normal((m, 3))
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            spikes_a.append(center + u * r * 0.8)
            spikes_b.append(center + u * r * rng.uniform(1.7, 2.1, size=(m, 1)))
            spikes_r.append(np.full(m, 0.75))
    if spikes_a:
        spikes = _rasterise_capsules(
            shape, np.concatenate(spikes_a), np.concatenate(spikes_b), np.concatenate(spikes_r), 0.3
        )
        for nod in nodules:  # spikes take the HU of their nodule
            if nod.spiculated:
                k = math.ceil(2.2 * nod.radius + 1.0)
                box = tuple(slice(max(v - k, 0), v + k + 1) for v in nod.center)
                sub = hu[box]
                sub[(spikes[box] > 0) & (sub == 0)] = nod.hu
        np.maximum(occ, spikes, out=occ)
    occ *= lung
    return nodules, occ, hu


def _draw_nodule(rng: np.random.Generator, nod: Nodule, occ: np.ndarray, hu: np.ndarray) -> None:
    """A lobulated sphere: radius ``r (1 + amp · Σ a_j ((u·v_j)^2 - 1/3))`` along unit direction u."""
    r = nod.radius
    k = math.ceil(1.3 * r + 1.0)
    c = np.asarray(nod.center)
    lo = np.maximum(c - k, 0)
    hi = np.minimum(c + k + 1, occ.shape)
    gz, gy, gx = np.meshgrid(*(np.arange(a, b) - v for a, b, v in zip(lo, hi, c)), indexing="ij")
    d = np.sqrt(gz * gz + gy * gy + gx * gx, dtype=np.float32)
    dn = np.maximum(d, 1e-6)
    v = rng.standard_normal((3, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    amp = rng.uniform(-1.0, 1.0, size=3) * (0.18 if nod.spiculated else 0.08)
    lob = sum(amp[j] * (((gz * v[j, 0] + gy * v[j, 1] + gx * v[j, 2]) / dn) ** 2 - 1.0 / 3.0) for j in range(3))
    o = np.clip(r * (1.0 + lob) - d + 0.5, 0.0, 1.0).astype(np.float32)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    np.maximum(occ[box], o, out=occ[box])
    sub = hu[box]
    sub[o > 0] = nod.hu
    if nod.core_radius > 0:  # part-solid: a solid core, blended over the ground glass by its own occupancy
        core = np.clip(nod.core_radius - d + 0.5, 0.0, 1.0)
        sub[:] = np.where(o > 0, nod.hu * (1.0 - core) + nod.core_hu * core, sub)


def _candidates(
    rng: np.random.Generator,
    cfg: PhantomConfig,
    tree: dict[str, np.ndarray],
    blob_pts: np.ndarray,
    airway_pts: np.ndarray,
    labels: np.ndarray,
    lung: np.ndarray,
    nodules: list[Nodule],
) -> list[Candidate]:
    """True candidates at nodule centres, then ``cfg.false_positives`` false positives drawn by kind."""
    shape = np.asarray(labels.shape)
    cands = [Candidate(n.center, 1, "nodule") for n in nodules]
    r_mid = 0.5 * (tree["ra"] + tree["rb"])
    pools: dict[str, np.ndarray] = {
        "bifurcation": tree["b"][(tree["children"] >= 2) & (tree["rb"] >= 0.7)],
        "vessel": 0.5 * (tree["a"] + tree["b"])[r_mid >= 0.8],
        "blob": blob_pts,
        "airway": airway_pts,
    }
    # crossings: centre-line samples of unrelated segments that come within touching distance
    ts = np.array([0.25, 0.5, 0.75])
    samples = tree["a"][:, None, :] + ts[None, :, None] * (tree["b"] - tree["a"])[:, None, :]
    seg_id = np.repeat(np.arange(len(tree["a"])), len(ts))
    samples = samples.reshape(-1, 3)
    pairs = cKDTree(samples).query_pairs(r=3.0, output_type="ndarray") if len(samples) > 1 else np.zeros((0, 2))
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    si, sj = seg_id[pairs[:, 0]], seg_id[pairs[:, 1]]
    par = tree["parent"]
    related = (si == sj) | (par[si] == sj) | (par[sj] == si) | ((par[si] == par[sj]) & (par[si] >= 0))
    dist = np.linalg.norm(samples[pairs[:, 0]] - samples[pairs[:, 1]], axis=1)
    touching = ~related & (dist < r_mid[si] + r_mid[sj]) & (np.minimum(r_mid[si], r_mid[sj]) >= 0.6)
    pools["crossing"] = 0.5 * (samples[pairs[touching, 0]] + samples[pairs[touching, 1]])
    interior = lung.copy()
    for axis in range(3):
        for step in (1, -1):
            interior &= np.roll(lung, step, axis=axis)
    pleura = np.argwhere(lung & ~interior)
    pools["pleura"] = pleura[rng.permutation(len(pleura))[: 4 * max(cfg.false_positives, 1)]].astype(np.float64)

    def usable(points: np.ndarray, kind: str) -> np.ndarray:
        idx = np.unique(np.rint(points).astype(np.int64).reshape(-1, 3), axis=0)
        idx = idx[np.all((idx >= 0) & (idx < shape), axis=1)]
        lab = labels[idx[:, 0], idx[:, 1], idx[:, 2]]
        ok = lung[idx[:, 0], idx[:, 1], idx[:, 2]]
        if kind in ("bifurcation", "vessel", "crossing", "blob"):
            ok &= lab == VESSEL
        elif kind == "airway":
            ok &= lab == AIRWAY
        else:
            ok &= lab == LUNG
        for n in nodules:  # clear of nodules and their spikes
            ok &= np.linalg.norm(idx - np.asarray(n.center), axis=1) > 2.2 * n.radius + 2.0
        return idx[ok]

    avail = {k: usable(v, k) for k, v in pools.items()}
    used: set[tuple[int, int, int]] = set()
    kinds = list(_FP_WEIGHTS)
    for _ in range(cfg.false_positives):
        live = [k for k in kinds if len(avail[k])]
        if not live:
            break
        w = np.array([_FP_WEIGHTS[k] for k in live])
        kind = live[int(rng.choice(len(live), p=w / w.sum()))]
        pool = avail[kind]
        j = int(rng.integers(len(pool)))
        point = tuple(int(v) for v in pool[j])
        avail[kind] = np.delete(pool, j, axis=0)
        if point in used:
            continue
        used.add(point)
        cands.append(Candidate(point, 0, kind))  # type: ignore[arg-type]
    return cands


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    out = tuple(int(v) for v in shape)
    if len(out) != 3 or min(out) < 16:
        raise PhantomError(f"shape must be three sizes (D, H, W) of at least 16 voxels, got {tuple(shape)}")
    return out  # type: ignore[return-value]


def generate_patient(
    index: int,
    *,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    with_nodules: bool = True,
    config: PhantomConfig | None = None,
) -> Patient:
    """Generate patient ``index`` of cohort ``seed``: same arguments, same patient, bit for bit.

    Args:
        index, seed: non-negative integers; ``SeedSequence([seed, index])`` seeds everything.
        shape: (D, H, W) = (z, y, x), each at least 16; organs scale with the field of view, tube radii with
            the in-plane size (relative to 64), nodule radii are in voxels.
        with_nodules: place ``config.nodules_per_patient`` nodules; without, the same anatomy and no nodules.
        config: :class:`PhantomConfig` (defaults if None).
    """
    cfg = config if config is not None else PhantomConfig()
    shape = _check_shape(shape)
    if int(index) < 0 or int(seed) < 0:
        raise PhantomError(f"index and seed must be non-negative integers, got index={index}, seed={seed}")
    streams = np.random.SeedSequence([int(seed), int(index)]).spawn(6)
    r_pose, r_anat, r_tree, r_nod, r_noise, r_cand = (np.random.default_rng(s) for s in streams)
    g = min(shape[1], shape[2]) / 64.0
    half = np.array(shape, dtype=np.float64) / 2.0
    pose = _sample_pose(r_pose, cfg)
    anat = _sample_anatomy(r_anat, cfg, g)
    hu_of = anat.hu
    s = pose.scale

    Z, Y, X = _canonical_grid(shape, pose)
    zn, yn, xn = Z / np.float32(half[0]), Y / np.float32(half[1]), X / np.float32(half[2])

    # ---- body outline: distance along the ray from the body axis (voxels, canonical), negative inside
    by = Y - np.float32(anat.body_y0 * half[1])
    r = np.sqrt(X * X + by * by)
    rs = np.maximum(r, np.float32(1e-3))
    cs, sn = X / rs, by / rs
    a_vox, b_vox = anat.body_a * half[2], anat.body_b * half[1]
    radius = 1.0 / np.sqrt((cs / np.float32(a_vox)) ** 2 + (sn / np.float32(b_vox)) ** 2)
    c2, s2 = cs * cs - sn * sn, 2 * sn * cs
    c3, s3 = cs * c2 - sn * s2, sn * c2 + cs * s2
    (m2, p2), (m3, p3) = anat.body_modes
    radius *= (
        1.0
        + np.float32(m2) * (c2 * np.float32(math.cos(p2)) - s2 * np.float32(math.sin(p2)))
        + np.float32(m3) * (c3 * np.float32(math.cos(p3)) - s3 * np.float32(math.sin(p3)))
        - np.float32(anat.body_taper) * zn
    )
    d_body = r - radius
    wall = anat.fat_t + anat.musc_t + anat.musc_post * np.maximum(sn, 0) ** 2 + anat.musc_ant * np.maximum(-sn, 0) ** 2
    body = d_body <= 0
    fat = body & (d_body > -anat.fat_t)

    # ---- ribs (inclined arcs, posterior end higher), sternum, costal cartilage gap
    band = np.abs(d_body + wall + np.float32(anat.rib_t / 2)) <= np.float32(anat.rib_t / 2)
    zr = zn - np.float32(anat.rib_slope) * yn
    k = np.rint((zr - np.float32(anat.rib_phase * anat.rib_pitch)) / np.float32(anat.rib_pitch))
    dz_rib = np.abs(zr - np.float32(anat.rib_phase * anat.rib_pitch) - k * np.float32(anat.rib_pitch)) * half[0]
    ribs = band & (dz_rib <= anat.rib_zh) & (sn > -0.8) & ~((sn > 0) & (np.abs(X) < 0.16 * half[2]))
    ribs &= (zn > -0.85) & (zn < 0.85)
    sternum = band & (sn < 0) & (np.abs(X) < 2.5 * g) & (zn > -0.6) & (zn < 0.7)

    # ---- spine
    sy = Y - np.float32(anat.spine_y * half[1])
    rr = np.sqrt(X * X + sy * sy)
    pitch = anat.vert_pitch * half[0]
    zmod = np.mod(Z - np.float32(anat.vert_phase * pitch), np.float32(pitch))
    disc = zmod < anat.disc_t
    vbody = (rr <= anat.spine_r) & ~disc
    cortex = vbody & ((anat.spine_r - rr < 1.0) | (zmod - anat.disc_t < 0.8) | (pitch - zmod < 0.8))
    canal_y = anat.spine_r + 2.2 * g
    cy = sy - np.float32(canal_y)
    rc = np.sqrt(X * X + cy * cy)
    canal = rc < 1.8 * g
    level = zmod > anat.disc_t + 0.5
    arch = (rc >= 1.8 * g) & (rc < 3.3 * g) & level
    spinous = (np.abs(X) < 0.9 * g) & (cy > 2.5 * g) & (cy < 7.0 * g) & level & (d_body < -anat.fat_t - 1.0)
    transverse = (np.abs(cy) < 1.0 * g) & (np.abs(X) > 2.5 * g) & (np.abs(X) < 6.5 * g) & level
    spine_bone = vbody | arch | spinous | transverse
    spine_zone = (rr < anat.spine_r + 1.5) | ((sy > 0) & (np.abs(X) < 7.5 * g))

    # ---- heart (rotated ellipsoid: long axis to the patient's left and front)
    hz = zn - np.float32(anat.heart_c[0])
    hy = yn - np.float32(anat.heart_c[1])
    hx = xn - np.float32(anat.heart_c[2])
    ca, sa = np.float32(math.cos(anat.heart_angle)), np.float32(math.sin(anat.heart_angle))
    hu_ax, hv_ax = hx * ca - hy * sa, hx * sa + hy * ca
    e_heart = (hz / anat.heart_ax[0]) ** 2 + (hu_ax / anat.heart_ax[1]) ** 2 + (hv_ax / anat.heart_ax[2]) ** 2
    heart = e_heart <= 1.0
    m = 1.2 / half[2]  # 1.2 voxel margin between heart and lung
    e_margin = (
        (hz / (anat.heart_ax[0] + m)) ** 2
        + (hu_ax / (anat.heart_ax[1] + m)) ** 2
        + (hv_ax / (anat.heart_ax[2] + m)) ** 2
    )

    # ---- tubes: aorta and airways (voxel space)
    ao = pose.to_voxel(anat.aorta * half, shape)
    aorta_occ = _rasterise_capsules(shape, ao[:-1], ao[1:], anat.aorta_r[:-1] * s, anat.aorta_r[1:] * s)
    aorta_zone = _rasterise_capsules(
        shape, ao[:-1], ao[1:], (anat.aorta_r[:-1] + 1.2) * s, (anat.aorta_r[1:] + 1.2) * s
    )
    aw_a = pose.to_voxel(anat.airway_a * half, shape)
    aw_b = pose.to_voxel(anat.airway_b * half, shape)
    lumen_occ = _rasterise_capsules(shape, aw_a, aw_b, anat.airway_r * s, anat.airway_r * s)
    outer = (anat.airway_r + anat.airway_wall) * s
    wall_occ = _rasterise_capsules(shape, aw_a, aw_b, outer, outer)
    cen = anat.airway_central
    central_zone = _rasterise_capsules(shape, aw_a[cen], aw_b[cen], outer[cen] + 1.0 * s, outer[cen] + 1.0 * s)

    # ---- lungs
    side = (xn > 0).astype(np.int64)  # 0 right, 1 left
    ax_ = np.abs(xn)
    apex = zn <= np.float32(anat.apex_top)[side] - 2.0 * ((ax_ - 0.3) ** 2 + (yn - 0.05) ** 2)
    dome = np.float32(anat.dome_top)[side] - 2.5 * ((ax_ - 0.3) ** 2 + (yn + 0.05) ** 2)
    base = zn >= np.maximum(dome, -0.74)
    cavity = d_body <= -(wall + anat.rib_t + anat.lung_gap)
    lung = cavity & apex & base & (ax_ > anat.medial) & (e_margin > 1.0) & ~spine_zone
    lung &= (aorta_zone < 0.5) & (central_zone < 0.5)
    lung = _largest_per_side(lung, side)

    # ---- vessels
    tree = _tree(r_tree, anat, cfg, pose, shape, half, lung)
    vessel_occ = _rasterise_capsules(shape, tree["a"], tree["b"], tree["ra"], tree["rb"])
    blobs = _blobs(r_tree, cfg, tree, lung)
    if len(blobs["r"]):
        np.maximum(
            vessel_occ, _rasterise_capsules(shape, blobs["a"], blobs["b"], blobs["r"], blobs["r"]), out=vessel_occ
        )
    vessel_occ *= lung

    # ---- labels and HU before nodules
    labels = np.zeros(shape, dtype=np.uint8)
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    labels[body] = BODY
    hu[body] = hu_of["body"]
    labels[fat] = FAT
    hu[fat] = hu_of["fat"]
    texture = ndimage.gaussian_filter(r_noise.standard_normal(shape, dtype=np.float32), 1.2)
    texture *= np.float32(30.0) / max(float(texture.std()), 1e-6)
    lung_hu = np.float32(hu_of["lung"]) + texture + np.float32(25.0) * np.clip(yn / 0.35, -1.0, 1.0)
    lung_hu = lung_hu * (1.0 - vessel_occ) + np.float32(hu_of["vessel"]) * vessel_occ
    hu = np.where(lung, lung_hu, hu)
    labels[lung] = LUNG
    labels[lung & (vessel_occ >= 0.5)] = VESSEL
    airway_wall = (wall_occ >= 0.5) & body
    labels[airway_wall] = BODY
    hu[airway_wall] = hu_of["body"]
    airway = (lumen_occ >= 0.5) & body
    labels[airway] = AIRWAY
    hu[airway] = AIR_HU
    labels[heart] = HEART
    hu[heart] = hu_of["body"]
    hu[e_heart <= 0.72**2] = hu_of["blood"]
    aorta = aorta_occ >= 0.5
    labels[aorta] = AORTA
    hu[aorta] = hu_of["blood"]
    hu[disc & (rr <= anat.spine_r)] = hu_of["disc"]
    labels[disc & (rr <= anat.spine_r)] = BODY
    hu[canal] = hu_of["cord"]
    labels[canal] = BODY
    bone = ribs | sternum | spine_bone
    labels[bone] = BONE
    hu[ribs | sternum] = hu_of["rib"]
    hu[arch | spinous | transverse] = hu_of["posterior"]
    hu[vbody] = hu_of["cancellous"]
    hu[cortex] = hu_of["cortex"]

    # ---- nodules
    if with_nodules and cfg.nodules_per_patient[1] > 0:
        nodules, nod_occ, nod_hu = _place_nodules(r_nod, cfg, lung, labels, vessel_occ)
    else:
        nodules, nod_occ, nod_hu = [], np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    nodule_mask = nod_occ >= 0.5
    if nodules:
        hu = np.where(nod_occ > 0, hu * (1.0 - nod_occ) + nod_hu * nod_occ, hu)
        labels[nodule_mask] = NODULE

    # ---- candidates
    lobar = ~cen
    ts = np.linspace(0.2, 1.0, 5)
    airway_pts = (aw_a[lobar][:, None, :] + ts[None, :, None] * (aw_b - aw_a)[lobar][:, None, :]).reshape(-1, 3)
    candidates = _candidates(r_cand, cfg, tree, blobs["center"], airway_pts, labels, lung, nodules)

    # ---- scanner: point-spread blur, correlated noise
    if cfg.blur_sigma > 0:
        hu = ndimage.gaussian_filter(hu, cfg.blur_sigma, mode="nearest")
    sigma = cfg.noise_hu * (1.0 + float(r_noise.uniform(-cfg.noise_jitter, cfg.noise_jitter)))
    if sigma > 0:
        noise = ndimage.gaussian_filter(r_noise.standard_normal(shape, dtype=np.float32), 0.6)
        hu += noise * np.float32(sigma / max(float(noise.std()), 1e-6))
    volume = np.clip(hu, *_HU_RANGE).astype(np.float32)
    return Patient(
        index=int(index),
        seed=int(seed),
        volume=volume,
        labels=labels,
        lung_mask=lung,
        nodule_mask=nodule_mask,
        nodules=nodules,
        candidates=candidates,
        spacing=tuple(float(v) for v in cfg.spacing),  # type: ignore[arg-type]
        pose=pose,
        config=cfg,
        with_nodules=bool(with_nodules),
    )


def _largest_per_side(mask: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of ``mask`` on each side (no islands left by the carving)."""
    out = np.zeros_like(mask)
    for k in (0, 1):
        lab, n = ndimage.label(mask & (side == k))
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out |= lab == int(sizes.argmax())
    return out


def generate_cohort(
    n: int,
    *,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    with_nodules: bool = True,
    config: PhantomConfig | None = None,
    start: int = 0,
) -> list[Patient]:
    """Patients ``start … start + n - 1`` of cohort ``seed`` (see :func:`generate_patient`)."""
    if n < 0:
        raise PhantomError(f"n must be >= 0, got {n}")
    return [
        generate_patient(i, seed=seed, shape=shape, with_nodules=with_nodules, config=config)
        for i in range(start, start + n)
    ]


# ------------------------------------------------------------------------------------------------ target tasks


def crop_cube(
    volume: np.ndarray, center: Sequence[int], *, size: int | Sequence[int], fill: float = AIR_HU
) -> np.ndarray:
    """A (d, h, w) cube of ``volume`` (D, H, W) with ``center`` at index ``(d//2, h//2, w//2)``.

    Parts outside the volume are ``fill`` (-1000 HU, air, by default; pass ``False``/0 for masks).
    """
    sz = np.array((size,) * 3 if np.isscalar(size) else tuple(size), dtype=np.int64)
    if sz.shape != (3,) or np.any(sz < 1):
        raise PhantomError(f"size must be a positive int or three positive ints, got {size}")
    c = np.asarray(center, dtype=np.int64)
    if c.shape != (3,):
        raise PhantomError(f"center must be three voxel indices (z, y, x), got {center}")
    dims = np.asarray(volume.shape)
    start = c - sz // 2
    out = np.full(tuple(sz), fill, dtype=volume.dtype)
    lo, hi = np.maximum(start, 0), np.minimum(start + sz, dims)
    if np.any(hi <= lo):
        return out
    dst = tuple(slice(int(a - s0), int(b - s0)) for a, b, s0 in zip(lo, hi, start))
    out[dst] = volume[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    return out


def candidate_cubes(patient: Patient, *, size: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Cubes around every candidate, (n, d, h, w) ``float32`` HU, and their labels (n,) int64 (1 nodule)."""
    sz = (size,) * 3 if np.isscalar(size) else tuple(size)
    centers, labels = patient.candidate_arrays()
    cubes = np.stack([crop_cube(patient.volume, c, size=size) for c in centers]) if len(centers) else None
    if cubes is None:
        cubes = np.zeros((0, *sz), dtype=np.float32)
    return cubes, labels


# ----------------------------------------------------------------------------------------------------- caching


def cohort_digest(
    *,
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    with_nodules: bool = True,
    config: PhantomConfig | None = None,
) -> str:
    """A 16-hex-digit digest of everything that determines a cohort's patients (including :data:`VERSION`)."""
    cfg = config if config is not None else PhantomConfig()
    spec = {
        "version": VERSION,
        "seed": int(seed),
        "shape": list(_check_shape(shape)),
        "with_nodules": bool(with_nodules),
        "config": cfg.to_dict(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cohort_dir(
    root: PathLike,
    *,
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    with_nodules: bool = True,
    config: PhantomConfig | None = None,
) -> Path:
    """``root/ct_phantom-<digest>``: where :func:`cached_cohort` keeps that cohort."""
    return Path(root) / f"ct_phantom-{cohort_digest(seed=seed, shape=shape, with_nodules=with_nodules, config=config)}"


def patient_path(directory: PathLike, index: int) -> Path:
    return Path(directory) / f"patient_{int(index):05d}.npz"


def write_cohort(directory: PathLike, patients: Sequence[Patient]) -> list[Path]:
    """Write each patient to ``directory/patient_<index>.npz`` (atomically: temporary file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in patients:
        path = patient_path(directory, p.index)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        nod = p.nodules
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                version=np.int64(VERSION),
                index=np.int64(p.index),
                seed=np.int64(p.seed),
                with_nodules=np.bool_(p.with_nodules),
                volume=p.volume,
                labels=p.labels,
                lung_mask=p.lung_mask,
                nodule_mask=p.nodule_mask,
                nodule_centers=np.array([n.center for n in nod], dtype=np.int64).reshape(-1, 3),
                nodule_radii=np.array([n.radius for n in nod], dtype=np.float64),
                nodule_spiculated=np.array([n.spiculated for n in nod], dtype=bool),
                nodule_hu=np.array([n.hu for n in nod], dtype=np.float64),
                nodule_types=np.array([n.type for n in nod], dtype="<U12"),
                nodule_attachments=np.array([n.attachment for n in nod], dtype="<U12"),
                nodule_cores=np.array([[n.core_radius, n.core_hu] for n in nod], dtype=np.float64).reshape(-1, 2),
                candidate_centers=np.array([c.center for c in p.candidates], dtype=np.int64).reshape(-1, 3),
                candidate_labels=np.array([c.label for c in p.candidates], dtype=np.int64),
                candidate_kinds=np.array([c.kind for c in p.candidates], dtype=f"<U{max(map(len, CANDIDATE_KINDS))}"),
                spacing=np.array(p.spacing, dtype=np.float64),
                pose=np.array([p.pose.scale, p.pose.yaw_deg, p.pose.tilt_deg, *p.pose.shift], dtype=np.float64),
                config=np.array(json.dumps(p.config.to_dict(), sort_keys=True)),
            )
        os.replace(tmp, path)
        paths.append(path)
    return paths


def read_patient(path: PathLike) -> Patient:
    """Read a patient written by :func:`write_cohort`."""
    path = Path(path)
    if not path.is_file():
        raise PhantomError(f"{path}: phantom patient file does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile / numpy raise many types for truncated files
        raise PhantomError(f"{path}: not a readable phantom patient file ({type(err).__name__}: {err})") from None
    if int(data.get("version", -1)) != VERSION:
        raise PhantomError(f"{path}: written by phantom version {data.get('version')}, this is {VERSION}; regenerate")
    pose = data["pose"]
    return Patient(
        index=int(data["index"]),
        seed=int(data["seed"]),
        volume=data["volume"],
        labels=data["labels"],
        lung_mask=data["lung_mask"],
        nodule_mask=data["nodule_mask"],
        nodules=[
            Nodule(tuple(int(v) for v in c), float(r), bool(s), float(h), str(t), str(a), float(cr), float(ch))  # type: ignore[arg-type]
            for c, r, s, h, t, a, (cr, ch) in zip(
                data["nodule_centers"],
                data["nodule_radii"],
                data["nodule_spiculated"],
                data["nodule_hu"],
                data["nodule_types"],
                data["nodule_attachments"],
                data["nodule_cores"],
            )
        ],
        candidates=[
            Candidate(tuple(int(v) for v in c), int(lab), str(kind))  # type: ignore[arg-type]
            for c, lab, kind in zip(data["candidate_centers"], data["candidate_labels"], data["candidate_kinds"])
        ],
        spacing=tuple(float(v) for v in data["spacing"]),  # type: ignore[arg-type]
        pose=Pose(float(pose[0]), float(pose[1]), float(pose[2]), tuple(float(v) for v in pose[3:6])),  # type: ignore[arg-type]
        config=PhantomConfig.from_dict(json.loads(str(data["config"]))),
        with_nodules=bool(data["with_nodules"]),
    )


def cached_cohort(
    root: PathLike,
    n: int,
    *,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    with_nodules: bool = True,
    config: PhantomConfig | None = None,
) -> list[Patient]:
    """Patients ``0 … n-1`` from ``cohort_dir(root, …)``, generating and writing the ones not there yet."""
    cfg = config if config is not None else PhantomConfig()
    directory = cohort_dir(root, seed=seed, shape=shape, with_nodules=with_nodules, config=cfg)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "cohort.json"
    if not manifest.is_file():
        spec = {"version": VERSION, "seed": seed, "shape": list(shape), "with_nodules": with_nodules}
        manifest.write_text(json.dumps({**spec, "config": cfg.to_dict()}, indent=2, sort_keys=True))
    out = []
    for i in range(n):
        path = patient_path(directory, i)
        patient = None
        if path.is_file():
            try:
                patient = read_patient(path)
            except PhantomError:
                patient = None  # unreadable or stale: regenerate
        if patient is None:
            patient = generate_patient(i, seed=seed, shape=shape, with_nodules=with_nodules, config=cfg)
            write_cohort(directory, [patient])
        out.append(patient)
    return out


def to_nifti(patient: Patient, path: PathLike, *, what: str = "volume") -> Path:
    """Write ``patient.<what>`` ("volume", "labels", "lung_mask" or "nodule_mask") as NIfTI-1 with nibabel.

    The array is stored in NIfTI's (x, y, z) order (``array.transpose(2, 1, 0)``); the affine is
    ``diag(-dx, -dy, dz)`` (our axes are LPS, NIfTI world coordinates are RAS), so the header's zooms are the
    spacing (dx, dy, dz). Volumes are ``float32``, label maps ``uint8``.
    """
    try:
        import nibabel as nib
    except ImportError as err:
        raise ImportError(
            "to_nifti needs the 'nibabel' package, which is not installed: `pip install nibabel` "
            "(or `pip install thrifty[medical]`)"
        ) from err
    arrays = {"volume": np.float32, "labels": np.uint8, "lung_mask": np.uint8, "nodule_mask": np.uint8}
    if what not in arrays:
        raise PhantomError(f"what must be one of {', '.join(arrays)}, got {what!r}")
    data = np.ascontiguousarray(getattr(patient, what).astype(arrays[what]).transpose(2, 1, 0))
    dz, dy, dx = patient.spacing
    affine = np.diag([-dx, -dy, dz, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path
