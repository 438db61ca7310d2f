"""Data of the PE CAD recipe (arXiv 2109.07029): CTPA exams as windowed, lung-cropped slices with slice and exam labels.

Every exam goes through the same steps, synthetic or real (the release delegates them to the Kaggle first-place
preprocessing; here they are native):

1. the volume in HU, slices in ascending z (``thrifty.data.rsna_pe.load_exam`` sorts real series by
   ``ImagePositionPatient[2]`` and applies the rescale; the generator draws them in order);
2. the window, level 100 / width 700 ([-250, 450] HU -> [0, 1], clipped; ``ctpa_synth.window``);
3. the exam's lung bounding box (``ctpa_synth.lung_bbox``: air-like voxels inside the body, over all slices) and a
   bilinear resize of the crop to ``stage1.image_size`` (``stage1.crop_resize``, the release's ``cv2.resize``);
4. the training-free baseline score of each slice on the raw HU (``ctpa_synth.defect_fraction``).

The cache stores one channel per slice (float16); the three-channel stacks (slices i-1, i, i+1 of the same exam,
edges replicated — ``stage1.stack_slices``) are gathered on the fly by :meth:`ExamSet.stacks`, so a split costs
a third of the memory.

Splits, by study (no study in two splits):

=========  =============================================================================================
split      what the recipe uses it for
=========  =============================================================================================
``train``  pretraining (its slices without labels; ``supervised`` uses a non-PE source task), stage 1, stage 2
``val``    stage-1 step selection, the choice of the stage-1 arm whose features feed stage 2, stage-2 epoch
           selection, the trivial baseline's calibration, figures
``test``   read once per unit, at its end; feature extraction of the chosen arm; figures
=========  =============================================================================================

Synthetic (the card's miniature): 120 / 40 / 80 exams from :mod:`thrifty.data.ctpa_synth`, each split from its own
seed (study ids ``ctpa-<seed>-<index>`` are unique per seed), cached as one ``.npz`` per split under the data
directory by the digest of their settings. Real (``data.source=rsna``): the RSNA-STR ``train.csv`` and DICOM tree
(:func:`thrifty.data.rsna_pe.scan_rsna`), split by a study-level manifest (given, or drawn and written into the
run directory), cached the same way. Validation and test are :class:`~thrifty.core.splits.Guarded`: every read
names its purpose and lands in ``access_log.jsonl``.

Stores (``data.store``). ``memory`` holds every split as an :class:`ExamSet` (the miniature presets). ``exams``
(the full-scale path) writes each preprocessed exam to its own file under the same cache directory and reads a
batch's slices at a time (:class:`~thrifty.methods.pe_cad.exam_store.ExamStore`, the same interface); both read the
same exam jobs (:func:`synthetic_jobs`, :func:`real_jobs`), so they hold the same numbers. Stage-1 features come back
whole (:class:`FeatureSet`) or as per-exam files read on demand (:class:`FeatureFiles`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from thrifty.core import cache
from thrifty.core.distributed import DistInfo
from thrifty.core.run import main_first, write_json
from thrifty.core.splits import AccessLog, Guarded
from thrifty.data import ctpa_synth
from thrifty.data.ctpa_synth import EXAM_LABELS
from thrifty.methods.pe_cad.config import PECadConfig
from thrifty.methods.pe_cad.exam_store import (
    ExamJob,
    ExamOffsets,
    ExamStore,
    IndexLike,
    StackView,
    as_rows,
    build_exam_split,
    check_file_names,
    exam_file_name,
    safetensors_metadata,
    save_safetensors_atomic,
    stack_neighbours,
)
from thrifty.methods.pe_cad.stage1 import crop_resize

log = logging.getLogger(__name__)

VAL_PURPOSES = ("selection", "calibration", "features", "figure")
TEST_PURPOSES = ("final_test", "features", "figure")
SPLITS = ("train", "val", "test")
DATA_VERSION = 2  # 2: the trivial score under every setting of ctpa_synth.DEFECT_FRACTION_GRID
#: the emboli masks are kept for the splits the figures show (synthetic data only)
MASK_SPLITS = ("val",)
#: the exams of every split, to preprocess (``data.store: memory`` and ``exams`` read the same jobs)
Jobs = dict[str, list[ExamJob]]


@dataclasses.dataclass
class ExamSet(ExamOffsets):
    """The slices of E exams, concatenated in exam order (N slices in all).

    Attributes:
        slices: float16 (N, H, W), windowed, lung-cropped and resized, in [0, 1].
        offsets: int64 (E + 1,); exam e holds slices ``offsets[e] : offsets[e + 1]`` (ascending z).
        slice_labels: uint8 (N,) ``pe_present_on_image``.
        exam_labels: uint8 (E, 9) in :data:`~thrifty.data.ctpa_synth.EXAM_LABELS` order.
        study_ids: str (E,) ``StudyInstanceUID`` (synthetic: ``ctpa-<seed>-<index>``).
        trivial: float64 (N, G) the training-free defect-fraction score of each slice under each of the G settings
            of :data:`~thrifty.data.ctpa_synth.DEFECT_FRACTION_GRID` (the baseline picks one on validation).
        masks: uint8 (N, H, W) the emboli masks after the same crop and resize (synthetic validation only) or None.
    """

    slices: torch.Tensor
    offsets: np.ndarray
    slice_labels: np.ndarray
    exam_labels: np.ndarray
    study_ids: np.ndarray
    trivial: np.ndarray
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        # slices i-1, i, i+1 of the same exam, the first and last replicating themselves (stage1.stack_slices)
        self.neighbours = torch.from_numpy(stack_neighbours(np.arange(self.num_slices), self.offsets))

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.slices.shape[1]), int(self.slices.shape[2])

    def stacks(self, idx: IndexLike, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The 3-slice stacks of slices ``idx``: (n, 3, H, W) in ``dtype``."""
        nb = self.neighbours[idx] if isinstance(idx, slice) else self.neighbours[torch.as_tensor(idx)]
        return self.slices[nb].to(dtype)

    def slice_images(self, idx: IndexLike) -> torch.Tensor:
        """The slices ``idx`` themselves: float16 (n, H, W)."""
        return self.slices[torch.from_numpy(as_rows(idx, self.num_slices))]

    def slice_masks(self, idx: IndexLike) -> np.ndarray | None:
        """The emboli masks of slices ``idx`` (uint8 (n, H, W)), or None when the split keeps none."""
        return None if self.masks is None else self.masks[as_rows(idx, self.num_slices)]


