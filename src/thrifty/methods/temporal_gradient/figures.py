"""Figures of the temporal-gradient recipe (Xiao et al., CVPR 2022, arXiv 2111.13241): top-1 per arm, accuracy
against the labelled fraction, pseudo-label precision and recall per class, and example clips with their TG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from thrifty.core.claims import mean_ci95
from thrifty.core.figures import curves_with_band, grouped_bars, save_figure
from thrifty.methods.temporal_gradient.data import two_streams


def accuracy_bars(results: dict[str, dict[int, dict]], trivial: dict[str, Any], split: str, path: Path) -> Path | None:
    """Top-1 and mean class accuracy per arm with 95% intervals over seeds (and the single-frame control)."""
    groups: dict[str, dict[str, tuple[float, float, float]]] = {}
    for arm, per in results.items():
        rs = [r[split] for r in per.values() if r.get(split)]
        if rs:
            groups[arm] = {}
            for key, label in (("top1", "top-1"), ("mean_class", "mean class")):
                m, (lo, hi) = mean_ci95([r[key] for r in rs])
                groups[arm][label] = (m, lo, hi)
    if trivial.get(split):
        m, (lo, hi) = mean_ci95(list(trivial[split].values()))
        groups["single frame\n(control)"] = {"top-1": (m, lo, hi)}
    if not groups:
        return None
    return grouped_bars(groups, ylabel=f"{split} accuracy (%)", title="RGB-only accuracy per arm", path=path)


def fraction_curve(sweep: dict[float, dict[str, dict[int, dict]]], path: Path) -> Path | None:
    """Test top-1 against the labelled fraction, one band per arm."""
    if not sweep:
        return None
    fractions = sorted(sweep)
    series: dict[str, list[tuple[list[float], list[float]]]] = {}
    for arm in sorted({a for per in sweep.values() for a in per}):
        seeds = sorted(set.intersection(*[set(sweep[f].get(arm, {})) for f in fractions]))
        runs = [([100 * f for f in fractions], [sweep[f][arm][s]["test"]["top1"] for f in fractions]) for s in seeds]
        if runs:
            series[arm] = runs
    if not series:
        return None
    return curves_with_band(series, xlabel="labelled videos (%)", ylabel="test top-1 (%)",
                            title="Accuracy against the labelled fraction", path=path, logx=True)  # fmt: skip


def pseudo_label_quality(results: dict[str, dict[int, dict]], classes: list[str], path: Path) -> Path | None:
    """Per-class precision and recall of the kept pseudo-labels (after warm-up, summed over seeds) per arm."""
    arms = [a for a, per in results.items() if any(np.asarray(r["pseudo"]["confusion"]).sum() for r in per.values())]
    if not arms:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    x = np.arange(len(classes))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        conf = sum(np.asarray(r["pseudo"]["confusion"], dtype=float) for r in results[arm].values())
        tp = np.diag(conf)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / conf.sum(0)  # of the clips pseudo-labelled c, truly c
            recall = tp / conf.sum(1)  # of the kept clips truly c, pseudo-labelled c
        for ax, vals in zip(axes, (precision, recall)):
            ax.bar(x + (k - (len(arms) - 1) / 2) * width, 100 * np.nan_to_num(vals), width, label=arm)
    for ax, name in zip(axes, ("precision", "recall")):
        ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"pseudo-label {name} per class (kept clips)")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("%")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


def example_clips(video: torch.Tensor, indices: torch.Tensor, labels: np.ndarray, classes: list[str], path: Path
                  ) -> Path:  # fmt: skip
    """One row per clip: the sampled RGB frames and, below them, their temporal gradient. ``video`` float
    (n, 3, F, H, W), ``indices`` (n, T) sampled frames, ``labels`` (n,)."""
    n, t = indices.shape
    rgb, grad = two_streams(video, indices, "tg")
    fig, axes = plt.subplots(2 * n, t, figsize=(t * 0.9, n * 1.9))
    for r in range(n):
        for j in range(t):
            axes[2 * r, j].imshow(rgb[r, :, j].permute(1, 2, 0).numpy())
            g = grad[r, :, j].mean(0).numpy()
            axes[2 * r + 1, j].imshow(g, cmap="coolwarm", vmin=0.3, vmax=0.7)
        axes[2 * r, 0].set_ylabel(classes[int(labels[r])], fontsize=7, rotation=0, ha="right")
        axes[2 * r + 1, 0].set_ylabel("TG", fontsize=7, rotation=0, ha="right")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Validation clips (RGB, sampled frames) and their temporal gradient", fontsize=9)
    return save_figure(fig, path)


def make_all(run_dir: Path, results: dict, sweep: dict, trivial: dict, data: Any, cfg: Any) -> list[Path | None]:
    out = run_dir / "figures"
    split = "test" if cfg.final_test else "val"
    figs = [accuracy_bars(results, trivial, split, out / f"{split}_accuracy_per_arm.png")]
    if cfg.final_test:
        figs.append(fraction_curve(sweep, out / "label_fraction_curve.png"))
    figs.append(pseudo_label_quality(results, data.class_names, out / "pseudo_label_quality.png"))
    val = data.val.get("figure", "figures")
    picks = np.concatenate([np.flatnonzero(val.labels == c)[:1] for c in range(min(len(data.class_names), 10))])
    video, idx = val.clips(picks, cfg, context=1, rng=None, test_mode=True)  # the first test clip of each
    figs.append(example_clips(video, idx[:, 0], val.labels[picks], data.class_names, out / "examples.png"))
    return figs
