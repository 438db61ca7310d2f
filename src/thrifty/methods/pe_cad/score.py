"""Scoring new CTPA exams with a trained PE CAD model (arXiv 2109.07029): one command from a DICOM exam folder to the
nine exam-level probabilities and every slice's PE probability.

``--checkpoint`` is a **stage-2 unit** (``<run>/units/stage2/<kind>/seed<k>``). Its ``result.json`` records the
stage-1 arm whose features it was trained on (``features_arm``, same seed), so the pair is found in the same run:

* stage 1: ``<run>/units/stage1/<arm>/seed<k>/`` — ``card.json`` (backbone, its settings, image size, window) and
  ``model.safetensors``;
* stage 2: the unit's ``model.safetensors``, built from the run's resolved ``config.yaml`` (``stage2.hidden``,
  ``seq_len``, ``attention``, ``long_mode``; ``data.lung_crop``; ``stage1.eval_batch_size``).

Weights are read with safetensors only (nothing is unpickled). Each exam goes through the training path, reusing
its functions: :func:`thrifty.data.rsna_pe.load_exam` (slices sorted by ``ImagePositionPatient[2]``, rescaled to
HU; a bad or missing slice is one :class:`~thrifty.data.rsna_pe.ExamDataError` naming the file), then
:func:`~thrifty.methods.pe_cad.data.preprocess_exam` (window, lung crop, resize; float16 as the training cache
stores it), the 3-slice stacks of :class:`~thrifty.methods.pe_cad.data.ExamSet`, the stage-1 penultimate features
and probabilities (``train.score_slices``, as ``features_unit`` extracts them), then
:func:`~thrifty.methods.pe_cad.stage2.prepare_exam` (length fitting and the difference features), the stage-2
model, and :func:`~thrifty.methods.pe_cad.stage2.unfit_predictions` back to the exam's slices.

The stage-1 features of an exam are cached (``<out>/feature_cache/<digest>.npz``; the digest covers the bytes of
every file of the exam folder and the stage-1 weights, card and preprocessing settings), so scoring the same exams
again, or with another stage-2 unit trained on the same stage-1 unit, skips DICOM decoding and stage 1.

From Python::

    scorer = ExamScorer.load("runs/pe_cad/quick/units/stage2/cc/seed0")
    pred = scorer.score_volume(volume_hu)      # (S, H, W) in HU, ascending z -> ExamPrediction
    pred.exam_probs                            # (9,) in EXAM_LABELS order

``thrifty score pe_cad --checkpoint UNIT_DIR exam_folder/ [more/] --out DIR`` writes ``exams.csv`` (one row per
exam: the nine probabilities) and ``slices.csv`` (one row per slice, in z order: file, SOPInstanceUID, z, the
stage-1 probability and, for the kinds trained with slice labels — ``cc``, ``evit`` — the stage-2 one; MIL kinds
train on exam labels only, so their column is empty).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model
from torch import nn

from thrifty.core import cache
from thrifty.core.checkpoint import load_unit_model
from thrifty.core.config import ConfigError, load_config
from thrifty.core.run import atomic_write_bytes, atomic_write_text, resolve_device
from thrifty.data.ctpa_synth import EXAM_LABELS
from thrifty.data.rsna_pe import ExamDataError, load_exam
from thrifty.methods.pe_cad.config import PECadConfig
from thrifty.methods.pe_cad.data import assemble, exam_set, preprocess_exam
from thrifty.methods.pe_cad.stage1 import build_backbone
from thrifty.methods.pe_cad.stage2 import build_stage2, prepare_exam, unfit_predictions
from thrifty.methods.pe_cad.train import SLICE_TRAINED, score_slices, stage1_dir

__all__ = ["EXAM_LABELS", "ExamPrediction", "ExamScorer", "ScoringError", "exam_folders", "score_files"]

#: bump when the cached arrays or the preprocessing change meaning
CACHE_VERSION = 1
EXAM_CSV = "exams.csv"
SLICE_CSV = "slices.csv"


class ScoringError(ValueError):
    """A checkpoint that cannot be used for scoring, or inputs that are not exam folders; the message names the
    file or folder."""


@dataclasses.dataclass
class ExamPrediction:
    """What the model says about one exam of S slices (ascending z).

    Attributes:
        exam_probs: float32 (9,) exam-label probabilities in :data:`EXAM_LABELS` order.
        slice_probs: float32 (S,) stage-2 per-slice PE probabilities, or None for a kind trained on exam labels
            only (MIL: its slice head never saw a label).
        stage1_probs: float32 (S,) the stage-1 classifier's PE probability of each slice.
        features: float32 (S, D) the stage-1 penultimate features.
    """

    exam_probs: np.ndarray
    slice_probs: np.ndarray | None
    stage1_probs: np.ndarray
    features: np.ndarray


def _sha256_file(path: Path, h: Any) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def _digest_files(files: Sequence[Path]) -> str:
    """sha256 over each file's name, size and bytes (in the given order)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        _sha256_file(f, h)
    return h.hexdigest()


