"""Data, assemble speed: training and inference images/s of the recipe's network (MONAI DenseNet features + the
multi-head or adapter output) against MONAI's ``DenseNet`` used directly at the same size, the cost of the
paper's two-view step against the one-view naive step, the torch augmentations' share of a step, and achieved
FLOP/s against this CPU's fp32 matmul peak.

    python benchmarks/data_assemble_speed.py                   # the miniature (64², batch 32) and DenseNet-121 at 256²
    python benchmarks/data_assemble_speed.py --sizes mini
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from monai.networks.nets import DenseNet, DenseNet121

from common import flops_of, interleaved, matmul_peak_gflops
from thrifty.methods.data_assemble.augment import STRONG, WEAK, augment
from thrifty.methods.data_assemble.losses import assemble_loss, masked_bce
from thrifty.methods.data_assemble.model import build_model

SIZES = {
    "mini": dict(backbone="densenet_mini", image_size=64, batch=32),
    "densenet121": dict(backbone="densenet121", image_size=256, batch=4),
}
LABELS = 7


def model_cfg(backbone: str, channels_last: bool = False) -> SimpleNamespace:
    return SimpleNamespace(backbone=backbone, init_features=16, growth_rate=8, block_config=[2, 2, 2, 2],
                           weights="", adapter_dim=32, channels_last=channels_last)  # fmt: skip


def monai_peer(backbone: str) -> torch.nn.Module:
    if backbone == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=LABELS)
    return DenseNet(spatial_dims=2, in_channels=1, out_channels=LABELS, init_features=16, growth_rate=8,
                    block_config=(2, 2, 2, 2))  # fmt: skip


def make_steps(size: dict) -> dict[str, tuple]:
    """name -> (train_step, infer, images per train step)."""
    torch.manual_seed(0)
    n, s = size["batch"], size["image_size"]
    x = torch.rand(n, 1, s, s)
    y = torch.randint(0, 2, (n, LABELS)).float()
    mask = torch.rand(n, LABELS) > 0.5
    gen = torch.Generator().manual_seed(0)
    out: dict[str, tuple] = {}

    def build(kind: str, channels_last: bool) -> torch.nn.Module:
        if kind == "monai":
            peer = monai_peer(size["backbone"])
            return peer.to(memory_format=torch.channels_last) if channels_last else peer
        return build_model(model_cfg(size["backbone"], channels_last), num_labels=LABELS, head=kind)

    for name, kind, views, channels_last in (
        ("MONAI DenseNet (peer), 1 view", "monai", 1, False),
        ("MONAI DenseNet (peer), 1 view, channels_last", "monai", 1, True),
        ("ours multi-head, 1 view (naive)", "multihead", 1, False),
        ("ours multi-head, 2 views (paper)", "multihead", 2, False),
        ("ours multi-head, 2 views (paper), channels_last (default)", "multihead", 2, True),
        ("ours adapter, 2 views", "adapter", 2, False),
        ("ours adapter, 2 views, channels_last (default)", "adapter", 2, True),
    ):
        model = build(kind, channels_last)
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def train_step(model=model, opt=opt, views=views) -> None:
            model.train()
            weak = augment(x, WEAK, generator=gen)
            if views == 2:  # two forward passes, weak first, as the recipe (and the release) does
                zw = model(weak)
                loss = assemble_loss(zw, model(augment(x, STRONG, generator=gen)), y, mask).total
            else:
                loss = masked_bce(model(weak), y, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()

        @torch.no_grad()
        def infer(model=model) -> None:
            model.eval()
            model(x)

        out[name] = (train_step, infer, n * views)

    def augment_only() -> None:
        augment(x, WEAK, generator=gen)
        augment(x, STRONG, generator=gen)

    out["augmentations only (weak + strong)"] = (augment_only, None, 2 * n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    peak = matmul_peak_gflops()["peak"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s")
    for size_name in args.sizes:
        size = SIZES[size_name]
        steps = make_steps(size)
        train_t = interleaved({k: v[0] for k, v in steps.items()}, warmup=2, rounds=args.rounds)
        infer_t = interleaved({k: v[1] for k, v in steps.items() if v[1] is not None}, warmup=2, rounds=args.rounds)
        peer = "MONAI DenseNet (peer), 1 view"
        print(f"\n{size_name}: {size['backbone']}, {size['image_size']}² images, batch {size['batch']}")
        print("| network | train ms/step | train img/s | × peer (img/s) | infer img/s | × peer (infer) | "
              "train GFLOP/s | % of matmul peak |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for name, (train_step, _infer, images) in steps.items():
            ips = images / train_t[name]
            peer_ips = steps[peer][2] / train_t[peer]
            gflops = flops_of(train_step) / train_t[name] / 1e9
            inf = f"{size['batch'] / infer_t[name]:.0f}" if name in infer_t else ""
            inf_ratio = f"{infer_t[peer] / infer_t[name]:.2f}" if name in infer_t else ""
            print(f"| {name} | {1e3 * train_t[name]:.1f} | {ips:.0f} | {ips / peer_ips:.2f} | {inf} | {inf_ratio} | "
                  f"{gflops:.1f} | {100 * gflops / peak:.1f}% |")  # fmt: skip
        share = train_t["augmentations only (weak + strong)"] / train_t["ours multi-head, 2 views (paper)"]
        print(f"augmentations: {100 * share:.0f}% of the paper's two-view step")


if __name__ == "__main__":
    main()