def exam_set(arrays: dict[str, np.ndarray]) -> ExamSet:
    """An :class:`ExamSet` from its cached arrays."""
    return ExamSet(
        slices=torch.from_numpy(np.ascontiguousarray(arrays["slices"], dtype=np.float16)),
        offsets=np.asarray(arrays["offsets"], dtype=np.int64),
        slice_labels=np.asarray(arrays["slice_labels"], dtype=np.uint8),
        exam_labels=np.asarray(arrays["exam_labels"], dtype=np.uint8),
        study_ids=np.asarray(arrays["study_ids"]).astype(str),
        trivial=np.asarray(arrays["trivial"], dtype=np.float64).reshape(len(arrays["slice_labels"]), -1),
        masks=np.asarray(arrays["masks"], dtype=np.uint8) if "masks" in arrays else None,
    )


#: a split's exams: all slices in memory (``data.store: memory``) or read lazily from per-exam files (``exams``)
Exams = ExamSet | ExamStore


def stack_view(exams: Exams) -> StackView:
    """The (N, 3, H, W) stacks of ``exams`` as an array-like gathering float16 stacks on indexing (pretraining's
    input: no copy of every training stack)."""
    return StackView(exams, dtype=torch.float16)


class GuardedExams(Guarded[Exams]):
    """Validation or test exams that can only be read by naming an allowed purpose."""

    def __init__(self, split: str, data: Exams, access: AccessLog) -> None:
        super().__init__(split, data, access, allowed=VAL_PURPOSES if split == "val" else TEST_PURPOSES)


@dataclasses.dataclass
class PECadData:
    """Everything the units train and are judged on.

    Attributes:
        train: the training exams (pretraining, stage 1, stage 2); an :class:`ExamSet` or, with ``data.store:
            exams``, an :class:`~thrifty.methods.pe_cad.exam_store.ExamStore`.
        val / test: guarded held-out exams.
        info: split sizes and label counts (for ``results.json``).
        digest: the digest of the data settings (the pretraining cache key includes it; the same for both stores).
    """

    train: Exams
    val: GuardedExams
    test: GuardedExams
    info: dict[str, Any]
    digest: str


