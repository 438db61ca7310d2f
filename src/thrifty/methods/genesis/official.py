"""Load the released Models Genesis PyTorch weights (Zhou et al., arXiv 2004.07882) into the recipe's U-Net.

The release (``MrGiovanni/ModelsGenesis``, ``pytorch/unet3d.py``) publishes ``Genesis_Chest_CT.pt`` (Zenodo and
the Hugging Face repository ``MrGiovanni/ModelsGenesis``): a ``torch.save`` of ``{"state_dict": ...}`` from a
``DataParallel`` model, so keys start with ``module.``. Nothing is downloaded here: pass the path of a local copy.

The architectures match layer for layer (our :class:`~thrifty.methods.genesis.model.UNet3D` at ``width=1``), with
two differences that the conversion takes care of exactly:

* the release's convolutions before BatchNorm have a bias; ours have none. BatchNorm subtracts the mean, so in
  training mode the bias cancels, and in eval mode it folds into the running mean: ``running_mean - bias``;
* the release's ``ContBatchNorm3d`` normalised with batch statistics even in ``eval()``; ours uses the running
  statistics in ``eval()`` (standard BatchNorm), so predictions no longer depend on the rest of the batch.

The file is read with ``torch.load(weights_only=True)``: only tensors and plain containers are accepted, nothing is
unpickled beyond that.

    python -m thrifty.methods.genesis.official Genesis_Chest_CT.pt genesis_chest_ct.safetensors
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from thrifty.methods.genesis.model import UNet3D, WeightsError, save_weights

DOWN = {"down_tr64": 0, "down_tr128": 1, "down_tr256": 2, "down_tr512": 3}
UP = {"up_tr256": 0, "up_tr128": 1, "up_tr64": 2}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _block(name: str) -> str | None:
    """Our key prefix for the release's block ``name`` (e.g. ``down_tr128.ops.1``)."""
    m = re.fullmatch(r"(down_tr\d+|up_tr\d+)\.ops\.(\d)", name)
    if not m:
        return None
    block, i = m.group(1), m.group(2)
    if block in DOWN:
        return f"encoder.levels.{DOWN[block]}.{i}"
    return f"decoder.{UP[block]}.conv.{i}"


def convert_models_genesis(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's U-Net state dict (with or without ``module.``) → a state dict of our ``UNet3D(width=1)``.

    Raises:
        WeightsError: a key that is not part of the released architecture, or a missing one.
    """
    src = {k.removeprefix("module."): v for k, v in state.items()}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise WeightsError(f"missing {key!r} in the Models Genesis state dict")
        used.add(key)
        return src[key]

    out: dict[str, torch.Tensor] = {}
    for name in sorted({k.rsplit(".", 2)[0] for k in src if ".ops." in k}):
        ours = _block(name)
        if ours is None:
            raise WeightsError(f"unexpected block {name!r} in a Models Genesis state dict")
        out[f"{ours}.0.weight"] = take(f"{name}.conv1.weight")
        bias = take(f"{name}.conv1.bias") if f"{name}.conv1.bias" in src else None
        for key in BN_KEYS:
            v = take(f"{name}.bn1.{key}")
            if key == "running_mean" and bias is not None:
                v = v - bias  # BN(conv + b) with running mean m equals BN(conv) with running mean m - b
            out[f"{ours}.1.{key}"] = v
    for key in ("weight", "bias"):
        for name, j in UP.items():
            out[f"decoder.{j}.up.{key}"] = take(f"{name}.up_conv.{key}")
        out[f"head.{key}"] = take(f"out_tr.final_conv.{key}")
    extra = sorted(set(src) - used)
    if extra:
        raise WeightsError(f"keys the Models Genesis U-Net does not have: {extra[:5]}{' …' if len(extra) > 5 else ''}")
    return out


def load_models_genesis(path: str | Path) -> UNet3D:
    """A ``UNet3D(width=1)`` (sigmoid output) holding the weights of a local copy of ``Genesis_Chest_CT.pt``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file does not exist (download Genesis_Chest_CT.pt yourself; nothing is fetched)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many types; weights_only refuses arbitrary objects
        raise WeightsError(f"{path}: not a tensors-only PyTorch checkpoint ({type(err).__name__}: {err})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(ckpt).__name__}")
    net = UNet3D(width=1.0)
    net.load_state_dict(convert_models_genesis(state))
    return net


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert the released Models Genesis .pt to safetensors + JSON card.")
    ap.add_argument("checkpoint", help="local copy of Genesis_Chest_CT.pt")
    ap.add_argument("out", help="output .safetensors path (a .json card is written beside it)")
    args = ap.parse_args(argv)
    net = load_models_genesis(args.checkpoint)
    card = {
        "source": "Models Genesis release (Genesis_Chest_CT.pt), converted",
        "cube_dhw": [32, 64, 64],
        "hu_window": [-1000, 1000],
        "intensity": "clip HU to [-1000, 1000], then (HU + 1000) / 2000",
        "pretraining_data": "LUNA16 (release: subsets 0-4 for training, 5-6 for validation)",
    }
    save_weights(net, args.out, card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
