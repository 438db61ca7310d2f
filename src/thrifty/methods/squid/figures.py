"""SQUID figures: ROC curves, validation AUROC vs steps, per-type AUROC with intervals, and input /
in-painted reconstruction / difference panels for normal and abnormal test images.

Plots plain data handed over by the training module (result records, the test set, unit directories of saved
models); it never imports ``train``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from thrifty.core.claims import mean_ci95
from thrifty.core.figures import curves_with_band, grouped_bars, save_figure
from thrifty.core.metrics import roc_curve
from thrifty.methods.squid.score import Scorer


def roc_figure(results: dict[str, dict[int, dict]], labels: np.ndarray, path: Path) -> Path:
    """ROC of every arm on the test set, first seed (dashed: other seeds)."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=110)
    for arm, per in results.items():
        color = None
        for i, (seed, r) in enumerate(sorted(per.items())):
            fpr, tpr, _ = roc_curve(np.asarray(r["test_scores"]), labels)
            kw = {"lw": 1.8, "label": f"{arm} (AUROC {r['test']['auroc']:.1f}, seed {seed})"} if i == 0 else {}
            (line,) = ax.plot(fpr, tpr, color=color, ls="-" if i == 0 else ":", alpha=1.0 if i == 0 else 0.5, **kw)
            color = line.get_color()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("Test ROC (solid: first seed; dotted: the others)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def score_curves(results: dict[str, dict[int, dict]], path: Path) -> Path | None:
    """Validation AUROC against generator steps for every score of every generator unit (one line per unit and
    score), with the normal images' reconstruction MSE on a second axis: whether, and when, each score works."""
    units = [(arm, seed, r) for arm, per in results.items() for seed, r in sorted(per.items()) if r["curve"]]
    # training-free arms (no curve) are drawn as horizontal lines at their validation AUROC
    if not units:
        return None
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.0, 6.4), dpi=110, sharex=True, height_ratios=[2, 1])
    styles = {"discriminator": "-", "recon": "--", "cell_zmax": ":"}
    for arm, seed, r in units:
        steps = [c["step"] for c in r["curve"]]
        color = None
        for kind, ls in styles.items():
            if kind in r["curve"][0]:
                label = f"{arm} seed {seed}: {kind}" + (" (paper's score)" if kind == "discriminator" else "")
                (line,) = ax.plot(steps, [c[kind] for c in r["curve"]], ls=ls, color=color, lw=1.6, label=label)
                color = line.get_color()
        ax2.plot(steps, [c["recon_mse_normal"] for c in r["curve"]], color=color, lw=1.4, label=f"{arm} seed {seed}")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    for arm, per in sorted(results.items()):
        flat = [r["val_auroc"] for r in per.values() if not r["curve"]]
        if not flat:
            continue
        level = float(np.mean(flat))
        ax.axhline(level, color="black", lw=1.0, ls="-." if arm == "cell_nn" else (0, (1, 3)))
        ax.annotate(
            f"{arm} (training-free)",
            (1.0, level),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=7,
        )
    ax.set_ylabel("validation AUROC (%)")
    ax.set_title("Validation AUROC against training steps, per score")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax2.set_xlabel("generator step")
    ax2.set_ylabel("recon. MSE, val normals")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    return save_figure(fig, path)


def reconstruction_figure(
    models: dict[str, torch.nn.Module], images: torch.Tensor, captions: list[str], path: Path
) -> Path:
    """Rows: input, then per model its reconstruction and |input − reconstruction|; columns: images."""
    rows = [("input", images)]
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            recon = model(images)["recon"]
            rows += [(f"{name} recon", recon), (f"{name} |diff|", (images - recon).abs())]
    n = images.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.35 * len(rows)), dpi=110, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c, 0].numpy(), cmap="magma" if "diff" in name else "gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
            if r == 0:
                ax.set_title(captions[c], fontsize=7)
    return save_figure(fig, path)


def make_all(
    run_dir: Path, results: dict[str, dict[int, dict]], data: Any, cfg: Any, model_dirs: Mapping[str, Path]
) -> list[Path]:
    """Every figure of a run under ``run_dir/figures``; returns their paths.

    ``model_dirs`` maps an arm to the unit directory of the saved model drawn in the reconstruction panels (its
    first seed; see ``train.figure_model_dirs``); an arm left out gets no panel rows.
    """
    fig_dir = run_dir / "figures"
    test = data.test.get("figure", "figures")
    out = [roc_figure(results, test.labels, fig_dir / "roc.png")]
    shown = {a: p for a, p in results.items() if a in ("squid", "cell_nn", "mean_image")}
    by_score = score_curves(shown, fig_dir / "val_auroc_by_score.png")
    if by_score is not None:
        out.append(by_score)
    curves = {
        arm: [([c["step"] for c in r["curve"]], [c[r["score"]] for c in r["curve"]]) for r in per.values()]
        for arm, per in results.items()
        if any(r["curve"] for r in per.values())
    }
    if curves:
        out.append(
            curves_with_band(
                curves,
                xlabel="generator step",
                ylabel="validation AUROC (%)",
                title="Validation AUROC (each arm's own score) during training (mean, min–max over seeds)",
                path=fig_dir / "val_auroc.png",
            )
        )
    groups: dict[str, dict[str, tuple[float, float, float]]] = {}
    kinds = sorted({k for per in results.values() for r in per.values() for k in r["test"]["per_type"]})
    for kind in ["overall", *kinds]:
        for arm, per in results.items():
            vals = [
                r["test"]["auroc"] if kind == "overall" else r["test"]["per_type"][kind]["auroc"] for r in per.values()
            ]
            m, (lo, hi) = mean_ci95(vals)
            groups.setdefault(kind, {})[arm] = (m, lo, hi)
    out.append(
        grouped_bars(
            groups,
            ylabel="test AUROC (%)",
            title="AUROC per anomaly type (95% interval)",
            path=fig_dir / "auroc_per_type.png",
        )
    )

    models = {arm: Scorer.load(unit_dir).model for arm, unit_dir in model_dirs.items()}  # the unit's own settings
    if models:
        kinds_arr = np.array(test.kinds)
        pick = list(np.flatnonzero(kinds_arr == "normal")[: cfg.figure_images])
        for kind in kinds:
            pick += list(np.flatnonzero(kinds_arr == kind)[:1])
        idx = np.array(pick[: 2 * cfg.figure_images + len(kinds)])
        out.append(
            reconstruction_figure(
                models, test.images[idx], [test.kinds[i] for i in idx], fig_dir / "reconstructions.png"
            )
        )
    return out
