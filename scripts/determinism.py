"""Which GLaM numbers are reproducible, and under what: same machine, thread count, CPU kernels.

Trains the same unit (one arm, one seed of a preset) several times in fresh processes, changing one
thing at a time that differs between machines of "the same kind" — the intra-op thread count, the
ATen SIMD kernels (``ATEN_CPU_CAPABILITY``) and MKL's instruction set (``MKL_ENABLE_INSTRUCTIONS``),
which a CPU without AVX-512 would pick by itself — and prints the final test loss and the largest
weight difference against the first run. Identical runs mean bitwise determinism on this machine;
differences under a kernel change mean the results depend on the CPU's kernels, not on chance.

    python scripts/determinism.py                       # moe, seed 0, quick preset (~4 min)
    python scripts/determinism.py --arm dense-active --steps 20
    python scripts/determinism.py --claim               # also the whole quick claim under AVX2 kernels (~8 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

SETTINGS: list[tuple[str, dict[str, str], list[str]]] = [
    ("2 threads (run A)", {}, ["num_threads=2"]),
    ("2 threads (run B)", {}, ["num_threads=2"]),
    ("1 thread", {}, ["num_threads=1"]),
    ("ATen AVX2 kernels", {"ATEN_CPU_CAPABILITY": "avx2"}, ["num_threads=2"]),
    ("MKL AVX2 kernels", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, ["num_threads=2"]),
]


def run(out: Path, name: str, env: dict[str, str], overrides: list[str], preset: str) -> Path:
    run_name = name.replace(" ", "_").replace("(", "").replace(")", "")
    cmd = [sys.executable, "-m", "thrifty", "-q", "run", "glam", "--preset", preset, *overrides]
    cmd += [f"out_dir={out}", f"run_name={run_name}", "progress=false", "resume=false"]
    subprocess.run(cmd, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    return out / "glam" / run_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--arm", default="moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="override max_steps (0: the preset's)")
    p.add_argument("--claim", action="store_true", help="also rerun the whole preset with AVX2 kernels")
    args = p.parse_args()
    unit = [f"arms=[{args.arm}]", f"seeds=[{args.seed}]"] + ([f"max_steps={args.steps}"] if args.steps else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        first: dict[str, torch.Tensor] | None = None
        print(f"| setting | test loss ({args.arm}, seed {args.seed}) | max weight diff vs run A |")
        print("|---|---|---|")
        for name, env, overrides in SETTINGS:
            run_dir = run(out, name, env, [*unit, *overrides], args.preset)
            res = json.loads((run_dir / "results.json").read_text())
            loss = json.loads((run_dir / "units" / args.arm / f"seed{args.seed}" / "result.json").read_text())
            weights = load_file(str(run_dir / "units" / args.arm / f"seed{args.seed}" / "model.safetensors"))
            first = first or weights
            diff = max(float((weights[k] - first[k]).abs().max()) for k in first)
            assert res["recipe"] == "glam"
            print(f"| {name} | {loss['test']['overall']!r} | {diff:.3g} |", flush=True)
        if args.claim:
            print("\n| kernels | claim | measured | 95% CI | per seed |\n|---|---|---|---|---|")
            for name, env in (
                ("default (AVX-512)", {}),
                ("AVX2 (ATen + MKL)", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
            ):
                res = json.loads(
                    (run(out, "claim " + name.split()[0], env, [], args.preset) / "results.json").read_text()
                )
                for c in res["claims"]:
                    if c["id"] == "moe_beats_dense_active":
                        vals = ", ".join(f"{v:+.3f}" for v in c["values"])
                        print(
                            f"| {name} | {c['id']} | {c['measured']:+.4f} | "
                            f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {vals} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
