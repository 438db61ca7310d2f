"""AutoDistill figures: the accuracy–latency Pareto front, hypervolume vs trials per sampler, flash vs longer
distillation ranks, and downstream accuracy per student."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from thrifty.core.figures import curves_with_band, grouped_bars, save_figure
from thrifty.methods.autodistill.search import pareto_mask


def pareto(
    trials: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], long: dict[str, dict[str, Any]], path: Path
) -> Path:
    """Every trial (flash accuracy vs latency), the front as a staircase, baselines as stars, and the longer
    distillation of the evaluated students as hollow markers joined to their flash point."""
    fig, ax = plt.subplots(figsize=(8.2, 4.6), dpi=110)
    pts = np.array([(t["val_acc"], t["latency_ratio"]) for t in trials]) if trials else np.zeros((0, 2))
    if len(pts):
        front = pareto_mask(pts)
        ax.scatter(pts[~front, 1], pts[~front, 0], s=22, c="0.6", label="search trials")
        f = pts[front][np.argsort(pts[front, 1])]
        ax.step(f[:, 1], f[:, 0], where="post", c="C0", lw=1.4)
        ax.scatter(f[:, 1], f[:, 0], s=34, c="C0", label="Pareto front (flash)", zorder=3)
    for i, (name, b) in enumerate(baselines.items()):
        ax.scatter(
            b["latency_ratio"], b["val_acc"], marker="*", s=160, c=f"C{i + 1}", label=f"{name} (flash)", zorder=4
        )
    for rec in long.values():
        ax.scatter(rec["flash_latency_ratio"], rec["val_acc"], s=40, facecolors="none", edgecolors="k", zorder=4)
        ax.plot([rec["flash_latency_ratio"]] * 2, [rec["flash_val_acc"], rec["val_acc"]], c="k", lw=0.6, alpha=0.5)
    ax.scatter([], [], s=40, facecolors="none", edgecolors="k", label="longer distillation (mean over seeds)")
    ax.set_xlabel("latency relative to the MobileBERT-like reference (median per-round ratio, this CPU)")
    ax.set_ylabel("masked-token accuracy (validation)")
    ax.set_title("AutoDistill search: accuracy vs measured latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def hypervolume(runs: list[dict[str, Any]], path: Path) -> Path:
    series: dict[str, list[tuple[list[float], list[float]]]] = {}
    for r in runs:
        xs = list(range(1, len(r["hv"]) + 1))
        series.setdefault(r["sampler"], []).append((xs, r["hv"]))
    return curves_with_band(
        series,
        xlabel="trials",
        ylabel="hypervolume (acc × latency ratio)",
        title="Samplers on the tabular benchmark",
        path=path,
    )


def rank_fidelity(flash: list[float], long: list[float], labels: list[str], tau: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.6, 4.4), dpi=110)
    ax.scatter(flash, long, c="C0")
    for x, y, lab in zip(flash, long, labels):
        ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("flash distillation accuracy")
    ax.set_ylabel("longer distillation accuracy")
    ax.set_title(f"Rank fidelity: Kendall τ = {tau:.2f}")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def downstream(table: dict[str, dict[str, tuple[float, float, float]]], path: Path) -> Path:
    return grouped_bars(table, ylabel="test accuracy", title="GLUE analogue (pooled linear head, 95% CI)", path=path)
