"""Label-Assemble scale-out with 2 gloo processes: DDP keeps the ranks' parameters identical while every rank
draws its own batch of the same per-role composition (and the check can fail: without DDP they drift apart);
the recipe runs end to end under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def _recipe(out: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _torchrun(
        "-m", "thrifty", "run", "data_assemble", "--preset", "smoke", f"out_dir={out}", f"data_dir={data_dir}",
        "progress=false", "num_threads=1", *overrides,
    )  # fmt: skip


def test_ddp_ranks_draw_their_own_batches_and_stay_identical():
    proc = _torchrun(str(Path(__file__).with_name("ddp_check.py")))
    # both ranks print OK only after every check passed; on a loaded machine gloo's process-group teardown can
    # still abort a rank afterwards ("terminate called without an active exception"), which is not a failed check
    teardown_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or teardown_abort, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("DDP-ASSEMBLE-OK") == 2, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_recipe_runs_under_torchrun(tmp_path, data_dir):
    proc = _recipe(tmp_path, data_dir, "arms=[naive,assemble]", "seeds=[0]")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "data_assemble" / "smoke"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["cost"]["world_size"] == 2
    assert {c["id"] for c in res["claims"]} == {
        "assemble_beats_naive_target_auc",
        "assemble_beats_naive_minority_auc",
        "assemble_works",
    }
    # the global batch of 8 is split over the ranks: each draws 4 with the shares 1/4, 1/2, 1/4
    unit = json.loads((run_dir / "units" / "assemble" / "seed0" / "result.json").read_text())
    assert unit["batch_roles"] == {"target": 1, "assembled": 2, "unlabelled": 1}
    naive = json.loads((run_dir / "units" / "naive" / "seed0" / "result.json").read_text())
    assert naive["batch_roles"] == {"target": 1, "assembled": 3}
    assert len(unit["test_target_probs"]) == 40
    assert (run_dir / "units" / "assemble" / "seed0" / "model.safetensors").is_file()
    # one process writes the logs: every unit reads the test split once, after its validation reads
    entries = [json.loads(x) for x in (run_dir / "access_log.jsonl").read_text().splitlines()]
    for name in ("naive/seed0", "assemble/seed0", "trivial"):
        mine = [e for e in entries if e["unit"] == name]
        tests = [e["index"] for e in mine if e["split"] == "test"]
        assert len(tests) == 1 and max(e["index"] for e in mine if e["split"] == "val") < tests[0], name
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r.get("unit") == "assemble/seed0" and "total" in r] == [1, 2]


def test_a_batch_that_does_not_split_over_the_ranks_is_a_config_error(tmp_path, data_dir):
    proc = _recipe(tmp_path, data_dir, "arms=[naive]", "seeds=[0]", "batch_size=7")
    assert proc.returncode != 0
    assert "divisible" in proc.stderr, proc.stderr[-4000:]
