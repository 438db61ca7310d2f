"""Converting the released Models Genesis PyTorch weights: a small re-statement of the release's layer layout
(conv with bias → BN → ReLU blocks named as in ``pytorch/unet3d.py``) at a reduced width is saved the way the
release saves, converted, and must compute the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thrifty.methods.genesis.model import UNet3D, WeightsError, load_weights
from thrifty.methods.genesis.official import convert_models_genesis, load_models_genesis, main


class _Block(nn.Module):  # the release's LUConv: conv1 (with bias) → bn1 → relu
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)))


class _Ops(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.ops = nn.Sequential(_Block(cin, mid), _Block(mid, cout))


class _Up(_Ops):
    def __init__(self, cin: int, skip: int) -> None:
        super().__init__(cin + skip, skip, skip)
        self.up_conv = nn.ConvTranspose3d(cin, cin, 2, stride=2)


class _Out(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(cin, 1, 1)


class ReleaseLayout(nn.Module):
    """The release's U-Net at base width ``b`` (release: 32), with its module names."""

    def __init__(self, b: int = 4) -> None:
        super().__init__()
        w = [2 * b, 4 * b, 8 * b, 16 * b]
        self.down_tr64, self.down_tr128 = _Ops(1, b, w[0]), _Ops(w[0], w[0], w[1])
        self.down_tr256, self.down_tr512 = _Ops(w[1], w[1], w[2]), _Ops(w[2], w[2], w[3])
        self.up_tr256, self.up_tr128, self.up_tr64 = _Up(w[3], w[2]), _Up(w[2], w[1]), _Up(w[1], w[0])
        self.out_tr = _Out(w[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.down_tr64.ops(x)
        s2 = self.down_tr128.ops(nn.functional.max_pool3d(s1, 2))
        s3 = self.down_tr256.ops(nn.functional.max_pool3d(s2, 2))
        z = self.down_tr512.ops(nn.functional.max_pool3d(s3, 2))
        for up, skip in ((self.up_tr256, s3), (self.up_tr128, s2), (self.up_tr64, s1)):
            z = up.ops(torch.cat([up.up_conv(z), skip], 1))
        return torch.sigmoid(self.out_tr.final_conv(z))


def _trained_release(b: int = 4) -> ReleaseLayout:
    torch.manual_seed(0)
    ref = ReleaseLayout(b)
    with torch.no_grad():  # non-trivial biases and running statistics
        for m in ref.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                m.bias.normal_(0, 0.3)
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return ref


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_converted_weights_compute_the_release_function(mode: str) -> None:
    ref = _trained_release()
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # saved from DataParallel
    ours = UNet3D(widths=(8, 16, 32, 64))
    ours.load_state_dict(convert_models_genesis(state))
    ref.train(mode == "train")
    ours.train(mode == "train")
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_release_checkpoint_file_round_trip(tmp_path) -> None:
    ref = _trained_release(b=32)  # the release's full width
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    net = load_models_genesis(path)
    ref.eval()
    net.eval()
    x = torch.rand(1, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5)
    out = tmp_path / "mg.safetensors"
    assert main([str(path), str(out)]) == 0
    state, card = load_weights(out)
    assert card["architecture"] == "UNet3D" and card["cube_dhw"] == [32, 64, 64]
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_bad_checkpoints_are_clear_errors(tmp_path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_models_genesis(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="tensors-only"):
        load_models_genesis(bad)
    state = {f"module.{k}": v for k, v in _trained_release().state_dict().items()}
    with pytest.raises(WeightsError, match="does not have"):
        convert_models_genesis({**state, "module.extra.weight": torch.zeros(1)})
    del state["module.out_tr.final_conv.bias"]
    with pytest.raises(WeightsError, match="missing"):
        convert_models_genesis(state)
