"""MT-TransUNet scale-out with 2 gloo processes: the smoke preset runs end to end under torchrun with DDP, every
rank draws its own disjoint shard of the masked and the mask-free stream (the sampler is rank-aware) while the
ranks' parameters stay identical (``ddp_check.py``), and one process writes the results, units and logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ARM = "seg+cls+dual"


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def test_smoke_recipe_under_torchrun_draws_disjoint_shards_and_keeps_ranks_identical(tmp_path, data_dir):
    proc = _torchrun(str(Path(__file__).with_name("ddp_check.py")), str(tmp_path), str(data_dir))
    # both ranks print OK only after every check passed; on a loaded machine gloo's process-group teardown can
    # still abort a rank afterwards ("terminate called without an active exception"), which is not a failed check
    teardown_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or teardown_abort, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("DDP-MT-OK") == 2, proc.stdout[-2000:] + proc.stderr[-4000:]

    run_dir = tmp_path / "mt_transunet" / "smoke"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["cost"]["world_size"] == 2
    assert {c["id"] for c in res["claims"]} == {"segmentation_works", "classification_works"}
    assert {"figures/arms.png", "figures/roc.png", "figures/masks.png"} <= set(res["figures"])
    unit_dir = run_dir / "units" / ARM / "seed0"
    assert (unit_dir / "model.safetensors").is_file() and (unit_dir / "card.json").is_file()
    unit = json.loads((unit_dir / "result.json").read_text())
    assert unit["steps"] == 4 and [p["step"] for p in unit["curve"]] == [2, 4]
    assert unit["steps_per_epoch"] == 4  # 16 masked images: 8 per rank, 2 per rank's batch
    assert len(unit["test"]["cls_probs"]) == 24
    # one process writes the logs: the unit reads each test split once, after its validation reads
    entries = [json.loads(x) for x in (run_dir / "access_log.jsonl").read_text().splitlines()]
    for name in (f"{ARM}/seed0", "trivial"):
        mine = [e for e in entries if e["unit"] == name]
        last_val = max(e["index"] for e in mine if e["split"] == "val")
        for split in ("test", "shifted_test"):
            reads = [e["index"] for e in mine if e["split"] == split]
            assert len(reads) == 1 and last_val < reads[0], (name, split)
    assert sum(e["purpose"] == "selection" for e in entries) == 2  # not once per rank
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r.get("unit") == f"{ARM}/seed0" and "total" in r] == [1, 2, 3, 4]
