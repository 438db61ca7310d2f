"""Run every benchmark in turn (``make bench``); each prints its own side-by-side table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "moe_layer.py",
    "lm_step.py",
    "squid_speed.py",
    "autodistill_speed.py",
    "genesis_transforms.py",
    "genesis_unet.py",
    "bigssl_speed.py",
    "data_assemble_speed.py",
    "temporal_gradient_speed.py",
    "mt_transunet_speed.py",
    "pe_cad_speed.py",
]

if __name__ == "__main__":
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode:
            failed.append(name)
    sys.exit(1 if failed else 0)
