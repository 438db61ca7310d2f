"""Inference with a trained MT-TransUNet model (arXiv 2112.01767): lesion masks and class probabilities for new
dermoscopy images.

A trained unit directory holds ``model.safetensors`` and ``card.json`` (the architecture, the input size, the class
order). Use it from Python::

    from thrifty.methods.mt_transunet.score import Predictor
    predictor = Predictor.load("runs/mt_transunet/quick/units/seg+cls+dual/seed0")
    lesion, classes = predictor.predict(images)   # (N, 3, S, S) in [0, 1] -> (N, S, S), (N, 3) probabilities

or over files and folders (``thrifty score mt_transunet --checkpoint UNIT_DIR lesion.jpg folder/ --out out/``),
which writes ``predictions.csv`` (one row per image: the class probabilities, the predicted class and the lesion's
share of the image) and ``masks/<name>.png``: the predicted lesion mask (0/255) at the image's own size.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from thrifty.core.checkpoint import load_unit_model
from thrifty.data.images import ImageDataError, expand_image_paths
from thrifty.data.skin_lesions import load_rgb
from thrifty.methods.mt_transunet.inference import infer
from thrifty.methods.mt_transunet.model import MTTransUNet, build_model


class ScoringError(ValueError):
    """A unit directory that cannot be used for inference (missing or inconsistent files)."""


class Predictor:
    """A trained model and its card; :meth:`predict` maps images to lesion probabilities and class probabilities."""

    def __init__(self, model: MTTransUNet, card: dict[str, Any]) -> None:
        self.model = model.eval()
        self.card = card
        self.classes: list[str] = list(card["classes"])
        self.image_size = int(card["image_size"])

    @classmethod
    def load(cls, unit_dir: str | Path) -> Predictor:
        def build(card: dict[str, Any]) -> torch.nn.Module:
            return build_model(SimpleNamespace(**card["model"]), num_classes=len(card["classes"]),
                               image_size=int(card["image_size"]))  # fmt: skip

        model, card = load_unit_model(unit_dir, build, recipe="mt_transunet", error=ScoringError)
        return cls(model, card)

    def predict(self, images: torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Lesion probabilities (N, S, S) and class probabilities (N, C) for ``images`` (N, 3, S, S) in [0, 1]
        with S = the card's ``image_size``, with the test-time augmentation the card records (``tta``)."""
        s = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images (N, 3, {s}, {s}) in [0, 1], got {tuple(images.shape)}")
        if not len(images):
            return np.zeros((0, s, s), np.float32), np.zeros((0, len(self.classes)), np.float32)
        tta = self.card.get("tta", {})
        return infer(
            self.model, images, batch_size=batch_size, sizes=tta.get("sizes", []), views=tta.get("views", False)
        )


def score_files(unit_dir: str | Path, paths: list[str | Path], out_dir: str | Path, *, skip_bad: bool = False) -> Path:
    """Write ``predictions.csv`` and ``masks/*.png`` for image files and folders; returns the CSV's path. An
    unreadable image is one clear error, or (``skip_bad``) a row saying why it was skipped."""
    predictor = Predictor.load(unit_dir)
    files = expand_image_paths(paths)
    if not files:
        raise ScoringError(f"no image files in {[str(p) for p in paths]}")
    out = Path(out_dir)
    mask_dir = out / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    used: set[str] = set()
    for path in files:
        try:
            image, (h, w) = load_rgb(path, size=predictor.image_size)
        except ImageDataError as err:
            if not skip_bad:
                raise
            rows.append([str(path), *[""] * (len(predictor.classes) + 3), f"skipped: {err}"])
            continue
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        lesion, probs = predictor.predict(x)
        full = F.interpolate(torch.from_numpy(lesion)[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        mask = (full.numpy() > 0.5).astype(np.uint8) * 255
        name = _unique(path.stem, used)
        Image.fromarray(mask).save(mask_dir / f"{name}.png")
        p = probs[0]
        rows.append([str(path), *[f"{v:.6f}" for v in p], predictor.classes[int(p.argmax())],
                     f"{float((mask > 0).mean()):.4f}", f"masks/{name}.png", ""])  # fmt: skip
    csv_path = out / "predictions.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["file", *[f"p_{c}" for c in predictor.classes], "predicted", "lesion_fraction", "mask", "note"]
        )
        writer.writerows(rows)
    return csv_path


def _unique(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3`` … when two inputs share a file name."""
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name
