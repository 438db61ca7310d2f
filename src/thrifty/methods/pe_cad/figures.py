"""Figures of the PE CAD recipe (arXiv 2109.07029): validation slices with the emboli outlined, the test ROC of
every exam label per stage-2 kind, and per-arm bars (stage-1 image AUC, stage-2 mean exam AUC)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from thrifty.core.claims import mean_ci95
from thrifty.core.figures import grouped_bars, save_figure
from thrifty.core.metrics import roc_curve
from thrifty.data.ctpa_synth import EXAM_LABELS

if TYPE_CHECKING:
    from thrifty.methods.pe_cad.config import PECadConfig
    from thrifty.methods.pe_cad.data import Exams, PECadData


def _band(values: list[float | None]) -> tuple[float, float, float] | None:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None
    m, (lo, hi) = mean_ci95(vals)
    return m, lo, hi


def arm_bars(stage1: dict[str, dict[int, dict]], stage2: dict[str, dict[int, dict]], trivial: dict[str, Any],
             split: str, path: Path) -> Path | None:  # fmt: skip
    """Stage-1 image AUC per arm and stage-2 mean exam AUC per kind, mean and 95% interval over seeds; the trivial
    baseline's image AUC beside."""
    groups: dict[str, dict[str, tuple[float, float, float]]] = {}
    key = "test_image_auc" if split == "test" else "val_image_auc"
    for arm, per in stage1.items():
        band = _band([r.get(key) for r in per.values()])
        if band:
            groups[arm] = {"image AUC": band}
    for kind, per in stage2.items():
        band = _band([r.get(split, {}).get("mean_exam_auc") for r in per.values()])
        if band:
            groups[kind] = {"mean exam AUC": band}
    t = trivial.get(split, {}).get("image_auc")
    if t is not None:
        groups["defect\nfraction"] = {"image AUC": (t, t, t)}
    if not groups:
        return None
    return grouped_bars(groups, ylabel=f"{split} AUC (%)", title="Stage-1 arms and stage-2 kinds (95% interval)",
                        path=path)  # fmt: skip


def roc_per_label(stage2: dict[str, dict[int, dict]], exam_labels: np.ndarray, trivial_scores: list[float] | None,
                  path: Path) -> Path | None:  # fmt: skip
    """One panel per exam label: the test ROC of each stage-2 kind (its first seed); on ``negative_exam_for_pe`` the
    trivial baseline (the exam's maximum defect fraction, negated) too."""
    kinds = [(k, per[min(per)]) for k, per in stage2.items() if per and "test" in per[min(per)]]
    if not kinds:
        return None
    fig, axes = plt.subplots(3, 3, figsize=(10.5, 10.0), dpi=100)
    for k, (ax, name) in enumerate(zip(axes.ravel(), EXAM_LABELS)):
        y = exam_labels[:, k].astype(int)
        ax.set_title(name, fontsize=9)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        if not 0 < y.sum() < len(y):
            ax.text(0.5, 0.5, "one class only", ha="center", va="center", fontsize=8)
            continue
        for kind, r in kinds:
            fpr, tpr, _ = roc_curve(np.asarray(r["test"]["exam_probs"])[:, k], y)
            auc = r["test"]["exam_auc"][name]
            ax.plot(fpr, tpr, lw=1.2, label=f"{kind} ({auc:.1f})" if auc is not None else kind)
        if k == 0 and trivial_scores is not None:
            fpr, tpr, _ = roc_curve(-np.asarray(trivial_scores), y)
            ax.plot(fpr, tpr, "k--", lw=1.0, label="defect fraction")
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Test ROC per exam label (first seed)", fontsize=10)
    return save_figure(fig, path)


def example_slices(
    exams: Exams, n: int, path: Path, *, probs: tuple[str, np.ndarray] | None = None, trivial_column: int = 0
) -> Path | None:
    """Validation slices (the centre channel of the stage-1 input): PE-positive slices first with the emboli
    outlined (green, synthetic data), then negatives; titles give the label, the trivial score (the setting
    ``trivial_column`` chosen on validation) and, with ``probs``
    (name, per-slice probabilities), the stage-1 probability. Only the n slices shown are read."""
    if n <= 0 or exams.num_slices == 0:
        return None
    pos = np.flatnonzero(exams.slice_labels == 1)
    neg = np.flatnonzero(exams.slice_labels == 0)
    k = min(len(pos), (n + 1) // 2)
    take = np.r_[pos[np.linspace(0, len(pos) - 1, k).astype(int)] if k else [],
                 neg[np.linspace(0, len(neg) - 1, min(len(neg), n - k)).astype(int)] if len(neg) else []]  # fmt: skip
    take = take.astype(int)
    cols = min(len(take), 4)
    rows = (len(take) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    images, masks = exams.slice_images(take).float().numpy(), exams.slice_masks(take)
    for k, (ax, i) in enumerate(zip(axes.ravel(), take)):
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=1)
        if masks is not None and masks[k].any():
            ax.contour(masks[k], levels=[0.5], colors="lime", linewidths=0.8)
        e = int(exams.exam_of[i])
        text = f"{'PE' if exams.slice_labels[i] else 'no PE'} · exam {e} slice {i - exams.offsets[e]}"
        text += f"\ndefect fraction {exams.trivial[i, trivial_column]:.3f}"
        if probs is not None:
            text += f"\np(PE) {probs[1][i]:.2f}"
        ax.set_title(text, fontsize=7)
    title = "validation slices (window 100/700, lung crop); emboli outlined"
    if probs is not None:
        title += f"; stage 1: {probs[0]}"
    fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


def make_all(run_dir: Path, stage1: dict[str, dict[int, dict]], stage2: dict[str, dict[int, dict]],
             trivial: dict[str, Any], data: PECadData, cfg: PECadConfig,
             example_probs: tuple[str, np.ndarray] | None = None) -> list[Path | None]:  # fmt: skip
    """Every figure (``figures/arms.png``, ``roc.png`` with a test split, ``slices.png``)."""
    fig_dir = run_dir / "figures"
    split = "test" if cfg.final_test else "val"
    out: list[Path | None] = [arm_bars(stage1, stage2, trivial, split, fig_dir / "arms.png")]
    if cfg.final_test and stage2:
        test = data.test.get("figure", "figures")
        out.append(roc_per_label(stage2, test.exam_labels, trivial.get("test", {}).get("exam_scores"),
                                 fig_dir / "roc.png"))  # fmt: skip
    if cfg.figure_slices:
        val = data.val.get("figure", "figures")
        out.append(
            example_slices(
                val,
                cfg.figure_slices,
                fig_dir / "slices.png",
                probs=example_probs,
                trivial_column=int(trivial.get("column", 0)),
            )
        )
    return out
