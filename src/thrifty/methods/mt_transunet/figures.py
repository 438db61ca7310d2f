"""Figures of the MT-TransUNet recipe (arXiv 2112.01767): per-arm Jaccard and AUC bars, melanoma and SK ROC curves
per arm, the masked-fraction curve, and validation images with the true (green) and predicted (red) lesion
outlines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import load_model

from thrifty.core.claims import mean_ci95
from thrifty.core.figures import curves_with_band, grouped_bars, save_figure
from thrifty.core.metrics import roc_curve
from thrifty.methods.mt_transunet.config import CLASSES

if TYPE_CHECKING:
    from thrifty.methods.mt_transunet.config import MTTransUNetConfig
    from thrifty.methods.mt_transunet.data import MTData


def arm_bars(results: dict[str, dict[int, dict]], trivial: dict[str, Any], split: str, path: Path) -> Path | None:
    """Jaccard and mean melanoma/SK AUC per arm with 95% intervals over seeds (the trivial baselines beside)."""
    groups: dict[str, dict[str, tuple[float, float, float]]] = {}
    for arm, per in results.items():
        for task, key, label in (("seg", "jaccard", "Jaccard"), ("cls", "mean_auc", "mean AUC")):
            vals = [r[split][task][key] for r in per.values() if task in r.get(split, {})]
            vals = [v for v in vals if np.isfinite(v)]
            if vals:
                m, (lo, hi) = mean_ci95(vals)
                groups.setdefault(arm, {})[label] = (m, lo, hi)
    if split in trivial:
        j, a = trivial[split]["seg"]["jaccard"], trivial[split]["cls"]["mean_auc"]
        groups["trivial\nbaselines"] = {"Jaccard": (j, j, j), "mean AUC": (a, a, a)}
    if not groups:
        return None
    return grouped_bars(groups, ylabel=f"{split} (%)", title="Per arm (mean, 95% interval over seeds)", path=path)


def roc_figure(results: dict[str, dict[int, dict]], labels: np.ndarray, path: Path) -> Path | None:
    """Melanoma-vs-rest and SK-vs-rest test ROC of each arm that classifies (its first seed)."""
    arms = [(a, per[min(per)]) for a, per in results.items() if per and "cls_probs" in per[min(per)].get("test", {})]
    if not arms:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.2), dpi=110)
    for ax, c in zip(axes, (0, 1)):
        y = (labels == c).astype(int)
        if not 0 < y.sum() < len(y):
            continue
        for arm, r in arms:
            fpr, tpr, _ = roc_curve(np.asarray(r["test"]["cls_probs"])[:, c], y)
            ax.plot(fpr, tpr, label=f"{arm} ({r['test']['cls'][('melanoma' if c == 0 else 'sk') + '_auc']:.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{CLASSES[c].replace('_', ' ')} vs rest (test, first seed)")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def sweep_curve(sweep: dict[float, dict[str, dict[int, dict]]], path: Path) -> Path | None:
    """Test Jaccard against the share of masks used, one band per arm."""
    if not sweep:
        return None
    fracs = sorted(sweep)
    series: dict[str, list[tuple[list[float], list[float]]]] = {}
    for arm in sorted({a for per in sweep.values() for a in per}):
        seeds = sorted(set.intersection(*[set(sweep[f].get(arm, {})) for f in fracs]))
        series[arm] = [([100 * f for f in fracs], [sweep[f][arm][s]["test"]["seg"]["jaccard"] for f in fracs])
                       for s in seeds]  # fmt: skip
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    return curves_with_band(series, xlabel="masks used (% of the masked half)", ylabel="test Jaccard (%)",
                            title="Masked-fraction sweep", path=path, logx=True)  # fmt: skip


def mask_overlays(model: torch.nn.Module | None, images: torch.Tensor, raw: np.ndarray, masks: np.ndarray,
                  labels: np.ndarray, path: Path, *, title: str) -> Path:  # fmt: skip
    """Images with the true lesion outline (green) and, with a ``model``, the predicted one (red) and class."""
    n = len(raw)
    pred_masks, pred_cls = None, None
    if model is not None:
        model.eval()
        with torch.inference_mode():
            out = model(images)
        pred_masks = (out.seg_logits.softmax(1)[:, 1] > 0.5).numpy()
        pred_cls = out.cls_logits.softmax(1).numpy()
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows), dpi=110, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(raw[i])
        ax.contour(masks[i], levels=[0.5], colors="lime", linewidths=0.8)
        text = CLASSES[int(labels[i])].replace("seborrheic_keratosis", "SK")
        if pred_masks is not None and pred_masks[i].any():
            ax.contour(pred_masks[i], levels=[0.5], colors="red", linewidths=0.8)
        if pred_cls is not None:
            text += f"\np(mel) {pred_cls[i, 0]:.2f} p(SK) {pred_cls[i, 1]:.2f}"
        ax.set_title(text, fontsize=6)
    fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


def overlay_arm(results: dict[str, dict[int, dict]]) -> tuple[str, int] | None:
    """The (arm, seed) whose predictions the masks figure shows: the full method's first seed, else the next arm
    that segments."""
    arm = next((a for a in ("seg+cls+dual", "seg+cls", "seg_only") if results.get(a)), None)
    return None if arm is None else (arm, min(results[arm]))


def make_all(run_dir: Path, results: dict[str, dict[int, dict]], sweep: dict[float, dict[str, dict[int, dict]]],
             trivial: dict[str, Any], data: MTData, cfg: MTTransUNetConfig,
             overlay_weights: Path | None = None) -> list[Path | None]:  # fmt: skip
    """Every figure; ``overlay_weights`` is the ``model.safetensors`` of :func:`overlay_arm`'s unit (None: the
    masks figure shows the true outlines only)."""
    from thrifty.methods.mt_transunet.model import build_model

    fig_dir = run_dir / "figures"
    split = "test" if cfg.final_test else "val"
    out: list[Path | None] = [arm_bars(results, trivial, split, fig_dir / "arms.png")]
    if cfg.final_test:
        test = data.test.get("figure", "figures")
        out.append(roc_figure(results, test.labels.numpy(), fig_dir / "roc.png"))
        out.append(sweep_curve(sweep, fig_dir / "masked_fraction.png"))
    val = data.val.get("figure", "figures").subset(range(min(cfg.figure_images, len(data.val))))
    chosen = overlay_arm(results)
    model = None
    if chosen is not None and overlay_weights is not None and overlay_weights.exists():
        model = build_model(cfg.model, num_classes=len(CLASSES), image_size=cfg.data.image_size)
        load_model(model, str(overlay_weights))
    title = "validation: true outline (green)" + (f", {chosen[0]} seed {chosen[1]} (red)" if model else "")
    out.append(mask_overlays(model, val.images, val.raw, val.masks.numpy(), val.labels.numpy(),
                             fig_dir / "masks.png", title=title))  # fmt: skip
    return out