class ExamScorer:
    """A trained stage-1 backbone and stage-2 model, with the preprocessing settings of their run.

    Use :meth:`load` on a stage-2 unit directory; :meth:`score_volume` maps a volume in HU to an
    :class:`ExamPrediction`; :meth:`stage1` and :meth:`stage2` are its two halves (features are what the cache
    stores)."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        model: nn.Module,
        kind: str,
        cfg: PECadConfig,
        card: dict[str, Any],
        stage1_digest: str,
        device: torch.device,
    ) -> None:
        self.backbone = backbone.to(device).eval()
        self.model = model.to(device).eval()
        self.kind = kind
        self.cfg = cfg
        self.card = card
        self.stage1_digest = stage1_digest
        self.device = device
        self.image_size = int(card["image_size"])
        self.level, self.width = (float(v) for v in card["window"])
        self.lung_crop = bool(cfg.data.lung_crop)

    @property
    def slice_trained(self) -> bool:
        """Whether the stage-2 slice head was trained (``cc``, ``evit``); MIL kinds use exam labels only."""
        return self.kind in SLICE_TRAINED

    @classmethod
    def load(cls, checkpoint: str | Path, *, device: str | torch.device = "auto") -> ExamScorer:
        """The scorer of a stage-2 unit ``<run>/units/stage2/<kind>/seed<k>`` and the stage-1 unit its
        ``result.json`` names. ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` … Raises :class:`ScoringError`
        naming the file for anything missing or inconsistent."""
        unit = Path(checkpoint)
        result_file, weights = unit / "result.json", unit / "model.safetensors"
        if not unit.is_dir():
            raise ScoringError(f"{unit}: the checkpoint does not exist (pass <run>/units/stage2/<kind>/seed<k>)")
        if (unit / "card.json").is_file():
            raise ScoringError(
                f"{unit}: a stage-1 unit; pass the stage-2 unit trained on its features "
                "(<run>/units/stage2/<kind>/seed<k>), which names its stage-1 unit"
            )
        if not result_file.is_file() or not weights.is_file():
            found = sorted(str(p.parent) for p in unit.glob("units/stage2/*/seed*/result.json"))
            hint = f"; the stage-2 units under it: {', '.join(found)}" if found else ""
            raise ScoringError(
                f"{unit}: not a finished pe_cad stage-2 unit (needs result.json and model.safetensors; pass "
                f"<run>/units/stage2/<kind>/seed<k>){hint}"
            )
        try:
            result = json.loads(result_file.read_text())
            kind, seed, arm = str(result["kind"]), int(result["seed"]), str(result["features_arm"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ScoringError(f"{result_file} is not a pe_cad stage-2 result ({err})") from None
        resolved = unit.resolve()
        run_dir = resolved.parents[3] if len(resolved.parents) > 3 else resolved
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise ScoringError(f"{config_file} does not exist: the stage-2 unit must sit in its run directory")
        try:
            cfg = load_config(PECadConfig, preset_file=config_file)
        except ConfigError as err:
            raise ScoringError(f"{config_file}: not a pe_cad run config ({err})") from None
        s1_unit = stage1_dir(run_dir, arm, seed)

        def build_s1(card: dict[str, Any]) -> nn.Module:
            return build_backbone(card["backbone"], image_size=int(card["image_size"]), **card["backbone_kwargs"])

        backbone, card = load_unit_model(s1_unit, build_s1, recipe="pe_cad", error=ScoringError)
        if len(card.get("window", ())) != 2:
            raise ScoringError(f"{s1_unit / 'card.json'}: no window [level, width]")
        s2 = cfg.stage2
        extra = {"attention": s2.attention} if kind == "cc" else {}
        in_dim = 3 * int(backbone.feature_dim)
        try:
            model = build_stage2(kind, in_dim=in_dim, hidden=s2.hidden, seq_len=s2.seq_len, **extra)
            missing, unexpected = load_model(model, str(weights), strict=False)
        except (RuntimeError, ValueError) as err:
            raise ScoringError(
                f"{weights} does not match {config_file} and the stage-1 unit {s1_unit} ({err})"
            ) from None
        if missing or unexpected:
            raise ScoringError(
                f"{weights} does not match a {kind!r} model built from {config_file} (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
        h = hashlib.sha256()
        _sha256_file(s1_unit / "model.safetensors", h)
        _sha256_file(s1_unit / "card.json", h)
        settings = {"stage1": h.hexdigest(), "lung_crop": cfg.data.lung_crop, "version": CACHE_VERSION}
        dev = resolve_device(device) if isinstance(device, str) else device
        return cls(backbone=backbone, model=model, kind=kind, cfg=cfg, card=card,
                   stage1_digest=cache.settings_digest(settings, length=32), device=dev)  # fmt: skip

    @torch.no_grad()
    def stage1(self, volume_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One exam (S, H, W) in HU, ascending z -> (features float32 (S, D), stage-1 probabilities float32 (S,)),
        exactly as the recipe's feature stage computes them (window, lung crop, resize to float16, 3-slice stacks
        with edges replicated, eval mode)."""
        pre = preprocess_exam(volume_hu, size=self.image_size, level=self.level, width=self.width,
                              lung_crop=self.lung_crop, trivial=False)  # fmt: skip
        s = len(pre["slices"])
        unlabelled = {"slice_labels": np.zeros(s, np.uint8), "exam_labels": np.zeros(len(EXAM_LABELS), np.uint8),
                      "study_id": ""}  # fmt: skip
        exams = exam_set(assemble([pre | unlabelled], keep_masks=False))
        probs, feats = score_slices(self.backbone, exams, batch_size=self.cfg.stage1.eval_batch_size,
                                    device=self.device, features=True)  # fmt: skip
        assert feats is not None
        return feats.astype(np.float32), probs.astype(np.float32)

    @torch.no_grad()
    def stage2(self, features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Slice features (S, D) -> (exam probabilities float32 (9,), stage-2 slice probabilities float32 (S,) or
        None for a MIL kind): fitted to ``stage2.seq_len`` rows with the difference features, as in training, and
        the slice probabilities resized back to S (``unfit_predictions``)."""
        f = torch.as_tensor(np.asarray(features, dtype=np.float32))
        s2 = self.cfg.stage2
        fitted = prepare_exam(f, s2.seq_len, long_mode=s2.long_mode)
        out = self.model(fitted.x[None].to(self.device), fitted.valid[None].to(self.device))
        exam_p = torch.sigmoid(out.exam_logits[0].float()).cpu().numpy().astype(np.float32)
        if not self.slice_trained:
            return exam_p, None
        slice_p = unfit_predictions(torch.sigmoid(out.slice_logits[0].float()).cpu(), f.shape[0],
                                    long_mode=s2.long_mode)  # fmt: skip
        return exam_p, slice_p.numpy().astype(np.float32)

    def score_volume(self, volume_hu: np.ndarray) -> ExamPrediction:
        """One exam (S, H, W) in HU, slices in ascending z -> :class:`ExamPrediction` (the in-memory path)."""
        feats, probs = self.stage1(volume_hu)
        return self.predict_features(feats, probs)

    def predict_features(self, features: np.ndarray, stage1_probs: np.ndarray) -> ExamPrediction:
        """Stage 2 on already extracted slice features (S, D) and their stage-1 probabilities (S,)."""
        exam_p, slice_p = self.stage2(features)
        return ExamPrediction(exam_probs=exam_p, slice_probs=slice_p, stage1_probs=np.asarray(stage1_probs),
                              features=np.asarray(features))  # fmt: skip


# ------------------------------------------------------------------------------------------------------ files


def exam_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The exam folders under ``paths``: a folder holding (non-hidden) files is one exam (one series); a folder
    holding only folders is searched recursively (e.g. an RSNA ``<study>/<series>/`` tree), in sorted order."""
    out: list[Path] = []

    def walk(d: Path) -> None:
        entries = sorted(p for p in d.iterdir() if not p.name.startswith("."))
        if any(p.is_file() for p in entries):
            out.append(d)
            return
        for p in entries:
            if p.is_dir():
                walk(p)

    for p in map(Path, paths):
        if not p.exists():
            raise ScoringError(f"{p} does not exist")
        if not p.is_dir():
            raise ScoringError(f"{p}: expected an exam folder (the DICOM slices of one series), got a file")
        before = len(out)
        walk(p)
        if len(out) == before:
            raise ScoringError(f"{p}: no DICOM files in this folder or below it")
    return out


def _exam_files(folder: Path) -> list[Path]:
    """The files of an exam folder (non-hidden, sorted by name): what :func:`load_exam` reads."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _write_csv_atomic(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def exam_features(scorer: ExamScorer, folder: Path, cache_dir: Path) -> tuple[dict[str, np.ndarray], bool]:
    """The stage-1 arrays of one exam folder and whether they came from the cache: ``features`` (S, D),
    ``probs`` (S,), ``names`` (S,) file names in z order, ``sop_uids`` (S,), ``z`` (S,) mm (NaN without
    positions), ``study_uid`` / ``series_uid`` (0-d). Raises :class:`ExamDataError` naming a bad file."""
    files = _exam_files(folder)
    if not files:
        raise ExamDataError(f"{folder}: the exam folder holds no files")
    key = cache.settings_digest({"exam": _digest_files(files), "stage1": scorer.stage1_digest}, length=32)
    path = cache_dir / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}, True
        except (OSError, ValueError, EOFError):
            path.unlink(missing_ok=True)  # a damaged cache entry is recomputed
    volume, meta = load_exam(files)
    feats, probs = scorer.stage1(volume)
    z = meta.z_positions if meta.z_positions is not None else np.full(len(files), np.nan)
    arrays = {
        "features": feats,
        "probs": probs,
        "names": np.asarray([f.name for f in meta.files], dtype=str),
        "sop_uids": np.asarray(meta.sop_instance_uids, dtype=str),
        "z": np.asarray(z, dtype=np.float64),
        "study_uid": np.asarray(meta.study_instance_uid, dtype=str),
        "series_uid": np.asarray(meta.series_instance_uid, dtype=str),
    }
    _save_npz_atomic(path, arrays)
    return arrays, False


def score_files(
    checkpoint: str | Path,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    skip_bad: bool = False,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "auto",
) -> Path:
    """Score exam folders with a stage-2 unit; write ``exams.csv`` and ``slices.csv`` under ``out_dir`` (each
    through a temporary file, after every exam is scored) and return the path of ``exams.csv``.

    ``paths``: exam folders, or folders above them (:func:`exam_folders`). ``cache_dir`` (default
    ``out_dir/feature_cache``) holds one ``.npz`` of stage-1 features per exam and stage-1 checkpoint. A bad exam
    (unreadable or non-DICOM file, missing slice, mixed series …) raises
    :class:`~thrifty.data.rsna_pe.ExamDataError` naming the file, or with ``skip_bad`` gets a row saying why."""
    scorer = ExamScorer.load(checkpoint, device=device)
    folders = exam_folders(paths)
    out = Path(out_dir)
    cache_path = Path(cache_dir) if cache_dir is not None else out / "feature_cache"
    exam_rows: list[list[str]] = []
    slice_rows: list[list[str]] = []
    for folder in folders:
        try:
            arrays, hit = exam_features(scorer, folder, cache_path)
        except ExamDataError as err:
            if not skip_bad:
                raise
            exam_rows.append([str(folder), "", "", "", *[""] * len(EXAM_LABELS), "", f"skipped: {err}"])
            continue
        pred = scorer.predict_features(arrays["features"], arrays["probs"])
        study, series = str(arrays["study_uid"]), str(arrays["series_uid"])
        exam_rows.append([str(folder), study, series, str(len(arrays["names"])),
                          *[f"{p:.6f}" for p in pred.exam_probs], "hit" if hit else "miss", ""])  # fmt: skip
        for i, name in enumerate(arrays["names"].tolist()):
            z = float(arrays["z"][i])
            s2 = "" if pred.slice_probs is None else f"{pred.slice_probs[i]:.6f}"
            slice_rows.append([str(folder), study, str(i), name, str(arrays["sop_uids"][i]),
                               "" if np.isnan(z) else f"{z:.4f}", f"{pred.stage1_probs[i]:.6f}", s2])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    exam_csv = out / EXAM_CSV
    _write_csv_atomic(exam_csv, ["exam", "study_instance_uid", "series_instance_uid", "slices",
                                 *[f"p_{n}" for n in EXAM_LABELS], "feature_cache", "note"], exam_rows)  # fmt: skip
    _write_csv_atomic(out / SLICE_CSV, ["exam", "study_instance_uid", "slice", "file", "sop_instance_uid", "z_mm",
                                        "p_pe_stage1", f"p_pe_{scorer.kind}"], slice_rows)  # fmt: skip
    return exam_csv
