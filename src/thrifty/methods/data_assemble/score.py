"""Inference with a trained "Data, assemble" model (Label-Assemble, arXiv 2109.12265): per-label probabilities for
new chest radiographs.

A trained unit directory holds ``model.safetensors`` and ``card.json`` (the label set in output order, the
backbone and head, the input size). Use it from Python::

    from thrifty.methods.data_assemble.score import Predictor
    predictor = Predictor.load("runs/data_assemble/quick/units/assemble/seed0")
    probs = predictor.predict(images)          # (N, 1, S, S) floats in [0, 1] -> (N, L) probabilities

or over files and folders (``thrifty score data_assemble --checkpoint UNIT_DIR xray.png folder/ --out out/``),
which writes ``probabilities.csv``: one row per image, one column per label.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from thrifty.core.checkpoint import load_unit_model
from thrifty.data import images as imgio
from thrifty.methods.data_assemble.data import window_intensity
from thrifty.methods.data_assemble.model import AssembleNet, build_model


class ScoringError(ValueError):
    """A unit directory that cannot be used for inference (missing or inconsistent files)."""


class Predictor:
    """A trained model and its card; :meth:`predict` maps images to per-label probabilities."""

    def __init__(self, model: AssembleNet, card: dict[str, Any]) -> None:
        self.model = model.eval()
        self.card = card
        self.labels: list[str] = list(card["labels"])
        self.image_size = int(card["image_size"])

    @classmethod
    def load(cls, unit_dir: str | Path) -> Predictor:
        def build(card: dict[str, Any]) -> torch.nn.Module:
            return build_model(SimpleNamespace(**card["model"]), num_labels=len(card["labels"]), head=card["head"],
                               in_channels=int(card.get("in_channels", 1)))  # fmt: skip

        model, card = load_unit_model(unit_dir, build, recipe="data_assemble", error=ScoringError)
        return cls(model, card)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Probabilities (N, L) for ``images`` (N, 1, S, S) in [0, 1] with S = the card's ``image_size``; the
        card's ``intensity_window`` (the training pipeline's) is applied here."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected images (N, 1, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        images = window_intensity(images.float(), self.card.get("intensity_window", []))
        out = [torch.sigmoid(self.model(images[i : i + batch_size].float())) for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.labels)), dtype=np.float32)


def score_files(unit_dir: str | Path, paths: list[str | Path], out_dir: str | Path, *, skip_bad: bool = False) -> Path:
    """Write ``probabilities.csv`` (file, one probability per label) for image files and folders; returns its
    path. An unreadable image is one clear error, or (``skip_bad``) a row saying why it was skipped."""
    predictor = Predictor.load(unit_dir)
    records = [imgio.ImageRecord(p, 0, "unknown") for p in imgio.expand_image_paths(paths)]
    if not records:
        raise ScoringError(f"no image files in {[str(p) for p in paths]}")
    arr, kept, bad = imgio.load_images(records, size=predictor.image_size, grayscale=True, skip_bad=skip_bad)
    probs = predictor.predict(torch.from_numpy(arr)) if len(kept) else np.zeros((0, len(predictor.labels)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "probabilities.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", *predictor.labels, "note"])
        for rec, row in zip(kept, probs):
            w.writerow([str(rec.path), *[f"{v:.6f}" for v in row], ""])
        for p, reason in bad:
            w.writerow([str(p), *[""] * len(predictor.labels), f"skipped: {reason}"])
    return path