# ------------------------------------------------------------------------------------------ one exam


def preprocess_exam(
    volume_hu: np.ndarray,
    *,
    size: int,
    level: float,
    width: float,
    lung_crop: bool,
    masks: np.ndarray | None = None,
    trivial: bool = True,
) -> dict[str, np.ndarray]:
    """One exam (S, H, W) in HU -> ``slices`` float16 (S, size, size) windowed, cropped, resized; ``trivial``
    (S, G) the defect-fraction scores on the raw HU (``ctpa_synth.DEFECT_FRACTION_GRID``; (S, 0) with
    ``trivial=False``, as scoring new exams needs no baseline); ``masks`` uint8
    (S, size, size) when ``masks`` is given (the same crop and resize, a pixel set where the resized mask exceeds
    0.25 so thin emboli survive); ``bbox`` the crop box (x0, y0, x1, y1)."""
    vol = np.asarray(volume_hu)
    if vol.ndim != 3 or 0 in vol.shape:
        raise ValueError(f"expected an exam volume (S, H, W), got shape {vol.shape}")
    _, h, w = vol.shape
    y0, y1, x0, x1 = ctpa_synth.lung_bbox(vol) if lung_crop else (0, h, 0, w)
    box = (x0, y0, x1, y1)
    windowed = torch.from_numpy(ctpa_synth.window(vol, level=level, width=width))
    out = {
        "slices": crop_resize(windowed[:, None], box, size)[:, 0].numpy().astype(np.float16),
        "trivial": ctpa_synth.defect_fraction_grid(vol) if trivial else np.zeros((len(vol), 0)),
        "bbox": np.asarray(box, dtype=np.int64),
    }
    if masks is not None:
        m = crop_resize(torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None], box, size)[:, 0]
        out["masks"] = (m.numpy() > 0.25).astype(np.uint8)
    return out


def assemble(exams: list[dict[str, Any]], *, keep_masks: bool) -> dict[str, np.ndarray]:
    """Concatenate preprocessed exams (``slices``, ``trivial``, ``slice_labels``, ``exam_labels``, ``study_id``,
    optional ``masks``) into one split's arrays."""
    counts = [len(e["slices"]) for e in exams]
    out = {
        "slices": np.concatenate([e["slices"] for e in exams]),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "slice_labels": np.concatenate([np.asarray(e["slice_labels"], dtype=np.uint8) for e in exams]),
        "exam_labels": np.stack([np.asarray(e["exam_labels"], dtype=np.uint8) for e in exams]),
        "study_ids": np.asarray([e["study_id"] for e in exams], dtype=str),
        "trivial": np.concatenate([e["trivial"] for e in exams]).astype(np.float64),
    }
    if keep_masks:
        out["masks"] = np.concatenate([e["masks"] for e in exams])
    return out


# --------------------------------------------------------------------------------------------- synthetic


def synthetic_settings(cfg: PECadConfig) -> dict[str, Any]:
    """What the cached synthetic splits depend on (their cache key)."""
    d = cfg.data
    return {
        "synthetic": dataclasses.asdict(d.synthetic),
        "image_size": cfg.stage1.image_size,
        "window": [d.window_level, d.window_width],
        "lung_crop": d.lung_crop,
        "version": DATA_VERSION,
    }


def split_seeds(seed: int) -> dict[str, int]:
    """One generator seed per split, derived from the data seed (study ids are unique per seed)."""
    return {name: seed * 100 + k for k, name in enumerate(SPLITS, start=1)}


def _synthetic_exam(cfg: PECadConfig, spec: ctpa_synth.CTPASpec, seed: int, index: int, *,
                    keep_masks: bool) -> dict[str, Any]:  # fmt: skip
    """Generator exam ``index`` of ``seed``, preprocessed, with its labels and study id."""
    d = cfg.data
    ex = ctpa_synth.generate_exam(seed, index=index, spec=spec)
    pre = preprocess_exam(ex.volume, size=cfg.stage1.image_size, level=d.window_level, width=d.window_width,
                          lung_crop=d.lung_crop, masks=ex.emboli_masks if keep_masks else None)  # fmt: skip
    return pre | {"slice_labels": ex.slice_labels, "exam_labels": ex.exam_labels, "study_id": ex.study_id}


