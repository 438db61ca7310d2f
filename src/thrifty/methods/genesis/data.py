"""Data of the Genesis recipe: an unlabelled CT pool for pre-training and a disjoint, patient-split target cohort
for the two target tasks of Models Genesis / Semantic Genesis (arXiv 2004.07882, 2007.06959):

* NCC, nodule false-positive reduction: cubes around nodule candidates, label 1 for a true nodule, 0 for a false
  positive (vessel bifurcations and crossings, vessels, bronchi, pleura); scored by AUC.
* NCS, nodule segmentation: cubes around nodules (centre jittered) with the nodule mask; scored by IoU and Dice.

Pre-training cubes are cut like the release's ``infinite_generator_3D.py``: random positions at a margin from the
volume's border, kept only when the cube is mostly lung (the release's filter: with ``dense`` = voxel ≥ -150 HU,
each voxel scores ``1 - k/(L-1)`` for the first of the next ``L = 3`` slices that is dense, 0 if none is; the
cube is kept when the scores sum to at most ``max_dense_fraction`` of its voxels; the release uses 0.15 on
64×64×32 cubes of 512² CT, the miniature's cubes are a quarter of its small phantom's width, so its preset is
looser). Intensities are Models Genesis's: HU clipped to [-1000, 1000], scaled to [0, 1].

Patients are split once, by patient: the pre-training cohort (phantom seed ``s``) is split into training and
held-out patients (pretext validation loss, validation members of the visual words); the target cohort (seed
``s + 1``, a different set of patients) into train / validation / test. With ``data.source=luna16`` the pools are
LUNA16 subsets instead (:mod:`thrifty.data.luna16`; target splits by subset, the pre-training pool split as
above). Validation and test are wrapped in
:class:`~thrifty.core.splits.Guarded`, so every read is logged with its purpose, and ``manifest.json`` lists
which patients each stage used. A label fraction keeps the first ``ceil(f · n)`` training patients of one fixed
permutation, so smaller fractions are subsets of larger ones and every arm and seed sees the same labels.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thrifty.core.splits import AccessLog, Guarded
from thrifty.data import luna16
from thrifty.data.ct_phantom import AIR_HU, Patient, cached_cohort, candidate_cubes, crop_cube
from thrifty.data.volumes import clip_and_normalize
from thrifty.methods.genesis.config import GenesisConfig

log = logging.getLogger(__name__)

VAL_PURPOSES = ("selection", "figure")
TEST_PURPOSES = ("final_test", "figure")
DENSE_HU = -150.0  # the release's HU_thred
LOOKAHEAD = 3  # the release's len_depth


# ------------------------------------------------------------------------------------------- pre-training cubes


def dense_score(cube01: np.ndarray, *, lookahead: int = LOOKAHEAD) -> float:
    """The release's lung filter score of a cube with ``lookahead - 1`` extra slices below it.

    cube01: (d + lookahead - 1, h, w) in [0, 1] (HU window [-1000, 1000]) → mean over the first d slices of
    ``1 - k/(lookahead-1)`` where k is the first of the next ``lookahead`` slices that is dense (≥ -150 HU), 0 when
    none is. 0 for a cube of lung or air only, 1 for solid tissue.
    """
    thr = (DENSE_HU - AIR_HU) / 2000.0
    d = cube01.shape[0] - lookahead + 1
    if d < 1:
        raise ValueError(f"cube has {cube01.shape[0]} slices, needs more than lookahead - 1 = {lookahead - 1}")
    score = np.zeros((d, *cube01.shape[1:]), dtype=np.float32)
    found = np.zeros_like(score, dtype=bool)
    for k in range(lookahead):
        dense = (cube01[k : k + d] >= thr) & ~found
        score[dense] = 1.0 - k / max(lookahead - 1, 1)
        found |= dense
    return float(score.mean())


def sample_cubes(
    volume01: np.ndarray,
    *,
    count: int,
    cube: Sequence[int],
    margin: Sequence[int],
    max_dense_fraction: float,
    rng: np.random.Generator,
    max_tries: int = 50,
) -> np.ndarray:
    """Up to ``count`` random pre-training cubes of one volume (the release's generator, vectorisable parts aside).

    volume01: (D, H, W) in [0, 1] → (n, d, h, w) ``float32``, n ≤ count: positions are drawn uniformly with
    ``margin`` (z, y, x) voxels to the border, ``max_tries × count`` draws at most (the release: 50 × scale), and a
    cube is kept when :func:`dense_score` ≤ ``max_dense_fraction``.
    """
    d, h, w = (int(s) for s in cube)
    mz, my, mx = (int(m) for m in margin)
    dz, dy, dx = volume01.shape
    need = d + LOOKAHEAD - 1
    hi = (dz - need - mz, dy - h - my, dx - w - mx)
    if min(hi[0] - mz, hi[1] - my, hi[2] - mx) < 0:
        raise ValueError(f"volume {volume01.shape} is too small for cubes {tuple(cube)} with margin {tuple(margin)}")
    out = []
    for _ in range(max_tries * count):
        z, y, x = (int(rng.integers(lo, top + 1)) for lo, top in zip((mz, my, mx), hi))
        window = volume01[z : z + need, y : y + h, x : x + w]
        if dense_score(window) <= max_dense_fraction:
            out.append(window[:d])
            if len(out) == count:
                break
    return np.stack(out).astype(np.float32) if out else np.zeros((0, d, h, w), dtype=np.float32)


# ----------------------------------------------------------------------------------------------- target tasks


@dataclasses.dataclass
class TaskSet:
    """Target-task cubes of one split.

    Attributes:
        ncc_cubes: (N, 1, d, h, w) in [0, 1]; ``ncc_labels`` (N,) int64 (1 true nodule); ``ncc_patient`` (N,) index
            of the patient in the split.
        ncs_cubes: (M, 1, d, h, w) in [0, 1]; ``ncs_masks`` (M, 1, d, h, w) float 0/1; ``ncs_patient`` (M,).
        patients: the cohort indices of the split's patients.
    """

    ncc_cubes: torch.Tensor
    ncc_labels: torch.Tensor
    ncc_patient: torch.Tensor
    ncs_cubes: torch.Tensor
    ncs_masks: torch.Tensor
    ncs_patient: torch.Tensor
    patients: list[int | str]

    def subset(self, keep: Sequence[int]) -> TaskSet:
        """The cubes of the split's patients at positions ``keep`` (indices into :attr:`patients`)."""
        keep_t = torch.as_tensor(list(keep), dtype=torch.long)
        a = torch.isin(self.ncc_patient, keep_t)
        b = torch.isin(self.ncs_patient, keep_t)
        return TaskSet(
            self.ncc_cubes[a],
            self.ncc_labels[a],
            self.ncc_patient[a],
            self.ncs_cubes[b],
            self.ncs_masks[b],
            self.ncs_patient[b],
            [self.patients[i] for i in keep],
        )

    def sizes(self) -> dict[str, int]:
        return {
            "patients": len(self.patients),
            "ncc_positive": int(self.ncc_labels.sum()),
            "ncc_negative": int((self.ncc_labels == 0).sum()),
            "ncs_cubes": int(self.ncs_cubes.shape[0]),
        }


def task_set(
    patients: Sequence[Patient], *, cube: Sequence[int], negatives_per_positive: int, jitter: int, seed: int
) -> TaskSet:
    """NCC and NCS cubes of ``patients``: every true candidate, ``negatives_per_positive`` false positives per true
    one (drawn per patient without replacement, seeded), and one segmentation cube per nodule, its centre moved by
    up to ``jitter`` voxels per axis."""
    rng = np.random.default_rng(seed)
    ncc_x, ncc_y, ncc_p, ncs_x, ncs_m, ncs_p = [], [], [], [], [], []
    for j, p in enumerate(patients):
        cubes, labels = candidate_cubes(p, size=cube)
        pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        n_neg = min(len(neg), negatives_per_positive * max(len(pos), 1))
        keep = np.concatenate([pos, rng.choice(neg, size=n_neg, replace=False)]) if n_neg else pos
        ncc_x.append(cubes[keep])
        ncc_y.append(labels[keep])
        ncc_p.append(np.full(len(keep), j))
        for nod in p.nodules:
            centre = np.asarray(nod.center) + rng.integers(-jitter, jitter + 1, size=3)
            ncs_x.append(crop_cube(p.volume, centre, size=cube))
            ncs_m.append(crop_cube(p.nodule_mask.astype(np.float32), centre, size=cube, fill=0.0))
            ncs_p.append(j)
    d, h, w = (int(s) for s in cube)

    def stack(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=np.float32)

    ncc = clip_and_normalize(stack(ncc_x, (d, h, w)))
    ncs = clip_and_normalize(np.stack(ncs_x)) if ncs_x else np.zeros((0, d, h, w), np.float32)
    masks = np.stack(ncs_m) if ncs_m else np.zeros((0, d, h, w), np.float32)
    return TaskSet(
        ncc_cubes=torch.from_numpy(ncc)[:, None],
        ncc_labels=torch.from_numpy(stack(ncc_y, ()).astype(np.int64)),
        ncc_patient=torch.from_numpy(stack(ncc_p, ()).astype(np.int64)),
        ncs_cubes=torch.from_numpy(ncs)[:, None],
        ncs_masks=torch.from_numpy((masks > 0.5).astype(np.float32))[:, None],
        ncs_patient=torch.tensor(ncs_p, dtype=torch.long),
        patients=[patient_id(p) for p in patients],
    )


def fraction_patients(n: int, fraction: float, *, seed: int) -> list[int]:
    """The first ``ceil(fraction · n)`` (at least 1) of one fixed permutation of range(n): nested across fractions."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    return sorted(int(i) for i in order[: max(1, math.ceil(fraction * n - 1e-9))])


# ------------------------------------------------------------------------------------------------------ the lot


@dataclasses.dataclass
class GenesisData:
    """Everything the stages read.

    Attributes:
        pool_train / pool_val: unlabelled volumes (N, 1, D, H, W) in [0, 1] (self-discovery, visual words).
        lung_train / lung_val: their lung masks (N, D, H, W) bool (visual-word coordinates).
        labels_train: organ label maps of the training pool (N, D, H, W) uint8, read only to score visual-word
            purity (a diagnostic; no label reaches pre-training).
        cubes_train / cubes_val: random pre-training cubes (N, 1, d, h, w) (visual words off, pretext validation).
        target_train: target-task training cubes (label fractions select patients of it).
        target_val / target_test: guarded target-task splits.
        manifest: which cohort and patients each split holds.
    """

    pool_train: torch.Tensor
    pool_val: torch.Tensor
    lung_train: np.ndarray
    lung_val: np.ndarray
    labels_train: np.ndarray
    cubes_train: torch.Tensor
    cubes_val: torch.Tensor
    target_train: TaskSet
    target_val: Guarded[TaskSet]
    target_test: Guarded[TaskSet]
    manifest: dict[str, Any]


def _pool_cubes(volumes01: np.ndarray, cfg: GenesisConfig, seed: int) -> torch.Tensor:
    d = cfg.data
    rng = np.random.default_rng(seed)
    parts = [
        sample_cubes(
            v,
            count=d.cubes_per_patient,
            cube=d.cube,
            margin=d.margin,
            max_dense_fraction=d.max_dense_fraction,
            rng=rng,
        )
        for v in volumes01
    ]
    cubes = np.concatenate(parts)
    if len(cubes) == 0:
        raise ValueError(
            "no pre-training cube passed the lung filter; raise data.max_dense_fraction or lower data.margin"
        )
    return torch.from_numpy(cubes)[:, None]


def patient_id(p: Any) -> int | str:
    """How the manifest names a patient: the LUNA16 series UID, or the phantom's index in its cohort."""
    return getattr(p, "uid", p.index)


def _split(items: list, sizes: Sequence[int], seed: Sequence[int]) -> list[list]:
    """Consecutive chunks of ``sizes`` (the last takes the rest) of one seeded permutation, each in index order."""
    order = np.random.default_rng(list(seed)).permutation(len(items))
    bounds = np.cumsum([0, *sizes, len(items) - sum(sizes)])
    return [[items[i] for i in sorted(order[a:b])] for a, b in itertools.pairwise(bounds)]


def load_cohorts(cfg: GenesisConfig, cache: Path) -> tuple[list, list, list, list, list]:
    """(pre-training train, pre-training held-out, target train, target val, target test) patients: phantoms
    (two cohorts, split by seeded permutations) or LUNA16 scans (split by subsets, the pool by permutation)."""
    d = cfg.data
    if d.source == "luna16":
        pool = luna16.cached_scans(d.root, cache, subsets=d.pretrain_subsets, shape=d.shape, max_scans=d.max_scans)
        n_val = max(1, round(len(pool) * d.pretrain_val_fraction))
        if len(pool) - n_val < 2:
            raise ValueError(f"LUNA16 subsets {d.pretrain_subsets} hold {len(pool)} scans: too few to pre-train on")
        va_pool, tr_pool = _split(pool, [n_val], [d.seed, 1])
        targets = [
            luna16.cached_scans(d.root, cache, subsets=s, shape=d.shape, max_scans=d.max_scans)
            for s in d.target_subsets
        ]
        return tr_pool, va_pool, *targets  # type: ignore[return-value]
    n_train, _ = cfg.unlabelled_split
    unlabelled = cached_cohort(cache, d.unlabelled_patients, seed=d.seed, shape=d.shape)
    tr_pool, va_pool = _split(unlabelled, [n_train], [d.seed, 1])
    t_train, t_val, t_test = d.target_patients
    target = cached_cohort(cache, t_train + t_val + t_test, seed=d.seed + 1, shape=d.shape)
    tr, va, te = _split(target, [t_train, t_val], [d.seed, 2])
    return tr_pool, va_pool, tr, va, te


def prepare_data(cfg: GenesisConfig, cache: Path, access: AccessLog) -> GenesisData:
    """Load (generate or read from ``cache``) both pools and cut every cube. Deterministic in ``data.seed``."""
    d = cfg.data
    pool_tr, pool_va, tr, va, te = load_cohorts(cfg, cache)

    def norm(ps: list[Patient]) -> np.ndarray:
        return clip_and_normalize(np.stack([p.volume for p in ps]))

    vol_tr, vol_va = norm(pool_tr), norm(pool_va)
    sets = {
        name: task_set(
            ps,
            cube=d.cube,
            negatives_per_positive=d.ncc_negatives_per_positive
            if name == "train"
            else d.ncc_eval_negatives_per_positive,
            jitter=d.ncs_jitter,
            seed=d.seed * 1000 + k,
        )
        for k, (name, ps) in enumerate((("train", tr), ("val", va), ("test", te)))
    }
    if d.source == "luna16":
        cohorts = {
            "unlabelled_cohort": {"luna16_subsets": d.pretrain_subsets, "patients": len(pool_tr) + len(pool_va)},
            "target_cohort": {"luna16_subsets": d.target_subsets, "patients": len(tr) + len(va) + len(te)},
        }
    else:
        cohorts = {
            "unlabelled_cohort": {"phantom_seed": d.seed, "patients": len(pool_tr) + len(pool_va)},
            "target_cohort": {"phantom_seed": d.seed + 1, "patients": len(tr) + len(va) + len(te)},
        }
    manifest = {
        **cohorts,
        "pretrain_train": [patient_id(p) for p in pool_tr],
        "pretrain_val": [patient_id(p) for p in pool_va],
        "target_train": sets["train"].patients,
        "target_val": sets["val"].patients,
        "target_test": sets["test"].patients,
        "label_fractions": {
            str(f): [sets["train"].patients[i] for i in fraction_patients(len(tr), f, seed=d.seed)]
            for f in cfg.finetune.label_fractions
        },
        "sizes": {k: s.sizes() for k, s in sets.items()},
        "used_by": {
            "self-discovery and pre-training": "unlabelled_cohort (pretrain_train; pretrain_val for the pretext "
            "validation loss and the validation members of the visual words)",
            "fine-tuning": "target_train at each label fraction",
            "model selection": "target_val",
            "final scores": "target_test, read once per fine-tuned model",
        },
    }
    data = GenesisData(
        pool_train=torch.from_numpy(vol_tr)[:, None],
        pool_val=torch.from_numpy(vol_va)[:, None],
        lung_train=np.stack([p.lung_mask for p in pool_tr]),
        lung_val=np.stack([p.lung_mask for p in pool_va]),
        labels_train=np.stack([p.labels for p in pool_tr]),
        cubes_train=_pool_cubes(vol_tr, cfg, d.seed * 1000 + 11),
        cubes_val=_pool_cubes(vol_va, cfg, d.seed * 1000 + 12),
        target_train=sets["train"],
        target_val=Guarded("val", sets["val"], access, allowed=VAL_PURPOSES),
        target_test=Guarded("test", sets["test"], access, allowed=TEST_PURPOSES),
        manifest=manifest,
    )
    manifest["sizes"]["pretrain_cubes"] = {"train": len(data.cubes_train), "val": len(data.cubes_val)}
    log.info("genesis data: %s", manifest["sizes"])
    return data
