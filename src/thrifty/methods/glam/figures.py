"""GLaM figures: validation loss vs tokens and vs training FLOPs; expert-load heat maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from thrifty.core.figures import curves_with_band, heatmaps
from thrifty.core.run import MetricsLog


def make_all(run_dir: Path, results: dict[str, dict[int, dict[str, Any]]], metrics: MetricsLog) -> list[Path]:
    fig_dir = run_dir / "figures"
    out = []
    by_tokens = {
        arm: [([c[1] for c in r["curve"]], [c[3] for c in r["curve"]]) for r in rs.values()]
        for arm, rs in results.items()
    }
    by_flops = {
        arm: [([c[2] for c in r["curve"]], [c[3] for c in r["curve"]]) for r in rs.values()]
        for arm, rs in results.items()
    }
    out.append(
        curves_with_band(
            by_tokens,
            xlabel="training tokens",
            ylabel="validation loss (nats)",
            title="GLaM vs dense baselines: loss vs tokens",
            path=fig_dir / "loss_vs_tokens.png",
        )
    )
    out.append(
        curves_with_band(
            by_flops,
            xlabel="training FLOPs (activated, analytic)",
            ylabel="validation loss (nats)",
            title="Loss vs training compute",
            path=fig_dir / "loss_vs_flops.png",
        )
    )
    heat = expert_load_panels(results, metrics)
    if heat:
        panels, steps = heat
        out.append(
            heatmaps(
                panels,
                xlabel="training step",
                ylabel="expert",
                xticks=steps,
                title="Share of kept slots per expert (moe arm, first seed); uniform = 1/E",
                path=fig_dir / "expert_load.png",
                cbar_label="load share",
            )
        )
    return out


def expert_load_panels(
    results: dict[str, dict[int, dict[str, Any]]], metrics: MetricsLog
) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """``[E, logged steps]`` load shares per MoE layer for the first seed of the ``moe`` arm."""
    if "moe" not in results:
        return None
    seed = min(results["moe"])
    recs = [r for r in metrics.read(f"moe/seed{seed}") if r.get("moe")]
    if not recs:
        return None
    panels = {}
    for li in range(len(recs[0]["moe"])):
        loads = np.array([r["moe"][li]["load"] for r in recs], dtype=float)  # [steps, E]
        shares = loads / np.clip(loads.sum(1, keepdims=True), 1.0, None)
        panels[f"MoE layer {li}"] = shares.T
    return panels, [r["step"] for r in recs]
