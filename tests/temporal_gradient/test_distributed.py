"""Temporal-gradient scale-out with 2 gloo processes: DDP keeps the ranks' two-stream networks identical while
each rank draws its own clips from separate labelled and unlabelled samplers (and the check can fail: without DDP
they drift apart); the recipe runs end to end under torchrun, ablations with unused heads included."""

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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV)


def test_ddp_ranks_draw_their_own_clips_and_stay_identical():
    proc = _torchrun(str(Path(__file__).with_name("ddp_check.py")))
    teardown_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or teardown_abort, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("DDP-TG-OK") == 2, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_gathered_contrastive_loss_equals_one_process_on_the_global_batch():
    proc = _torchrun(str(Path(__file__).with_name("gather_check.py")))
    teardown_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or teardown_abort, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("GATHER-OK") == 2, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_recipe_runs_under_torchrun(tmp_path, data_dir):
    proc = _torchrun(
        "-m", "thrifty", "run", "temporal_gradient", "--preset", "smoke", f"out_dir={tmp_path}",
        f"data_dir={data_dir}", "progress=false", "num_threads=1", "arms=[supervised,tg_full,tg_no_contrast]",
        "seeds=[0]",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "temporal_gradient" / "smoke"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["cost"]["world_size"] == 2
    assert {"tg_full_beats_tg_no_contrast", "tg_works", "single_frame_near_chance"} <= {c["id"] for c in res["claims"]}
    for arm in ("supervised", "tg_full", "tg_no_contrast"):
        unit = json.loads((run_dir / "units" / arm / "seed0" / "result.json").read_text())
        assert unit["steps"] == 2 and "test" in unit
    entries = [json.loads(x) for x in (run_dir / "access_log.jsonl").read_text().splitlines()]
    assert {e["purpose"] for e in entries if e["split"] == "test"} <= {"final_test", "figure"}


def test_a_stream_that_does_not_split_over_the_ranks_is_a_config_error(tmp_path, data_dir):
    proc = _torchrun(
        "-m", "thrifty", "run", "temporal_gradient", "--preset", "smoke", f"out_dir={tmp_path}",
        f"data_dir={data_dir}", "progress=false", "arms=[supervised]", "seeds=[0]", "data.labelled_per_step=3",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "divisible" in proc.stderr, proc.stderr[-4000:]
