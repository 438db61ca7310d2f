"""Small matplotlib helpers shared by recipes (headless ``Agg`` backend, PNG output)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def save_figure(fig: plt.Figure, path: Path, *, tight: bool = True) -> Path:
    """Lay out, write (creating the directory) and close a figure; returns ``path``."""
    if tight:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches=None if tight else "tight")
    plt.close(fig)
    return path


def curves_with_band(
    series: dict[str, Sequence[tuple[Sequence[float], Sequence[float]]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    logx: bool = False,
    reference: tuple[float, str] | None = None,
) -> Path:
    """One line per label: the mean over its runs, with a min–max band.

    Args:
        series: label -> list of runs, each ``(xs, ys)``; runs of a label share their xs (the first
            run's xs are used, shorter runs are cut to the common length).
        reference: an optional horizontal reference line ``(y, label)`` (a baseline), drawn dashed.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, runs in series.items():
        runs = [r for r in runs if len(r[0])]
        if not runs:
            continue
        n = min(len(r[1]) for r in runs)
        xs = np.asarray(runs[0][0][:n], dtype=float)
        ys = np.stack([np.asarray(r[1][:n], dtype=float) for r in runs])
        (line,) = ax.plot(xs, ys.mean(0), label=f"{label} (n={len(runs)})", lw=1.8)
        if len(runs) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, lw=0)
    if reference is not None:
        ax.axhline(reference[0], color="black", ls="--", lw=1.2, label=reference[1])
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def heatmaps(
    panels: dict[str, np.ndarray],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    xticks: Sequence[float] | None = None,
    cbar_label: str = "",
) -> Path:
    """Side-by-side heat maps (one per panel) sharing a colour scale; arrays are ``[rows, cols]``."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1.0, 3.6), dpi=110, squeeze=False)
    vmax = max(float(np.nanmax(a)) for a in panels.values()) if panels else 1.0
    im = None
    for ax, (name, arr) in zip(axes[0], panels.items()):
        extent = None
        if xticks is not None and len(xticks) == arr.shape[1] and len(xticks) > 1:
            extent = (float(xticks[0]), float(xticks[-1]), arr.shape[0] - 0.5, -0.5)
        im = ax.imshow(arr, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, extent=extent, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label=cbar_label, shrink=0.9)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, tight=False)


def grouped_bars(
    groups: dict[str, dict[str, tuple[float, float, float]]],
    *,
    ylabel: str,
    title: str,
    path: Path,
) -> Path:
    """Bars with 95% interval whiskers: ``groups[group][bar] = (mean, lo, hi)``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    names = list(groups)
    bars = sorted({b for g in groups.values() for b in g})
    width = 0.8 / max(len(bars), 1)
    for j, b in enumerate(bars):
        xs, ms, errs = [], [], [[], []]
        for i, g in enumerate(names):
            if b in groups[g]:
                m, lo, hi = groups[g][b]
                xs.append(i + (j - (len(bars) - 1) / 2) * width)
                ms.append(m)
                errs[0].append(m - lo if np.isfinite(lo) else 0.0)
                errs[1].append(hi - m if np.isfinite(hi) else 0.0)
        ax.bar(xs, ms, width=width, yerr=errs, capsize=3, label=b)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(bars) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, path)