def synthetic_jobs(cfg: PECadConfig) -> Jobs:
    """Every split's exams as jobs, in split order (exam i of split k is the generator's exam i of its seed)."""
    syn = cfg.data.synthetic
    spec = ctpa_synth.CTPASpec.from_overrides(syn.spec)
    seeds = split_seeds(syn.seed)
    sizes = {"train": syn.train_exams, "val": syn.val_exams, "test": syn.test_exams}

    def job(name: str, i: int) -> ExamJob:
        load = lambda: _synthetic_exam(cfg, spec, seeds[name], i, keep_masks=keeps_masks(cfg, name))
        return ExamJob(f"ctpa-{seeds[name]}-{i}", load)  # the generator's study id (checked when loaded)

    return {name: [job(name, i) for i in range(n)] for name, n in sizes.items()}


# ------------------------------------------------------------------------------------------------- real


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _real_exam(cfg: PECadConfig, record: Any) -> dict[str, Any]:
    """One RSNA-STR exam read from its DICOMs (z-sorted, in HU), preprocessed, with its labels and study id."""
    from thrifty.data import rsna_pe

    d = cfg.data
    volume, _, pe = rsna_pe.load_rsna_exam(record)
    pre = preprocess_exam(volume, size=cfg.stage1.image_size, level=d.window_level, width=d.window_width,
                          lung_crop=d.lung_crop)  # fmt: skip
    return pre | {"slice_labels": pe, "exam_labels": record.label_vector(), "study_id": record.study}


def real_jobs(cfg: PECadConfig, run_dir: Path, *, write_manifest: bool = True) -> tuple[dict[str, Any], Jobs]:
    """The RSNA-STR exams of ``data.real`` as jobs per split, and the settings they depend on (the cache key).

    The split is a given manifest, or one drawn from ``split_fractions`` / ``split_seed`` (the same on every rank);
    with ``write_manifest`` it is written to ``run_dir / split_manifest.json``."""
    from thrifty.data import rsna_pe

    real, d = cfg.data.real, cfg.data
    root = Path(real.root).expanduser()
    records = rsna_pe.scan_rsna(root, _resolve(root, real.labels_csv), columns=real.columns or None,
                                layout=real.layout)  # fmt: skip
    studies = sorted({r.study for r in records})
    if real.manifest:
        manifest = _resolve(root, real.manifest)
        splits = rsna_pe.read_manifest(manifest)
        unknown = sorted({s for v in splits.values() for s in v} - set(studies))
        if unknown:
            raise rsna_pe.ExamDataError(
                f"{manifest}: {len(unknown)} study(ies) not in the label CSV, e.g. {unknown[:3]}"
            )
        missing = len(set(studies) - {s for v in splits.values() for s in v})
        if missing:
            log.warning("%s: %d study(ies) of the label CSV are in no split and are not used", manifest, missing)
    else:
        splits = rsna_pe.split_studies(studies, fractions=real.split_fractions, seed=real.split_seed)
    if write_manifest:
        rsna_pe.write_manifest(run_dir / "split_manifest.json", splits)
    for name in SPLITS:
        if not splits.get(name):
            raise rsna_pe.ExamDataError(f"split {name!r} has no study (data.real.manifest / split_fractions)")
    settings = {
        "rsna": {"root": str(root), "labels_csv": real.labels_csv, "columns": dict(real.columns),
                 "layout": real.layout},
        "splits": cache.settings_digest(splits),
        "max_exams": real.max_exams,
        "image_size": cfg.stage1.image_size,
        "window": [d.window_level, d.window_width],
        "lung_crop": d.lung_crop,
        "version": DATA_VERSION,
    }  # fmt: skip
    jobs = {}
    for name in SPLITS:
        wanted = set(splits[name])
        recs = [r for r in records if r.study in wanted]
        if real.max_exams:
            recs = recs[: real.max_exams]
        jobs[name] = [ExamJob(r.study, lambda r=r: _real_exam(cfg, r)) for r in recs]
    return settings, jobs


