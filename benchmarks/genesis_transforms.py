"""Genesis transforms speed: cubes/s of the Models Genesis and Semantic Genesis pipelines and of each transform
on 64×64×32 cubes, and the vectorised local pixel shuffle (10,000 windows, one gather/scatter) against the
release's per-window Python loop (same draws, identical output, checked). MONAI's RandCoarseShuffle /
RandCoarseDropout are timed for comparison when ``monai`` is importable.

    python benchmarks/genesis_transforms.py
    python benchmarks/genesis_transforms.py --batch 8 --rounds 5 --loop-batch 1 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from common import interleaved, table
from thrifty.methods.genesis import transforms as T


def monai_rows(x: torch.Tensor, *, windows: int, rounds: int) -> list[list[object]] | None:
    """MONAI coarse shuffle / dropout on the same cubes (one call per cube, MONAI's per-image API)."""
    try:
        from monai.transforms import RandCoarseDropout, RandCoarseShuffle
    except ImportError:
        return None
    spatial = x.shape[2:]
    max_side = [max(1, s // 10) for s in spatial]
    shuffle = RandCoarseShuffle(holes=windows, spatial_size=1, max_spatial_size=max_side, prob=1.0)
    dropout = RandCoarseDropout(holes=1, spatial_size=[s // 6 for s in spatial], max_holes=5, fill_value=None, prob=1.0)
    shuffle.set_random_state(0)
    dropout.set_random_state(0)
    cubes = list(x)
    t = interleaved(
        {
            "shuffle": lambda: [shuffle(c) for c in cubes],
            "dropout": lambda: [dropout(c) for c in cubes],
        },
        warmup=1,
        rounds=rounds,
    )
    n = x.shape[0]
    return [
        [f"MONAI RandCoarseShuffle ({windows} holes)", n / t["shuffle"], 1e3 * t["shuffle"] / n],
        ["MONAI RandCoarseDropout (≤5 holes, noise fill)", n / t["dropout"], 1e3 * t["dropout"] / n],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"))
    ap.add_argument("--windows", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loop-batch", type=int, default=1, help="cubes for the (slow) per-window loop comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cubes {tuple(args.size)} (D, H, W)")
    x = torch.rand(args.batch, 1, *args.size, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)

    fns = {
        "Models Genesis pipeline (MG probabilities)": lambda: T.models_genesis(x, generator=g),
        "Semantic Genesis pipeline (elastic + one of 4)": lambda: T.semantic_genesis(x, generator=g),
        "flip (prob 0.4)": lambda: T.flip(x, x, generator=g),
        f"local shuffle, {args.windows} windows (prob 1)": lambda: T.local_shuffle(
            x, prob=1.0, num_windows=args.windows, generator=g
        ),
        "local shuffle, partition overlap (prob 1)": lambda: T.local_shuffle(
            x, prob=1.0, num_windows=args.windows, overlap="partition", generator=g
        ),
        "Bézier intensity (prob 1)": lambda: T.nonlinear(x, prob=1.0, generator=g),
        "in-painting": lambda: T.inpaint(x, generator=g),
        "out-painting": lambda: T.outpaint(x, generator=g),
        "elastic (alpha 991, sigma 8)": lambda: T.elastic(x, generator=g),
    }
    t = interleaved(fns, warmup=1, rounds=args.rounds)
    rows = [[name, args.batch / t[name], 1e3 * t[name] / args.batch] for name in fns]
    extra = monai_rows(x, windows=args.windows, rounds=args.rounds)
    rows += extra or []
    print(f"\nbatch {args.batch}, median of {args.rounds} interleaved rounds")
    print(table(rows, ["transform", "cubes/s", "ms/cube"]))
    if extra is None:
        print("MONAI comparison skipped: monai is not importable")

    xl = x[: args.loop_batch]
    vec = lambda: T.local_shuffle(xl, prob=1.0, num_windows=args.windows, generator=torch.Generator().manual_seed(2))
    loop = lambda: T.local_shuffle_loop(
        xl, prob=1.0, num_windows=args.windows, generator=torch.Generator().manual_seed(2)
    )
    same = torch.equal(vec()[0], loop()[0])
    tl = interleaved({"vectorised": vec, "loop": loop}, warmup=1, rounds=max(3, args.rounds // 2))
    print(
        f"\nlocal shuffle ({args.windows} windows, {args.loop_batch} cube(s)): vectorised "
        f"{1e3 * tl['vectorised']:.1f} ms vs per-window loop {1e3 * tl['loop']:.1f} ms "
        f"({tl['loop'] / tl['vectorised']:.1f}× faster; outputs identical: {same})"
    )


if __name__ == "__main__":
    main()
