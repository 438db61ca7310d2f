"""BigSSL figures: test WER against labelled hours per arm (the data-efficiency plot), pre-training curves with
codebook perplexity, noisy-student statistics per generation, and fine-tuning dev curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from thrifty.core.claims import mean_ci95
from thrifty.core.figures import curves_with_band, save_figure
from thrifty.core.run import MetricsLog


def wer_vs_labels(
    results: dict[str, dict[float, dict[int, dict]]], tests: list[str], hours: dict[float, float], path: Path
) -> Path:
    """Rows WER and CER, one column per test set: mean (greedy) with 95% intervals over seeds against labelled
    hours, one line per arm (the data-efficiency plot)."""
    fig, axes = plt.subplots(2, len(tests), figsize=(5.2 * len(tests), 7.2), dpi=110, squeeze=False)
    fractions = sorted(hours)
    for row, metric in enumerate(("wer", "cer")):
        for ax, test in zip(axes[row], tests):
            for arm, per_fraction in results.items():
                xs, means, lows, highs = [], [], [], []
                for fraction in sorted(per_fraction):
                    values = [100 * r["test"][test][f"greedy_{metric}"] for r in per_fraction[fraction].values()]
                    if not values:
                        continue
                    m, (lo, hi) = mean_ci95(values)
                    xs.append(hours[fraction])
                    means.append(m)
                    lows.append(m - lo if np.isfinite(lo) else 0.0)
                    highs.append(hi - m if np.isfinite(hi) else 0.0)
                if xs:
                    ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, label=arm)
            ax.set_xscale("log")
            ax.set_xticks([hours[f] for f in fractions], [f"{f:.0%}\n{hours[f]:.2f} h" for f in fractions])
            ax.minorticks_off()
            ax.set_xlabel("labelled data (log scale)")
            ax.set_ylabel(f"test {metric.upper()} % (greedy)")
            ax.set_title(test)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def pretrain_curves(metrics: MetricsLog, unit: str, path: Path, *, max_perplexity: float) -> Path | None:
    records = metrics.read(unit)  # read the metrics file once
    rows = [r for r in records if "loss" in r and "perplexity" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    axes[0].plot(steps, [r["loss"] for r in rows], label="total")
    axes[0].plot(steps, [r["contrastive"] for r in rows], label="contrastive / masked frame")
    if any(r.get("mlm") for r in rows):
        axes[0].plot(steps, [r["mlm"] for r in rows], label="MLM")
    val = [r for r in records if "val_loss" in r]
    if val:
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="held-out total")
    axes[0].set_title("losses")
    axes[1].plot(steps, [r["accuracy"] for r in rows], label="contrastive accuracy")
    if any(r.get("mlm_accuracy") for r in rows):
        axes[1].plot(steps, [r["mlm_accuracy"] for r in rows], label="MLM accuracy")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("accuracies")
    axes[2].plot(steps, [r["perplexity"] for r in rows], label="perplexity (soft)")
    axes[2].plot(steps, [r["hard_perplexity"] for r in rows], label="perplexity (codes used)")
    axes[2].axhline(max_perplexity, color="grey", ls="--", lw=1, label="G·V")
    axes[2].axhline(0.1 * max_perplexity, color="red", ls=":", lw=1, label="collapse alarm")
    axes[2].set_title("codebook")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def nst_figure(nst: dict[float, dict[int, list[dict]]], test: str, path: Path) -> Path | None:
    """Per label fraction: kept share of pseudo-labels, their WER against the hidden truth, and the student's test
    WER, per generation (mean over seeds); generation 0 is the teacher (pre-trained + fine-tuned)."""
    if not nst:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    for fraction, per_seed in sorted(nst.items()):
        gens = sorted({g["generation"] for runs in per_seed.values() for g in runs})
        label = f"{fraction:.0%} labels"

        def mean(key: str, g: int, sub: str | None = None) -> float:
            vals = []
            for runs in per_seed.values():  # noqa: B023
                for r in runs:
                    if r["generation"] == g:
                        v = r["test"][test]["greedy_wer"] if sub else r.get(key)
                        if v is not None:
                            vals.append(100 * v)  # shares and WERs as %
            return float(np.mean(vals)) if vals else float("nan")

        axes[0].plot(gens, [mean("kept_fraction", g) for g in gens], "o-", label=label)
        axes[1].plot(gens, [mean("pseudo_wer_all", g) for g in gens], "o-", label=f"{label}, all")
        axes[1].plot(gens, [mean("pseudo_wer_kept", g) for g in gens], "s--", label=f"{label}, kept")
        axes[2].plot(gens, [mean("", g, "test") for g in gens], "o-", label=label)
    axes[0].set_title("pseudo-labels kept %")
    axes[1].set_title("pseudo-label WER % (hidden truth)")
    axes[2].set_title(f"student test WER % ({test}, greedy)")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("generation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def finetune_curves(curves: dict[str, list[tuple[list[float], list[float]]]], path: Path) -> Path:
    return curves_with_band(curves, xlabel="step", ylabel="dev CER (greedy)", title="fine-tuning: dev CER", path=path)


def make_all(run_dir: Path, metrics: MetricsLog, summary: dict[str, Any]) -> list[Path]:
    """Every figure the evaluate stage can draw from ``summary`` (see ``train.collect``)."""
    figs = run_dir / "figures"
    out: list[Path | None] = []
    if summary["finetune"]:
        if summary["tests"]:  # a calibration pilot (finetune.test=false) has dev curves only
            out.append(
                wer_vs_labels(summary["finetune"], summary["tests"], summary["hours"], figs / "wer_vs_labels.png")
            )
        curves: dict[str, list[tuple[list[float], list[float]]]] = {}
        for arm, per_fraction in summary["finetune"].items():
            for fraction, per_seed in sorted(per_fraction.items()):
                for r in per_seed.values():
                    curves.setdefault(f"{arm} @ {fraction:.0%}", []).append(
                        ([c["step"] for c in r["curve"]], [c["dev_cer"] for c in r["curve"]])
                    )
        out.append(finetune_curves(curves, figs / "finetune_dev_cer.png"))
    if summary.get("pretrain_unit"):
        out.append(
            pretrain_curves(
                metrics, summary["pretrain_unit"], figs / "pretrain.png", max_perplexity=summary["max_perplexity"]
            )
        )
    if summary.get("nst") and summary["tests"]:
        out.append(nst_figure(summary["nst"], summary["tests"][0], figs / "nst.png"))
    return [p for p in out if p is not None]
