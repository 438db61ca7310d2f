"""Figures of the "Data, assemble" recipe (Label-Assemble, arXiv 2109.12265): per-arm AUC bars, the label-count
curve, the target's ROC per arm and example validation images with their findings outlined."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from thrifty.core.claims import mean_ci95
from thrifty.core.figures import curves_with_band, grouped_bars, save_figure
from thrifty.core.metrics import roc_curve


def auc_bars(results: dict[str, dict[int, dict]], trivial: dict[str, Any], split: str, path: Path) -> Path | None:
    """Target / minority / macro AUC per arm with 95% intervals over seeds."""
    groups: dict[str, dict[str, tuple[float, float, float]]] = {}
    for arm, per in results.items():
        rs = [r[split] for r in per.values() if split in r]
        if not rs:
            continue
        groups[arm] = {}
        for key, label in (("target_auc", "target"), ("minority_auc", "minority"), ("macro_auc", "macro")):
            vals = [r[key] for r in rs if np.isfinite(r[key])]
            if vals:
                m, (lo, hi) = mean_ci95(vals)
                groups[arm][label] = (m, lo, hi)
    if split in trivial:
        v = trivial[split]["target_auc"]
        groups["pixel k-NN\n(training-free)"] = {"target": (v, v, v)}
    if not groups:
        return None
    return grouped_bars(
        groups, ylabel=f"{split} AUC (%)", title="AUC per arm (mean, 95% interval over seeds)", path=path
    )


def label_count_curve(sweep: dict[int, dict[str, dict[int, dict]]], path: Path) -> Path | None:
    """Target test AUC against the number of target-source images, one band per arm."""
    if not sweep:
        return None
    counts = sorted(sweep)
    arms = sorted({a for per in sweep.values() for a in per})
    series: dict[str, list[tuple[list[float], list[float]]]] = {}
    for arm in arms:
        seeds = sorted(set.intersection(*[set(sweep[n].get(arm, {})) for n in counts]))
        series[arm] = [
            ([float(n) for n in counts], [sweep[n][arm][s]["test"]["target_auc"] for n in counts]) for s in seeds
        ]
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    return curves_with_band(
        series, xlabel="target-source images (a quarter positive)", ylabel="target test AUC (%)",
        title="Label-count sweep", path=path, logx=True,
    )  # fmt: skip


def target_roc(results: dict[str, dict[int, dict]], labels: np.ndarray, path: Path) -> Path | None:
    """ROC of the target on the test split, first seed of each arm."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=110)
    drawn = False
    for arm, per in results.items():
        r = per[sorted(per)[0]]
        if "test_target_probs" not in r:
            continue
        fpr, tpr, _ = roc_curve(np.asarray(r["test_target_probs"]), labels)
        ax.plot(fpr, tpr, label=f"{arm} ({r['test']['target_auc']:.1f})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("Target ROC (test, first seed)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def example_images(images: np.ndarray, labels: np.ndarray, masks: np.ndarray | None, names: list[str], target: int,
                   count: int, path: Path) -> Path | None:  # fmt: skip
    """Validation images with every present finding outlined (one colour per label)."""
    n = min(count, len(images))
    if n == 0:
        return None
    # one image per finding (the target first), then one without findings, then the rest in order
    order: list[int] = []
    for j in [target, *[j for j in range(len(names)) if j != target]]:
        hit = next((i for i in np.flatnonzero(labels[:, j]) if i not in order), None)
        if hit is not None:
            order.append(int(hit))
    clean = np.flatnonzero(labels.sum(1) == 0)
    order += [int(i) for i in clean[:1]]
    order += [i for i in range(len(images)) if i not in order]
    order = order[:n]
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), dpi=110, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, i in zip(axes.ravel(), order):
        ax.imshow(images[i, 0], cmap="gray", vmin=0, vmax=1)
        present = [j for j in range(len(names)) if labels[i, j]]
        if masks is not None and masks.shape[1] == len(names):
            for j in present:
                if masks[i, j].any():
                    ax.contour(masks[i, j].astype(float), levels=[0.5], colors=[colours(j % 10)], linewidths=0.8)
        ax.set_title(", ".join(names[j] for j in present) or "no finding", fontsize=6)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("Validation images and their findings (outlined)", fontsize=9)
    return save_figure(fig, path)


def make_all(run_dir: Path, results: dict, sweep: dict, trivial: dict, data: Any, cfg: Any) -> list[Path | None]:
    out = run_dir / "figures"
    split = "test" if cfg.final_test else "val"
    figs = [auc_bars(results, trivial, split, out / f"{split}_auc_per_arm.png")]
    if cfg.final_test:
        figs.append(label_count_curve(sweep, out / "label_count_curve.png"))
        test = data.test.get("figure", "figures")
        figs.append(target_roc(results, test.labels[:, data.target_index].numpy().astype(int), out / "target_roc.png"))
    val = data.val.get("figure", "figures")
    figs.append(example_images(val.images.numpy(), val.labels.numpy(), val.masks, data.label_names,
                               data.target_index, cfg.figure_images, out / "examples.png"))  # fmt: skip
    return figs
