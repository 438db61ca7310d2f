"""Calibration diagnostic of the "Data, assemble" recipe (Label-Assemble, arXiv 2109.12265): is the look-alike a
look-alike?

For every trained unit of a run, the target score's AUC of target positives against (a) negatives without the
look-alike finding and (b) negatives that carry it, on fresh domain-A images drawn from their own seeds (neither
the validation nor the test split). An AUC near 50 in (b) means the model ranks the look-alike with the target:
the confusion the paper's "negative examples" are meant to remove (recipe README, calibration steps 24-26).

    python scripts/data_assemble_lookalike.py RUN_DIR [--style peripheral] [--images 600]

RUN_DIR is a run's output (``.../data_assemble/<preset>``, holding ``units/``) or a folder above it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from thrifty.core.metrics import roc_auc
from thrifty.data import chest_synth
from thrifty.methods.data_assemble.score import Predictor

SEEDS = {"positives": 4242, "clean": 4243, "lookalike": 4244}  # far from every split seed of the recipe


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC (%) of scores ``pos`` (P,) against ``neg`` (N,)."""
    return 100.0 * roc_auc(np.concatenate([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--style", default="peripheral", choices=chest_synth.CONSOLIDATION_STYLES)
    parser.add_argument("--lookalike", default="consolidation", choices=chest_synth.FINDINGS)
    parser.add_argument("--images", type=int, default=600, help="images per group (default 600)")
    parser.add_argument("--target-strength", type=float, default=0.5, help="the recipe's haze strength (0.5)")
    args = parser.parse_args()
    units = sorted(p.parent for p in args.run_dir.rglob("units/*/seed*/card.json"))
    if not units:
        raise SystemExit(f"no trained units (units/<arm>/seed*/card.json) under {args.run_dir}")
    target = chest_synth.TARGET

    def draw(group: str, has_target: float, has_lookalike: float) -> torch.Tensor:
        batch = chest_synth.generate(
            args.images, seed=SEEDS[group], prevalence={target: has_target, args.lookalike: has_lookalike},
            strength={target: args.target_strength}, consolidation=args.style,
        )  # fmt: skip
        return torch.from_numpy(batch.images)

    groups = {"positives": draw("positives", 1.0, 0.0), "clean": draw("clean", 0.0, 0.0)}
    groups["lookalike"] = draw("lookalike", 0.0, 1.0)
    print(f"{'unit':32s} {'pos vs clean':>13s} {'pos vs look-alike':>18s}")
    for unit in units:
        predictor = Predictor.load(unit)
        col = predictor.labels.index(target)
        score = {k: predictor.predict(v)[:, col] for k, v in groups.items()}
        name = "/".join(unit.parts[-2:])
        clean, look = auc(score["positives"], score["clean"]), auc(score["positives"], score["lookalike"])
        print(f"{name:32s} {clean:13.1f} {look:18.1f}")


if __name__ == "__main__":
    main()
