"""Genesis figures: restoration examples per pre-training arm, target-task scores per arm (bars with 95% intervals,
or label-efficiency curves when several label fractions ran), pretext validation curves, the self-discovery
auto-encoder's loss and visual-word instances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import load_file

from thrifty.core.claims import mean_ci95
from thrifty.core.figures import curves_with_band, grouped_bars, save_figure
from thrifty.methods.genesis.config import GenesisConfig, parse_arm
from thrifty.methods.genesis.data import GenesisData
from thrifty.methods.genesis.finetune import PRIMARY
from thrifty.methods.genesis.pretext import PretextNet, make_batch, restores
from thrifty.methods.genesis.pretrain import unit_dir as pretrain_dir


def _mid(x: torch.Tensor) -> np.ndarray:
    """Middle axial slice of a (1, d, h, w) cube."""
    return x[0, x.shape[1] // 2].numpy()


def restoration_figure(
    cfg: GenesisConfig, data: GenesisData, words: dict[str, Any] | None, run_dir: Path, path: Path
) -> Path | None:
    """Rows per restoration arm: perturbed input, the network's restoration, the target (middle axial slices of
    held-out pre-training cubes, fixed perturbations); columns: examples."""
    rows: list[tuple[str, torch.Tensor]] = []
    n = cfg.figure_examples
    for arm in cfg.canonical_arms:
        parsed = parse_arm(arm)
        if parsed is None or not restores(parsed[0]):
            continue
        pretext, on = parsed
        weights = pretrain_dir(run_dir, arm, cfg.seeds[0] if cfg.pretrain.per_seed else cfg.pretrain.seed)
        if not (weights / "model.safetensors").exists():
            continue
        state = load_file(str(weights / "model.safetensors"))
        num_words = int(state["net.word_head.3.weight"].shape[0]) if "net.word_head.3.weight" in state else 0
        model = PretextNet(pretext=pretext, num_words=num_words, width=cfg.pretrain.width)
        model.load_state_dict(state)
        model.eval()
        pool = words["val"][0] if on and words is not None and "val" in words else data.cubes_val
        cubes = pool[:: max(1, len(pool) // n)][:n]
        batch = make_batch(
            pretext,
            cubes,
            visual_words=on,
            generator=torch.Generator().manual_seed(0),
            elastic=(cfg.pretrain.elastic_alpha, cfg.pretrain.elastic_sigma),
        )
        with torch.no_grad():
            out = model(batch["input"])["restoration"]
        rows += [(f"{arm}\ninput", batch["input"]), (f"{arm}\nrestored", out), (f"{arm}\ntarget", batch["target"])]
    if not rows:
        return None
    cols = min(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols + 0.8, 1.45 * len(rows)), dpi=100, squeeze=False)
    for r, (name, cubes) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(_mid(cubes[c]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle("Restoration on held-out cubes (middle axial slice)", fontsize=9)
    return save_figure(fig, path)


def task_figures(cfg: GenesisConfig, results: dict, figdir: Path) -> list[Path]:
    """Per task: bars of the primary test metric per arm at each fraction (95% t-intervals), and a
    label-efficiency curve when more than one fraction ran."""
    paths = []
    for task, per_fraction in results.items():
        metric = PRIMARY[task]
        groups: dict[str, dict[str, tuple[float, float, float]]] = {}
        for fraction in sorted(per_fraction):
            for arm, per in per_fraction[fraction].items():
                m, (lo, hi) = mean_ci95([r["test"][metric] for r in per.values()])
                groups.setdefault(f"{fraction:.0%} labels", {})[arm] = (m, lo, hi)
        paths.append(
            grouped_bars(
                groups,
                ylabel=f"test {metric.upper()} (%)",
                title=f"{task.upper()}: test {metric.upper()} per arm (95% t-interval over seeds)",
                path=figdir / f"{task}_bars.png",
            )
        )
        if len(per_fraction) > 1:
            series: dict[str, list] = {}
            fractions = sorted(per_fraction)
            for arm in cfg.canonical_arms:
                seeds = sorted(set.intersection(*(set(per_fraction[f].get(arm, {})) for f in fractions)))
                series[arm] = [
                    ([100 * f for f in fractions], [per_fraction[f][arm][s]["test"][metric] for f in fractions])
                    for s in seeds
                ]
            paths.append(
                curves_with_band(
                    series,
                    xlabel="training patients with labels (%)",
                    ylabel=f"test {metric.upper()} (%)",
                    title=f"{task.upper()} label efficiency (mean, min–max band over seeds)",
                    path=figdir / f"{task}_label_efficiency.png",
                    logx=True,
                )
            )
    return paths


def pretrain_curves(pretrained: dict[str, dict[int, dict]], path: Path) -> Path | None:
    """Held-out pretext loss over steps, per arm, as a share of the best constant predictor's loss on the same
    perturbed cubes (1 = the constant; below it, the pretext has learnt something), so pretexts whose losses have
    different scales (MSE, cross-entropy) share one axis. Results without a constant (older runs) plot raw."""
    ratio = all(r.get("constant_loss") for per in pretrained.values() for r in per.values())
    series = {
        arm: [
            ([c[0] for c in r["curve"]], [c[1] / (r["constant_loss"] if ratio else 1.0) for c in r["curve"]])
            for r in per.values()
        ]
        for arm, per in pretrained.items()
    }
    if not series:
        return None
    return curves_with_band(
        series,
        xlabel="pre-training step",
        ylabel="held-out pretext loss / constant predictor's" if ratio else "held-out pretext loss",
        title="Pretext validation loss",
        path=path,
        reference=(1.0, "constant predictor") if ratio else None,
    )


def discovery_figure(words: dict[str, Any], path: Path, *, per_word: int = 5, max_words: int = 6) -> Path:
    """Left: the auto-encoder's loss per step. Right: middle slices of the first instances of the first words."""
    k = min(max_words, int(words["num_classes"]))
    fig = plt.figure(figsize=(2.6 + 1.2 * per_word, 1.2 * k + 0.6), dpi=100)
    grid = fig.add_gridspec(k, per_word + 2)
    ax = fig.add_subplot(grid[:, :2])
    ax.plot(np.arange(1, len(words["ae_loss"]) + 1), words["ae_loss"], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("auto-encoder MSE", fontsize=9)
    ax.grid(alpha=0.3)
    cubes, labels = words["train"]
    for c in range(k):
        inst = torch.nonzero(labels == c).flatten()[:per_word]
        for j, i in enumerate(inst.tolist()):
            a = fig.add_subplot(grid[c, 2 + j])
            a.imshow(_mid(cubes[i]), cmap="gray", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if j == 0:
                a.set_ylabel(f"word {c}", fontsize=7)
    fig.suptitle(
        f"Self-discovery: organ purity {words['purity']:.2f} (random members {words['purity_random_members']:.2f})",
        fontsize=9,
    )
    return save_figure(fig, path)


def make_all(
    run_dir: Path,
    cfg: GenesisConfig,
    data: GenesisData,
    results: dict,
    pretrained: dict[str, dict[int, dict]],
    words: dict[str, Any] | None,
) -> list[Path]:
    figdir = run_dir / "figures"
    paths: list[Path | None] = [restoration_figure(cfg, data, words, run_dir, figdir / "restoration.png")]
    paths += task_figures(cfg, results, figdir)
    paths.append(pretrain_curves(pretrained, figdir / "pretrain_loss.png"))
    if words is not None and "train" in words:
        paths.append(discovery_figure(words, figdir / "visual_words.png"))
    return [p for p in paths if p is not None]