# ---------------------------------------------------------------------------------------------- shared


def _source(cfg: PECadConfig, run_dir: Path, *, write_manifest: bool) -> tuple[str, str, dict[str, Any], Jobs]:
    """(source name, cache prefix, settings, jobs per split) of the configured data source."""
    if cfg.data.source == "synthetic":
        return "synthetic", "pe_cad", synthetic_settings(cfg), synthetic_jobs(cfg)
    settings, jobs = real_jobs(cfg, run_dir, write_manifest=write_manifest)
    return "rsna", "pe_cad-rsna", settings, jobs


def keeps_masks(cfg: PECadConfig, split: str) -> bool:
    """Whether a split keeps the emboli masks: synthetic data, the splits the figures show (:data:`MASK_SPLITS`)."""
    return cfg.data.source == "synthetic" and split in MASK_SPLITS


def _in_memory(cfg: PECadConfig, root: Path, run_dir: Path, access: AccessLog, *, is_main: bool) -> PECadData:
    """``data.store: memory``: every split's slices in memory, cached as one ``.npz`` per split. ``is_main``: this
    is the main rank (the one that writes the split manifest of real data)."""
    source, prefix, settings, jobs = _source(cfg, run_dir, write_manifest=is_main)

    def build() -> dict[str, dict[str, np.ndarray]]:
        return {name: assemble([job.load() for job in jobs[name]], keep_masks=keeps_masks(cfg, name))
                for name in SPLITS}  # fmt: skip

    what = "CTPA exams" if source == "synthetic" else "RSNA-STR exams"
    directory = cache.cache_dir(root, prefix, settings)
    arrays = cache.cached_splits(directory, SPLITS, build, settings=settings, what=what)
    sets: dict[str, Exams] = {k: exam_set(v) for k, v in arrays.items()}
    return _data(sets, access, source=source, digest=cache.settings_digest(settings))


def exam_store_dir(directory: Path, split: str) -> Path:
    """Where a split's per-exam files live under its data cache directory: ``<cache>/exams/<split>/``."""
    return Path(directory) / "exams" / split


def _streamed(cfg: PECadConfig, root: Path, run_dir: Path, access: AccessLog, info: DistInfo | None) -> PECadData:
    """``data.store: exams``: every exam preprocessed once into its own file (sharded over the ranks), then read
    lazily (:class:`~thrifty.methods.pe_cad.exam_store.ExamStore`)."""
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    source, prefix, settings, jobs = _source(cfg, run_dir, write_manifest=rank == 0)
    directory = cache.cache_dir(root, prefix, settings)
    digest = cache.settings_digest(settings)
    for name in SPLITS:
        written = build_exam_split(exam_store_dir(directory, name), jobs[name], split=name, digest=digest,
                                   keep_masks=keeps_masks(cfg, name), rank=rank, world_size=world)  # fmt: skip
        if written:
            log.info("%s: preprocessed %d exam(s) into %s", name, written, exam_store_dir(directory, name))
    if rank == 0 and not (directory / "settings.json").exists():
        write_json(directory / "settings.json", settings)  # for people who look, as the in-memory cache writes it
    sets: dict[str, Exams] = {
        name: ExamStore.open(exam_store_dir(directory, name), digest=digest, open_exams=cfg.data.open_exams)
        for name in SPLITS
    }
    return _data(sets, access, source=source, digest=digest)


def _data(sets: dict[str, Exams], access: AccessLog, *, source: str, digest: str) -> PECadData:
    check_disjoint_studies(sets)
    return PECadData(
        train=sets["train"],
        val=GuardedExams("val", sets["val"], access),
        test=GuardedExams("test", sets["test"], access),
        info=data_info(sets, source=source),
        digest=digest,
    )


def check_disjoint_studies(sets: dict[str, Exams]) -> None:
    """ValueError naming the study when one appears in two splits."""
    owner: dict[str, str] = {}
    for name, s in sets.items():
        for study in s.study_ids.tolist():
            if owner.get(study, name) != name:
                raise ValueError(f"study {study!r} is in both split {owner[study]!r} and split {name!r}")
            owner[study] = name


