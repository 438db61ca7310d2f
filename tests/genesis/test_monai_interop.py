"""The README's MONAI recipe works: exported weights drive MONAI's sliding-window inference with MONAI's HU
scaling, and give the same output as the recipe's own preprocessing on a cube-sized volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thrifty.data.volumes import clip_and_normalize
from thrifty.methods.genesis.model import UNet3D, load_weights, save_weights

monai = pytest.importorskip("monai")


def test_exported_unet_runs_in_monai_sliding_window(tmp_path) -> None:
    from monai.inferers import sliding_window_inference
    from monai.transforms import ScaleIntensityRange

    torch.manual_seed(0)
    src = UNet3D(width=0.125, final_activation="none")
    path = save_weights(src, tmp_path / "unet.safetensors", {"cube_dhw": [16, 32, 32], "hu_window": [-1000, 1000]})
    state, card = load_weights(path)
    net = UNet3D(widths=tuple(card["widths"]), final_activation="none")
    net.load_state_dict(state)
    net.eval()
    ct = np.random.default_rng(0).uniform(-1200, 1500, size=(1, 32, 48, 48)).astype(np.float32)  # (C, D, H, W) HU
    lo, hi = card["hu_window"]
    prep = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    x = torch.as_tensor(np.asarray(prep(ct)))[None]
    assert torch.allclose(x, torch.from_numpy(clip_and_normalize(ct))[None], atol=1e-6)  # same intensity scaling
    with torch.no_grad():
        out = sliding_window_inference(x, roi_size=card["cube_dhw"], sw_batch_size=2, predictor=net)
        assert out.shape == (1, 1, 32, 48, 48)
        window = x[:, :, :16, :32, :32]  # a window-sized volume: one window, no blending
        one = sliding_window_inference(window, roi_size=card["cube_dhw"], sw_batch_size=1, predictor=net)
        assert torch.allclose(torch.as_tensor(one), net(window), atol=1e-5)
