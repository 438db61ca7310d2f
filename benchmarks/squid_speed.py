"""SQUID speed: training and inference images/s against the autoencoder baseline (same backbone), MemAE, and
achieved FLOP/s against this CPU's fp32 matmul peak; batched-einsum memory reads against the release's
per-position Python loop.

    python benchmarks/squid_speed.py            # quick size (48², r=8) and the paper's digit size (96², r=32)
    python benchmarks/squid_speed.py --sizes quick
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import flops_of, interleaved, matmul_peak_gflops
from thrifty.methods.squid.config import LossConfig
from thrifty.methods.squid.losses import discriminator_loss, generator_loss
from thrifty.methods.squid.memory import MemoryQueue, read_weights, update_queues
from thrifty.methods.squid.model import Discriminator, NetSettings, PatchUNet

SIZES = {
    "quick": dict(image_size=48, base_filters=8, num_slots=100, decoder_slots=100),
    "paper": dict(image_size=96, base_filters=32, num_slots=200, decoder_slots=200),
}
ARMS = {
    "squid": {},
    "ae": dict(inpaint=False, decoder_memory=[], teacher=False),
    "memae": dict(inpaint=False, decoder_memory=[], teacher=False, bottleneck_memory=True),
}


def make_step(arm: str, size: dict, batch: int):
    torch.manual_seed(0)
    model = PatchUNet(NetSettings(**size, **ARMS[arm]))
    disc = Discriminator(image_size=size["image_size"]) if arm == "squid" else None
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    opt_d = torch.optim.Adam(disc.parameters(), 1e-4) if disc is not None else None
    x = torch.rand(batch, 1, size["image_size"], size["image_size"])
    w = LossConfig()

    def train_step():
        model.train()
        out = model(x)
        fake = None
        if disc is not None:
            opt_d.zero_grad()
            discriminator_loss(disc(x), disc(out["recon"].detach()), w).backward()
            opt_d.step()
            fake = disc(out["recon"])
        loss = generator_loss(out, x, fake, w)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_queues(model)

    @torch.no_grad()
    def infer():
        model.eval()
        recon = model(x)["recon"]
        if disc is not None:
            disc.eval()
            disc(recon)

    return train_step, infer


def loop_read(query: torch.Tensor, memory: torch.Tensor, k: int) -> torch.Tensor:
    """The release's form: one matmul pair per patch position in a Python loop."""
    out = torch.zeros_like(query)
    for p in range(memory.shape[0]):
        w = read_weights(F.linear(query[:, p], memory[p]), k)
        out[:, p] = F.linear(w, memory[p].t())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    peak = matmul_peak_gflops()["peak"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s")
    for size_name in args.sizes:
        size = SIZES[size_name]
        steps = {arm: make_step(arm, size, args.batch) for arm in ARMS}
        train_t = interleaved({a: s[0] for a, s in steps.items()}, warmup=2, rounds=args.rounds)
        infer_t = interleaved({a: s[1] for a, s in steps.items()}, warmup=2, rounds=args.rounds)
        print(f"\n{size_name}: {size['image_size']}² images, r={size['base_filters']}, batch {args.batch}")
        print("| arm | train img/s | × AE (train) | infer img/s | × AE (infer) | train GFLOP/s | % of matmul peak |")
        print("|---|---|---|---|---|---|---|")
        for arm, (train_step, _) in steps.items():
            gflops = flops_of(train_step) / train_t[arm] / 1e9
            print(
                f"| {arm} | {args.batch / train_t[arm]:.1f} | {train_t['ae'] / train_t[arm]:.2f} | "
                f"{args.batch / infer_t[arm]:.1f} | {infer_t['ae'] / infer_t[arm]:.2f} | {gflops:.1f} | "
                f"{100 * gflops / peak:.0f}% |"
            )
        dim = (size["base_filters"] * 8 // 4) * (size["image_size"] // 3 // 8) ** 2
        q = MemoryQueue(num_positions=9, num_slots=size["num_slots"], dim=dim, shrink=5)
        query = torch.randn(64, 9, dim)
        t = interleaved(
            {
                "batched einsum": lambda q=q, query=query: q(query),
                "per-position loop": lambda q=q, query=query: loop_read(query, q.memory, 5),
            },
            rounds=args.rounds * 4,
        )
        torch.testing.assert_close(q(query), loop_read(query, q.memory, 5))
        print(
            f"memory read (64 images × 9 positions, D={dim}, S={size['num_slots']}): batched einsum "
            f"{1e3 * t['batched einsum']:.2f} ms vs per-position loop {1e3 * t['per-position loop']:.2f} ms "
            f"({t['per-position loop'] / t['batched einsum']:.1f}× faster)"
        )


if __name__ == "__main__":
    main()