def data_info(sets: dict[str, Exams], *, source: str) -> dict[str, Any]:
    """Split sizes and label counts (for ``results.json``)."""
    info: dict[str, Any] = {"source": source, "exam_labels": list(EXAM_LABELS)}
    for name, s in sets.items():
        counts = s.slice_counts
        info[name] = {
            "exams": s.num_exams,
            "slices": s.num_slices,
            "slices_per_exam": [int(counts.min()), int(counts.max())] if len(counts) else [0, 0],
            "positive_slices": int(s.slice_labels.sum()),
            "positive_exams": int(s.exam_any_pe().sum()),
            "exam_label_counts": {n: int(c) for n, c in zip(EXAM_LABELS, s.exam_labels.sum(0).tolist())},
        }
    return info


def prepare_data(
    cfg: PECadConfig, root: Path, run_dir: Path, access: AccessLog, *, info: DistInfo | None = None
) -> PECadData:
    """The train / val / test exams of ``data.source`` held as ``data.store`` says.

    ``memory``: built (and cached) by rank 0 first, then read by the other ranks. ``exams``: every rank preprocesses
    the exams dealt to it, rank 0 writes each split's index, and every rank opens the lazy stores. With either, rank
    0 alone writes the split manifest of real data. ``info``: the process's place under ``torchrun`` (None: one
    process)."""
    if cfg.data.store == "exams":
        return _streamed(cfg, root, run_dir, access, info)
    place = info or DistInfo()
    return main_first(lambda: _in_memory(cfg, root, run_dir, access, is_main=place.is_main), place)


# ------------------------------------------------------------------------------------ stage-1 features


