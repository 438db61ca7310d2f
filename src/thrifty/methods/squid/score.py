"""Anomaly scoring for SQUID and its baselines: the functions training, selection and testing use
(:func:`raw_scores`, :func:`anomaly_score`), and scoring new images with a trained unit (a CSV of anomaly
scores and heat-maps).

A unit directory (``<run>/units/<arm>/seed<k>/``) holds ``model.safetensors`` (+ ``discriminator.safetensors``
for SQUID) and ``scoring.json`` (network settings, image size, μ/σ and the validation threshold). Loading uses
safetensors only; nothing is unpickled.

    scorer = Scorer.load("runs/squid/quick/units/squid/seed0")
    result = scorer.score(images)            # images (N, 1, H, W) float in [0, 1]
    result["score"], result["anomalous"], result["heatmap"]

The heat-map is |x − x̂| (the in-painted reconstruction's error), smoothed over 3×3; for SQUID the image
score is the one the unit was selected by (``scoring.json``'s ``score_kind``): the standardised discriminator
score by default, the reconstruction MSE for the AE/MemAE.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model

from thrifty.data import images as imgio
from thrifty.methods.squid.config import SCORES
from thrifty.methods.squid.losses import reconstruction_error, standardised_score
from thrifty.methods.squid.model import Discriminator, NetSettings, PatchUNet, patchify


class ScoringError(RuntimeError):
    pass


@torch.no_grad()
def raw_scores(
    model: PatchUNet,
    disc: Discriminator | None,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    *,
    grid: int,
    keep_recon: bool = False,
) -> dict[str, Any]:
    """Eval-mode pass over (N, 1, H, W) images: discriminator logits on the reconstruction (SQUID), the
    per-image reconstruction error and the per-cell error (N, grid²) on a ``grid``×``grid`` layout (SQUID's
    patches, whatever the arm's own patching), for localisation and the cell z-max score; with ``keep_recon``
    also the reconstructions (N, 1, H, W) under ``"recon"``."""
    model.eval()
    if disc is not None:
        disc.eval()
    logits, errors, cells, recons = [], [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        recon = model(x)["recon"]
        if keep_recon:
            recons.append(recon.cpu())
        errors.append(reconstruction_error(recon, x).cpu())
        cells.append(patchify((recon - x).pow(2), grid).flatten(1).mean(1).view(len(x), grid * grid).cpu())
        if disc is not None:
            logits.append(disc(recon).cpu())
    out = {"recon_error": torch.cat(errors).numpy(), "cell_error": torch.cat(cells).numpy()}
    if disc is not None:
        out["d_logit"] = torch.cat(logits).numpy()
    if keep_recon:
        out["recon"] = torch.cat(recons)
    return out


def available_scores(raw: dict[str, Any]) -> list[str]:
    """The image scores ``raw`` supports: the discriminator score only where there is a discriminator."""
    return [k for k in SCORES if k != "discriminator" or "d_logit" in raw]


def calibrate(raw: dict[str, Any], labels: np.ndarray) -> dict[str, Any]:
    """Statistics of held-out *normal* images (``labels == 0``) that the scores standardise with: μ/σ of the
    discriminator logit (SQUID) and μ/σ of each cell's reconstruction error."""
    normal = np.asarray(labels) == 0
    if normal.sum() < 2:
        raise ScoringError("calibration needs at least two normal images")
    cells = raw["cell_error"][normal]
    calib: dict[str, Any] = {
        "cell_mu": cells.mean(0).tolist(),
        # floored at 1% of the mean so a cell that is (nearly) constant on normals cannot blow z up
        "cell_sigma": np.maximum(cells.std(0, ddof=1), 0.01 * cells.mean(0) + 1e-12).tolist(),
    }
    if "d_logit" in raw:
        logits = raw["d_logit"][normal]
        calib.update(mu=float(logits.mean()), sigma=float(logits.std(ddof=1) + 1e-8))
    return calib


def anomaly_score(raw: dict[str, Any], calib: dict[str, Any] | None, kind: str) -> np.ndarray:
    """(N,) image scores, higher = more anomalous.

    ``discriminator``: 1 − σ((D(x̂) − μ)/σ) (−D(x̂) before calibration, same ranking); ``recon``: the image's
    reconstruction MSE; ``cell_zmax``: the largest over cells of (cell error − μ_cell)/σ_cell, μ/σ from
    :func:`calibrate` (a deviation from the paper, which scores with the discriminator).
    """
    if kind == "recon":
        return raw["recon_error"]
    if kind == "discriminator":
        if "d_logit" not in raw:
            raise ScoringError("score 'discriminator' needs a discriminator (SQUID arms only)")
        if calib is None:
            return -raw["d_logit"]
        return standardised_score(torch.from_numpy(raw["d_logit"]), calib["mu"], calib["sigma"]).numpy()
    if kind == "cell_zmax":
        if calib is None:
            raise ScoringError("score 'cell_zmax' needs calibration statistics from normal images")
        z = (raw["cell_error"] - np.asarray(calib["cell_mu"])) / np.asarray(calib["cell_sigma"])
        return z.max(1)
    raise ScoringError(f"unknown score {kind!r}; choose from {list(SCORES)}")


@dataclasses.dataclass
class Scorer:
    model: PatchUNet
    disc: Discriminator | None
    meta: dict[str, Any]

    @classmethod
    def load(cls, unit_dir: str | Path) -> Scorer:
        unit_dir = Path(unit_dir)
        meta_path = unit_dir / "scoring.json"
        if not meta_path.is_file():
            raise ScoringError(
                f"{unit_dir} is not a trained unit (no scoring.json); pass e.g. runs/squid/quick/units/squid/seed0"
            )
        meta = json.loads(meta_path.read_text())
        settings = NetSettings(**meta["settings"])
        model = PatchUNet(settings)
        load_model(model, str(unit_dir / "model.safetensors"))
        disc = None
        if (unit_dir / "discriminator.safetensors").is_file():
            disc = Discriminator(image_size=meta["image_size"])
            load_model(disc, str(unit_dir / "discriminator.safetensors"))
            disc.eval()
        model.eval()
        return cls(model, disc, meta)

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @torch.no_grad()
    def score(self, images: torch.Tensor, batch_size: int = 64) -> dict[str, np.ndarray]:
        """images (N, 1, H, W) in [0, 1] with H = W = image_size → score (N,), anomalous (N,) bool,
        heatmap (N, H, W), recon (N, H, W)."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, self.image_size, self.image_size):
            raise ScoringError(
                f"expected images of shape (N, 1, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        raw = raw_scores(
            self.model,
            self.disc,
            images,
            batch_size,
            images.device,
            grid=int(self.meta.get("grid", self.model.s.num_patches)),  # units written before scores existed
            keep_recon=True,
        )
        recon = raw["recon"]
        heat = F.avg_pool2d((images - recon).abs(), 3, stride=1, padding=1)[:, 0]
        kind = self.meta.get("score_kind", "discriminator" if self.disc is not None else "recon")
        score = anomaly_score(raw, self.meta["calibration"], kind)
        return {
            "score": score,
            "anomalous": score >= self.meta["threshold"],
            "heatmap": heat.numpy(),
            "recon": recon[:, 0].numpy(),
        }


def _save_heatmap(path: Path, image: np.ndarray, recon: np.ndarray, heat: np.ndarray, title: str) -> None:
    import matplotlib.pyplot as plt

    from thrifty.core.figures import save_figure  # selects the headless backend

    fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.4), dpi=110)
    for ax, img, name, cmap in zip(
        axes, (image, recon, heat), ("input", "reconstruction", "|difference|"), ("gray", "gray", "magma")
    ):
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1 if cmap == "gray" else max(float(heat.max()), 1e-6))
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)


def score_files(unit_dir: str | Path, paths: list[str | Path], out_dir: str | Path, *, skip_bad: bool = False) -> Path:
    """Score image files; writes ``scores.csv`` (file, score, anomalous, threshold) and a heat-map PNG per image."""
    scorer = Scorer.load(unit_dir)
    records = [imgio.ImageRecord(Path(p), 0, "unknown") for p in paths]
    arr, kept, bad = imgio.load_images(records, size=scorer.image_size, grayscale=True, skip_bad=skip_bad)
    out = Path(out_dir)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    res = (
        scorer.score(torch.from_numpy(arr)) if len(kept) else {"score": [], "anomalous": [], "heatmap": [], "recon": []}
    )
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "score", "anomalous", "threshold", "heatmap"])
        for i, rec in enumerate(kept):
            heat_path = out / "heatmaps" / f"{i:05d}_{rec.path.stem}.png"
            _save_heatmap(
                heat_path,
                arr[i, 0],
                res["recon"][i],
                res["heatmap"][i],
                f"{rec.path.name}: score {res['score'][i]:.3f}",
            )
            w.writerow(
                [
                    str(rec.path),
                    f"{res['score'][i]:.6f}",
                    int(res["anomalous"][i]),
                    scorer.meta["threshold"],
                    heat_path.name,
                ]
            )
        for path, reason in bad:
            w.writerow([str(path), "", "", scorer.meta["threshold"], f"skipped: {reason}"])
    return out / "scores.csv"
