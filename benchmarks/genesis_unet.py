"""Genesis 3D U-Net training throughput: forward + backward + Adam step, cubes/s, against MONAI's BasicUNet at a
matched width (when ``monai`` is importable), and achieved FLOP/s against this CPU's fp32 matmul peak; the recipe
trains in ``channels_last_3d`` memory format, timed as a third row.

Matching: the Models Genesis U-Net has four levels of widths (w, 2w, 4w, 8w) with three poolings; MONAI's
BasicUNet always has five levels (four poolings) and ``features`` = six widths. It is given features
(w, 2w, 4w, 8w, 8w, w): the same first four level widths, a fifth level no wider than the fourth, and an output
block of width w. Parameter counts are printed next to the times, since the shapes cannot match exactly.

    python benchmarks/genesis_unet.py                 # miniature (width 0.125, 32×32×16 cubes, batch 8)
    python benchmarks/genesis_unet.py --sizes paper   # full width, 64×64×32 cubes, batch 2
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import interleaved, matmul_peak_gflops, table
from thrifty.methods.genesis.model import UNet3D, count_parameters

SIZES = {
    "mini": {"width": 0.125, "cube": (16, 32, 32), "batch": 8},
    "paper": {"width": 1.0, "cube": (32, 64, 64), "batch": 2},
}


def make_step(model: torch.nn.Module, x: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    target = torch.rand_like(x)

    def step() -> None:
        out = model(x)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        model(x).mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    peak = matmul_peak_gflops()["peak"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s")
    try:
        from monai.networks.nets import BasicUNet
    except ImportError:
        BasicUNet = None
        print("monai is not installed: only the recipe's U-Net is timed (pip install monai for the comparison)")
    for name in args.sizes:
        s = SIZES[name]
        torch.manual_seed(0)
        x = torch.rand(s["batch"], 1, *s["cube"])
        ours = UNet3D(width=s["width"])
        w = ours.widths[0]
        models = {"thrifty UNet3D (Models Genesis)": ours}
        if BasicUNet is not None:
            feats = (w, 2 * w, 4 * w, 8 * w, 8 * w, w)
            models[f"MONAI BasicUNet {feats}"] = BasicUNet(
                spatial_dims=3, in_channels=1, out_channels=1, features=feats
            )
        cl = UNet3D(width=s["width"]).to(memory_format=torch.channels_last_3d)
        cl.load_state_dict(ours.state_dict())
        models["thrifty UNet3D, channels_last_3d (as trained)"] = cl
        inputs = {k: x.to(memory_format=torch.channels_last_3d) if "channels_last" in k else x for k in models}
        steps = {k: make_step(m, inputs[k]) for k, m in models.items()}
        times = interleaved(steps, warmup=2, rounds=args.rounds)
        ref = times["thrifty UNet3D (Models Genesis)"]
        rows = []
        for k, m in models.items():
            f = flops(m, inputs[k])
            rows.append(
                [
                    k,
                    f"{count_parameters(m) / 1e6:.2f}M",
                    s["batch"] / times[k],
                    times[k] / ref,
                    f / 1e9,
                    100 * f / times[k] / 1e9 / peak,
                ]
            )
        print(f"\n{name}: cubes {s['cube']} (d, h, w), batch {s['batch']}, width {s['width']}")
        headers = ["network", "params", "cubes/s", "time / ours", "GFLOP/step", "% of matmul peak"]
        print(table(rows, headers))


if __name__ == "__main__":
    main()
