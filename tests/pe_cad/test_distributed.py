"""PE CAD scale-out. With 2 gloo processes under torchrun the smoke preset runs end to end, every rank draws its own
disjoint shard of each batch while the ranks' parameters stay identical (``ddp_check.py``), one process writes the
results, units and logs, the features lie one safetensors file per exam and equal one process's extraction, and
without BatchNorm the DDP units equal one process's units at the same effective batch. Without torchrun: the
rank-sharded sampler, the row-sliced augmentation, the shard gather and the per-exam feature files."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from thrifty.core.registry import load_config
from thrifty.core.run import MetricsLog
from thrifty.core.splits import AccessLog
from thrifty.methods.pe_cad import train as recipe
from thrifty.methods.pe_cad.data import (
    GuardedFeatures,
    exam_feature_name,
    load_feature_split,
    prepare_data,
    read_exam_features,
    save_exam_features,
    write_feature_index,
)
from thrifty.methods.pe_cad.stage1 import (
    AugmentConfig,
    ShardedBatchSampler,
    augment,
    epoch_batches,
    gather_shards,
    shard_rows,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SPLITS = ("train", "val", "test")


def smoke(out: Path, data_dir: Path, *overrides: str):
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", "seeds=[0]", *overrides]
    return load_config("pe_cad", "smoke", args)[1]


@pytest.fixture
def one_thread():
    """One intra-op thread, as the torchrun processes (OMP_NUM_THREADS=1), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The smoke preset (seed 0, every arm and kind) under ``torchrun --nproc_per_node=2``, with its own data cache
    so that the pretraining runs under DDP too."""
    out = tmp_path_factory.mktemp("ddp")
    data = out / "data"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(Path(__file__).with_name("ddp_check.py")), str(out), str(data)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    return out / "pe_cad" / "smoke", data, proc


# ------------------------------------------------------------------------------------------------ torchrun


@pytest.mark.dist
def test_smoke_recipe_under_torchrun_draws_disjoint_shards_and_keeps_ranks_identical(ddp_run):
    run_dir, _, proc = ddp_run
    # both ranks print OK only after every check passed; on a loaded machine gloo's process-group teardown can
    # still abort a rank afterwards ("terminate called without an active exception"), which is not a failed check
    teardown_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or teardown_abort, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("DDP-PE-OK") == 2, proc.stdout[-3000:] + proc.stderr[-5000:]

    res = json.loads((run_dir / "results.json").read_text())
    assert res["cost"]["world_size"] == 2
    assert {"image_detection_works", "exam_detection_works", "cnn_beats_vit_random_init"} <= {
        c["id"] for c in res["claims"]}  # fmt: skip
    assert set(res["figures"]) == {f"figures/{n}.png" for n in ("arms", "roc", "slices")}
    cfg = smoke(run_dir.parent.parent, run_dir.parent.parent / "data")
    for arm in cfg.stage1.arms:
        unit = json.loads((recipe.stage1_dir(run_dir, arm, 0) / "result.json").read_text())
        assert unit["world_size"] == 2 and [p["step"] for p in unit["curve"]] == [1, 2]
    for kind in cfg.stage2.kinds:
        unit = json.loads((recipe.stage2_dir(run_dir, kind, 0) / "result.json").read_text())
        assert unit["world_size"] == 2 and np.asarray(unit["test"]["exam_probs"]).shape == (3, 9)
    # one process writes the logs: each unit reads the test split once, after its validation reads
    entries = read_jsonl(run_dir / "access_log.jsonl")
    assert [e["index"] for e in entries] == list(range(len(entries)))
    units = [f"stage1/{a}/seed0" for a in cfg.stage1.arms] + [f"stage2/{k}/seed0" for k in cfg.stage2.kinds]
    for name in units:
        mine = [e for e in entries if e["unit"] == name]
        tests = [e["index"] for e in mine if e["split"] == "test"]
        assert len(tests) == 1 and max(e["index"] for e in mine if e["split"] == "val") < tests[0], name
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in metrics if r.get("unit") == "stage1/vit-random/seed0" and "loss" in r]
    assert steps == [1, 2]  # logged once, not once per rank
    pretraining = res["pretraining"]
    assert set(pretraining) == {a for a in cfg.stage1.arms if not a.endswith("-random")}
    assert all(not p["cached"] and math.isfinite(p["loss_last"]) for p in pretraining.values())


@pytest.mark.dist
def test_features_are_one_file_per_exam_and_equal_one_process_extraction(ddp_run, tmp_path, one_thread):
    run_dir, data_dir, proc = ddp_run
    assert proc.stdout.count("DDP-PE-OK") == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((run_dir / "results.json").read_text())
    arm = res["selection"]["0"]
    fdir = recipe.features_dir(run_dir, arm, 0)
    cfg = smoke(tmp_path, data_dir)
    data = prepare_data(cfg, data_dir, tmp_path, AccessLog())
    sets = {"train": data.train, "val": data.val.get("figure", "t"), "test": data.test.get("figure", "t")}
    # one process extracts from the same weights
    single_unit = recipe.stage1_dir(tmp_path / "pe_cad" / "smoke", arm, 0)
    single_unit.mkdir(parents=True)
    shutil.copy(recipe.stage1_dir(run_dir, arm, 0) / "model.safetensors", single_unit)
    single = recipe.features_unit(arm, 0, cfg, data, tmp_path / "pe_cad" / "smoke", torch.device("cpu"))
    for split in SPLITS:
        es = sets[split]
        names = {exam_feature_name(s) for s in es.study_ids}
        assert {p.name for p in (fdir / split).glob("*.safetensors")} == names  # one file per exam, no other
        index = json.loads((fdir / split / "index.json").read_text())
        assert [e["study_id"] for e in index["exams"]] == es.study_ids.tolist()
        for e, study in enumerate(es.study_ids):
            ddp = load_file(fdir / split / exam_feature_name(study))
            one = load_file(single_unit / "features" / split / exam_feature_name(study))
            a, b = int(es.offsets[e]), int(es.offsets[e + 1])
            assert ddp["features"].shape == (b - a, 16) and np.array_equal(ddp["slice_labels"], es.slice_labels[a:b])
            torch.testing.assert_close(ddp["features"], one["features"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ddp["probs"], one["probs"], rtol=1e-5, atol=1e-6)
        loaded = load_feature_split(fdir / split)
        assert np.array_equal(loaded.offsets, es.offsets) and np.array_equal(loaded.exam_labels, es.exam_labels)
        torch.testing.assert_close(loaded.features, single[split].features, rtol=1e-5, atol=1e-6)


@pytest.mark.dist
def test_ddp_units_without_batchnorm_equal_one_process_at_the_same_effective_batch(ddp_run, tmp_path, one_thread):
    """Stage 1 ViT (augmentation on, 4 slices per rank = one process's batch of 8) and stage 2 CC (1 exam per rank
    = batch 2, the RSNA loss normalised over the global batch): one process reproduces the DDP units."""
    run_dir, data_dir, proc = ddp_run
    assert proc.stdout.count("DDP-PE-OK") == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    cfg = smoke(tmp_path, data_dir)
    access = AccessLog()
    data = prepare_data(cfg, data_dir, tmp_path, access)
    one_dir, device, log = tmp_path / "pe_cad" / "smoke", torch.device("cpu"), MetricsLog(tmp_path / "m", enabled=False)
    one = recipe.stage1_unit("vit-random", 0, cfg, data, one_dir, log, device, {})
    ddp = json.loads((recipe.stage1_dir(run_dir, "vit-random", 0) / "result.json").read_text())
    assert [p["step"] for p in one["curve"]] == [p["step"] for p in ddp["curve"]]
    for a, b in zip(one["curve"], ddp["curve"], strict=True):
        assert a["val_image_auc"] == pytest.approx(b["val_image_auc"], abs=1e-6)
    assert one["test_image_auc"] == pytest.approx(ddp["test_image_auc"], abs=1e-6)
    assert one["loss_first"] == pytest.approx(ddp["loss_first"], rel=1e-5)
    wa, wb = (load_file(recipe.stage1_dir(d, "vit-random", 0) / "model.safetensors") for d in (one_dir, run_dir))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5

    arm = json.loads((run_dir / "results.json").read_text())["selection"]["0"]
    fs = {s: load_feature_split(recipe.features_dir(run_dir, arm, 0) / s) for s in SPLITS}
    feats = {"train": fs["train"], "val": GuardedFeatures("val", fs["val"], access),
             "test": GuardedFeatures("test", fs["test"], access)}  # fmt: skip
    feats |= {f"batch/{s}": recipe.collate(fs[s], cfg) for s in SPLITS}
    one = recipe.stage2_unit("cc", 0, arm, cfg, feats, one_dir, log, device)
    ddp = json.loads((recipe.stage2_dir(run_dir, "cc", 0) / "result.json").read_text())
    for a, b in zip(one["curve"], ddp["curve"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["val_mean_exam_auc"] == pytest.approx(b["val_mean_exam_auc"], abs=1e-6)
    np.testing.assert_allclose(one["test"]["exam_probs"], ddp["test"]["exam_probs"], atol=2e-5)
    wa, wb = (load_file(recipe.stage2_dir(d, "cc", 0) / "model.safetensors") for d in (one_dir, run_dir))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


# ------------------------------------------------------------------------------------- sampler and shards


def test_shard_rows_split_a_batch_into_disjoint_contiguous_near_equal_shares():
    for total in (0, 1, 2, 5, 8, 13):
        for world in (1, 2, 3, 4):
            shares = [shard_rows(total, rank=r, world_size=world) for r in range(world)]
            rows = [i for s in shares for i in range(s.start, s.stop)]
            assert rows == list(range(total))  # disjoint, in rank order, covering the batch
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1 and (sizes[0] > 0 or total == 0)
    with pytest.raises(ValueError, match="rank"):
        shard_rows(4, rank=2, world_size=2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_sampler_gives_each_rank_a_disjoint_share_of_one_processs_batches(world):
    n, batch, steps = 17, 8, 7  # epochs of 3 batches: 8, 8, 1
    ranks = [ShardedBatchSampler(n=n, batch_size=batch, steps=steps, generator=torch.Generator().manual_seed(3),
                                 rank=r, world_size=world) for r in range(world)]  # fmt: skip
    single = epoch_batches(n, batch, steps, torch.Generator().manual_seed(3))
    for step in range(steps):
        glob = single[step]
        assert all(torch.equal(s.global_batch(step), glob) for s in ranks)  # the same on every rank
        real = [s.batch_at(step) for s in ranks if s.loss_scale(step) > 0]
        assert torch.equal(torch.cat(real), glob)  # the real shares make up the batch, in rank order
        assert sum(s.loss_scale(step) for s in ranks) == pytest.approx(world)  # the averaged loss is the batch mean
        for s in ranks:
            if s.loss_scale(step) == 0:  # an empty share runs the batch's first index at weight 0
                assert len(glob) < world and s.batch_at(step).tolist() == glob[:1].tolist()
    for epoch in range(2):  # within an epoch no index is drawn twice, over all ranks
        drawn = [i for step in range(3 * epoch, 3 * epoch + 3) for s in ranks if s.loss_scale(step) > 0
                 for i in s.batch_at(step).tolist()]  # fmt: skip
        assert sorted(drawn) == list(range(n))
    assert [b.tolist() for b in ranks[0]] == [ranks[0].batch_at(k).tolist() for k in range(steps)]


def test_sharded_sampler_is_deterministic_from_the_seed_and_step():
    def draws(seed: int, rank: int) -> list[list[int]]:
        s = ShardedBatchSampler(n=30, batch_size=6, steps=9, generator=torch.Generator().manual_seed(seed),
                                rank=rank, world_size=2)  # fmt: skip
        return [s.batch_at(k).tolist() for k in reversed(range(9))]  # any order of steps

    assert draws(1, 0) == draws(1, 0) and draws(1, 1) == draws(1, 1)
    assert draws(1, 0) != draws(2, 0)
    assert not any(set(a) & set(b) for a, b in zip(draws(1, 0), draws(1, 1), strict=True))
    with pytest.raises(ValueError, match="world_size"):
        ShardedBatchSampler(n=4, batch_size=2, steps=1, generator=torch.Generator(), rank=1, world_size=1)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_augmenting_their_rows_equal_one_process_augmenting_the_batch(world):
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig()
    whole = augment(x, generator=torch.Generator().manual_seed(4), config=cfg)
    parts = []
    for r in range(world):
        gen = torch.Generator().manual_seed(4)
        rows = shard_rows(7, rank=r, world_size=world)
        parts.append(augment(x[rows], generator=gen, config=cfg, rows=rows, total=7))
        follow = torch.rand(1, generator=gen)  # every rank's generator advanced as for the whole batch
        ref = torch.Generator().manual_seed(4)
        augment(x, generator=ref, config=cfg)
        assert torch.equal(follow, torch.rand(1, generator=ref))
    torch.testing.assert_close(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="rows"):
        augment(x[:2], generator=torch.Generator(), config=cfg, rows=slice(0, 3), total=7)


def test_gather_shards_is_the_identity_in_one_process():
    t = torch.arange(6.0).view(3, 2)
    assert gather_shards(t, 3, rank=0, world_size=1) is t


# ---------------------------------------------------------------------------------------- per-exam files


def test_per_exam_feature_files_round_trip_in_split_order(tmp_path):
    rng = np.random.default_rng(0)
    exams = {"1.2.840.1": 3, "ctpa-1-0": 2, "we/ird id": 4}  # a DICOM UID, a synthetic id, a path-unsafe id
    for study, s in exams.items():
        save_exam_features(tmp_path / exam_feature_name(study), features=torch.rand(s, 5), probs=torch.rand(s),
                           slice_labels=rng.integers(0, 2, s), exam_labels=rng.integers(0, 2, 9), study_id=study,
                           digest="abc")  # fmt: skip
    assert exam_feature_name("we/ird id") == "we_ird_id.safetensors"
    order = ["ctpa-1-0", "we/ird id", "1.2.840.1"]
    write_feature_index(tmp_path, split="val", study_ids=order, settings={"k": 1})
    fs = load_feature_split(tmp_path)
    assert fs.study_ids.tolist() == order and fs.offsets.tolist() == [0, 2, 6, 9]
    assert fs.features.shape == (9, 5) and fs.probs.shape == (9,) and fs.exam_labels.shape == (3, 9)
    first = read_exam_features(tmp_path / exam_feature_name("ctpa-1-0"))
    torch.testing.assert_close(fs.features[:2], first["features"])
    assert not list(tmp_path.glob(".*tmp"))  # written atomically
    (tmp_path / exam_feature_name("1.2.840.1")).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"1\.2\.840\.1\.safetensors"):
        load_feature_split(tmp_path)
    (tmp_path / exam_feature_name("ctpa-1-0")).unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        load_feature_split(tmp_path)