@dataclasses.dataclass
class FeatureSet(ExamOffsets):
    """One split's stage-1 slice features, per exam, in memory: what stage 2 reads with ``data.store: memory``.

    On disk one safetensors file per exam (:func:`save_exam_features`) under
    ``units/stage1/<arm>/seed<k>/features/<split>/`` with an ``index.json`` listing the exams in split order
    (:func:`write_feature_index`); the extraction writes them sharded by exam over the ranks, and every process —
    one or many — reads the split back whole with :func:`load_feature_split` (or, with ``data.store: exams``,
    leaves them on disk: :class:`FeatureFiles`).

    Attributes:
        features: float32 (N, D) penultimate features of every slice, exams concatenated in order.
        probs: float32 (N,) the stage-1 PE probability of every slice.
        offsets / slice_labels / exam_labels / study_ids: as :class:`ExamSet`.
    """

    features: torch.Tensor
    probs: np.ndarray
    offsets: np.ndarray
    slice_labels: np.ndarray
    exam_labels: np.ndarray
    study_ids: np.ndarray

    def exams(self, idx: Sequence[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(feats (S, D), slice_labels (S,), exam_labels (9,))`` of exams ``idx`` (default: all), in order
        (``stage2.collate_exams``' input)."""
        out = []
        for e in range(len(self)) if idx is None else idx:
            a, b = int(self.offsets[e]), int(self.offsets[e + 1])
            out.append((self.features[a:b], torch.from_numpy(self.slice_labels[a:b].astype(np.float32)),
                        torch.from_numpy(self.exam_labels[e].astype(np.float32))))  # fmt: skip
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"features": self.features.numpy(), "probs": self.probs, "offsets": self.offsets,
                "slice_labels": self.slice_labels, "exam_labels": self.exam_labels,
                "study_ids": self.study_ids}  # fmt: skip


def feature_set(arrays: dict[str, np.ndarray]) -> FeatureSet:
    return FeatureSet(
        features=torch.from_numpy(np.ascontiguousarray(arrays["features"], dtype=np.float32)),
        probs=np.asarray(arrays["probs"], dtype=np.float32),
        offsets=np.asarray(arrays["offsets"], dtype=np.int64),
        slice_labels=np.asarray(arrays["slice_labels"], dtype=np.uint8),
        exam_labels=np.asarray(arrays["exam_labels"], dtype=np.uint8),
        study_ids=np.asarray(arrays["study_ids"]).astype(str),
    )


#: the per-exam feature file's tensors: features (S, D) float32, probs (S,) float32, slice_labels (S,) uint8,
#: exam_labels (9,) uint8
EXAM_FEATURE_KEYS = ("features", "probs", "slice_labels", "exam_labels")
FEATURE_INDEX = "index.json"
FEATURE_FORMAT = 1


#: the file name of an exam's features: the exam store's (:func:`~.exam_store.exam_file_name`)
exam_feature_name = exam_file_name


def save_exam_features(
    path: Path,
    *,
    features: torch.Tensor,
    probs: torch.Tensor,
    slice_labels: np.ndarray,
    exam_labels: np.ndarray,
    study_id: str,
    digest: str,
) -> None:
    """Write one exam's stage-1 output as safetensors, atomically (a temporary file, then a rename).

    features: (S, D) float; probs: (S,) float; slice_labels: (S,) {0, 1}; exam_labels: (9,) {0, 1}. The metadata
    holds the study id and ``digest``, the settings digest of the extraction (a file of other settings is not reused).
    """
    s = features.shape[0]
    if features.ndim != 2 or probs.shape != (s,) or len(slice_labels) != s:
        raise ValueError(f"exam {study_id}: features {tuple(features.shape)}, probs {tuple(probs.shape)} and "
                         f"{len(slice_labels)} slice labels do not describe one exam of S slices")  # fmt: skip
    tensors = {
        "features": features.detach().float().cpu().contiguous(),
        "probs": probs.detach().float().cpu().contiguous(),
        "slice_labels": torch.from_numpy(np.ascontiguousarray(slice_labels, dtype=np.uint8)),
        "exam_labels": torch.from_numpy(np.ascontiguousarray(exam_labels, dtype=np.uint8)),
    }
    save_safetensors_atomic(path, tensors, {"study_id": str(study_id), "digest": digest,
                                            "format": str(FEATURE_FORMAT)})  # fmt: skip


def exam_feature_digest(path: Path) -> str | None:
    """The settings digest stored in a per-exam feature file; None when the file is missing or unreadable."""
    meta = safetensors_metadata(path)
    return None if meta is None else meta.get("digest")


def read_exam_features(path: Path) -> dict[str, torch.Tensor]:
    """One exam's tensors (:data:`EXAM_FEATURE_KEYS`) from its safetensors file; a clear error naming the file when
    it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path}: not a readable per-exam feature file ({err})") from None
    missing = [k for k in EXAM_FEATURE_KEYS if k not in out]
    if missing:
        raise ValueError(f"{path}: a per-exam feature file needs tensors {list(EXAM_FEATURE_KEYS)}, lacks {missing}")
    return out


def write_feature_index(directory: Path, *, split: str, study_ids: Sequence[str], settings: dict[str, Any]) -> None:
    """``directory / index.json``: the split's exams in order (study id, file name) and the extraction settings;
    written last, so its presence means every exam's file is there."""
    check_file_names(study_ids, split=split)
    exams = [{"study_id": str(sid), "file": exam_feature_name(sid)} for sid in study_ids]
    write_json(directory / FEATURE_INDEX, {"split": split, "format": FEATURE_FORMAT, "settings": settings,
                                           "exams": exams})  # fmt: skip


def feature_index(directory: Path) -> dict[str, Any] | None:
    """The split's ``index.json`` when it exists and every exam file it lists is present, else None."""
    path = Path(directory) / FEATURE_INDEX
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    if not all((path.parent / e["file"]).is_file() for e in index.get("exams", [])):
        return None
    return index


def load_feature_split(directory: Path) -> FeatureSet:
    """One split's features from its per-exam files, in the order of ``index.json`` (the one loader of stage 2,
    for one process or many)."""
    directory = Path(directory)
    index = feature_index(directory)
    if index is None:
        raise FileNotFoundError(f"{directory}: no complete per-exam feature split (index.json and every exam file)")
    parts = [read_exam_features(directory / e["file"]) for e in index["exams"]]
    if not parts:
        raise ValueError(f"{directory}: the split lists no exam")
    counts = [int(p["features"].shape[0]) for p in parts]
    return FeatureSet(
        features=torch.cat([p["features"].float() for p in parts]),
        probs=torch.cat([p["probs"].float() for p in parts]).numpy(),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        slice_labels=torch.cat([p["slice_labels"] for p in parts]).numpy().astype(np.uint8),
        exam_labels=torch.stack([p["exam_labels"] for p in parts]).numpy().astype(np.uint8),
        study_ids=np.asarray([e["study_id"] for e in index["exams"]]).astype(str),
    )


class FeatureFiles(ExamOffsets):
    """One split's stage-1 features left in their per-exam files (``data.store: exams``): slice counts and labels
    in memory, an exam's features read only when a batch or an evaluation shard needs it, so a stage-2 rank reads
    its share of the split rather than all of it (:func:`open_feature_split`).

    Attributes:
        files: the exam files in split order; feature_dim: D.
        offsets / slice_labels / exam_labels / study_ids: as :class:`FeatureSet`.
    """

    def __init__(self, directory: Path, index: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.files = [self.directory / e["file"] for e in index["exams"]]
        if not self.files:
            raise ValueError(f"{directory}: the split lists no exam")
        self.study_ids = np.asarray([e["study_id"] for e in index["exams"]]).astype(str)
        labels, exam_labels, dims = [], [], set()
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    labels.append(f.get_tensor("slice_labels").numpy().astype(np.uint8))
                    exam_labels.append(f.get_tensor("exam_labels").numpy().astype(np.uint8))
                    dims.add(int(f.get_slice("features").get_shape()[1]))
            except (OSError, ValueError, RuntimeError, SafetensorError) as err:
                raise ValueError(f"{path}: not a readable per-exam feature file ({err})") from None
        if len(dims) != 1:
            raise ValueError(f"{directory}: the exams' feature sizes differ ({sorted(dims)})")
        self.feature_dim = dims.pop()
        self.offsets = np.concatenate([[0], np.cumsum([len(v) for v in labels])]).astype(np.int64)
        self.slice_labels = np.concatenate(labels)
        self.exam_labels = np.stack(exam_labels)
        self._probs: np.ndarray | None = None

    @property
    def probs(self) -> np.ndarray:
        """float32 (N,) the stage-1 probability of every slice (read on first use)."""
        if self._probs is None:
            self._probs = np.concatenate([read_exam_features(p)["probs"].float().numpy() for p in self.files])
        return self._probs

    def exams(self, idx: Sequence[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """As :meth:`FeatureSet.exams`, reading exams ``idx`` (default: all) from their files."""
        out = []
        for e in range(len(self)) if idx is None else idx:
            t = read_exam_features(self.files[e])
            out.append((t["features"].float(), t["slice_labels"].float(), t["exam_labels"].float()))
        return out


def open_feature_split(directory: Path) -> FeatureFiles:
    """One split's features as :class:`FeatureFiles` (labels now, features on demand), in ``index.json`` order."""
    index = feature_index(directory)
    if index is None:
        raise FileNotFoundError(f"{directory}: no complete per-exam feature split (index.json and every exam file)")
    return FeatureFiles(directory, index)


#: a split's stage-1 features, in memory or left in their files
Features = FeatureSet | FeatureFiles


class GuardedFeatures(Guarded[Features]):
    """Validation or test features: reads name their purpose, like the exams they come from."""

    def __init__(self, split: str, data: Features, access: AccessLog) -> None:
        super().__init__(split, data, access, allowed=VAL_PURPOSES if split == "val" else TEST_PURPOSES)


__all__ = [
    "EXAM_FEATURE_KEYS",
    "FEATURE_INDEX",
    "MASK_SPLITS",
    "SPLITS",
    "TEST_PURPOSES",
    "VAL_PURPOSES",
    "ExamSet",
    "Exams",
    "FeatureFiles",
    "FeatureSet",
    "Features",
    "GuardedExams",
    "GuardedFeatures",
    "PECadData",
    "assemble",
    "check_disjoint_studies",
    "data_info",
    "exam_feature_digest",
    "exam_feature_name",
    "exam_set",
    "exam_store_dir",
    "feature_index",
    "feature_set",
    "load_feature_split",
    "open_feature_split",
    "prepare_data",
    "preprocess_exam",
    "read_exam_features",
    "real_jobs",
    "save_exam_features",
    "split_seeds",
    "stack_view",
    "synthetic_jobs",
    "write_feature_index",
]
