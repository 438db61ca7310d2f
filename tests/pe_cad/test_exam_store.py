"""The streamed per-exam data path of PE CAD (``data.store=exams``) against the in-memory one (``memory``).

The store gives exactly the in-memory split's stacks, labels, counts and baseline scores; stage 1, pretraining,
feature extraction and stage 2 give identical results on either; one-slice exams stack as hand-computed (edges
replicated); a boolean mask reads as its indices and float indices are refused; building resumes (a deleted exam file
alone is rewritten), is crash-safe (stale temporary files removed, a corrupt exam file rewritten with a warning while
an open store reading it raises an error naming it) and refuses study ids sharing a file name, or exams of another
H x W, naming them; reading is lazy (no more files open than ``data.open_exams``); under ``torchrun`` two ranks
preprocess disjoint shares into the files one process writes and stage 2 reads only each rank's exams. Also: the
``data.store`` / ``stage1.sync_bn`` config keys, and the split manifest written by the main rank alone."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from thrifty.core.config import ConfigError
from thrifty.core.distributed import DistInfo
from thrifty.core.registry import load_config
from thrifty.core.run import MetricsLog
from thrifty.core.splits import AccessLog
from thrifty.methods.pe_cad import data as pe_data
from thrifty.methods.pe_cad import exam_store
from thrifty.methods.pe_cad import train as recipe
from thrifty.methods.pe_cad.data import (
    ExamSet,
    FeatureFiles,
    GuardedFeatures,
    exam_store_dir,
    open_feature_split,
    prepare_data,
    stack_view,
    synthetic_jobs,
)
from thrifty.methods.pe_cad.exam_store import (
    CorruptExamFile,
    ExamJob,
    ExamStore,
    as_rows,
    build_exam_split,
    exam_file_name,
    write_exam_file,
    write_exam_index,
)
from thrifty.methods.pe_cad.pretrain import initialise, slice_level_labels
from thrifty.methods.pe_cad.stage1 import build_backbone, stack_all
from thrifty.methods.pe_cad.stage2 import collate_exams

SPLITS = ("train", "val", "test")
TIMING = ("train_seconds", "train_slices_per_s", "train_exams_per_s")


def smoke(out: Path, data_dir: Path, *overrides: str):
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", "seeds=[0]", *overrides]
    return load_config("pe_cad", "smoke", args)[1]


def splits_of(data) -> dict:
    return {"train": data.train, "val": data.val.get("figure", "t"), "test": data.test.get("figure", "t")}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The smoke preset's exams in memory and in per-exam files (the same data directory)."""
    root = tmp_path_factory.mktemp("store")
    out = {}
    for store in ("memory", "exams"):
        cfg = smoke(root, root / "data", f"data.store={store}", "data.open_exams=2")
        out[store] = (cfg, prepare_data(cfg, root / "data", root, AccessLog()))
    return root, out


def without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING}


# ----------------------------------------------------------------------------------------------- equality


def test_store_gives_the_in_memory_stacks_labels_and_counts(both):
    _, sets = both
    (_, mem), (_, ex) = sets["memory"], sets["exams"]
    assert ex.digest == mem.digest and ex.info == mem.info
    gen = torch.Generator().manual_seed(0)
    for split, (a, b) in zip(SPLITS, zip(splits_of(mem).values(), splits_of(ex).values())):
        assert isinstance(a, ExamSet) and isinstance(b, ExamStore), split
        assert (a.num_exams, a.num_slices, b.image_shape) == (b.num_exams, b.num_slices, a.image_shape)
        assert a.study_ids.tolist() == b.study_ids.tolist()
        for key in ("offsets", "slice_counts", "slice_labels", "exam_labels", "exam_of", "trivial"):
            assert np.array_equal(getattr(a, key), getattr(b, key)), (split, key)
        assert np.array_equal(a.exam_any_pe(), b.exam_any_pe())
        assert np.array_equal(a.exam_max(a.trivial[:, 3]), b.exam_max(b.trivial[:, 3]))
        assert torch.equal(a.stacks(slice(None)), b.stacks(slice(None)))  # every stack, edges replicated
        idx = torch.randint(0, a.num_slices, (40,), generator=gen)  # random order, repeats
        assert torch.equal(a.stacks(idx, dtype=torch.float16), b.stacks(idx, dtype=torch.float16))
        assert torch.equal(stack_view(a)[idx], stack_view(b)[idx]) and stack_view(b).shape == (a.num_slices, 3, 32, 32)
        assert torch.equal(a.slice_images(idx), b.slice_images(idx))
        ma, mb = a.slice_masks(idx), b.slice_masks(idx)
        assert (ma is None) == (mb is None) == (split != "val")
        assert ma is None or np.array_equal(ma, mb)
        e1 = slice(int(b.offsets[1]), int(b.offsets[2]))  # one exam's stacks = stage1.stack_all of its slices
        torch.testing.assert_close(b.stacks(e1), stack_all(b.slice_images(e1).float()))


def test_store_reads_stay_guarded_and_logged(tmp_path, both):
    root, _ = both
    access = AccessLog(tmp_path / "access_log.jsonl")
    data = prepare_data(smoke(root, root / "data", "data.store=exams"), root / "data", root, access)
    assert isinstance(data.test.get("final_test", "u"), ExamStore)
    with pytest.raises(PermissionError, match="selection"):
        data.test.get("selection", "u")
    assert [(e["split"], e["purpose"]) for e in access.entries] == [("test", "final_test")]


def test_stage1_features_and_stage2_are_identical_with_either_store(tmp_path, both):
    """cnn-random (BatchNorm) fine-tuned, its features extracted and CC trained on them, once per store."""
    _, sets = both
    device, metrics = torch.device("cpu"), MetricsLog(tmp_path / "m", enabled=False)
    out = {}
    for store, (cfg, data) in sets.items():
        run_dir = tmp_path / store
        s1 = recipe.stage1_unit("cnn-random", 0, cfg, data, run_dir, metrics, device, {})
        fs = recipe.features_unit("cnn-random", 0, cfg, data, run_dir, device)
        access = AccessLog()
        feats = {"train": fs["train"], "val": GuardedFeatures("val", fs["val"], access),
                 "test": GuardedFeatures("test", fs["test"], access)}  # fmt: skip
        feats |= {f"batch/{s}": recipe.collate(fs[s], cfg) for s in SPLITS}
        s2 = recipe.stage2_unit("cc", 0, "cnn-random", cfg, feats, run_dir, metrics, device)
        out[store] = (s1, fs, s2, run_dir)
    (s1m, fsm, s2m, dm), (s1e, fse, s2e, de) = out["memory"], out["exams"]
    assert isinstance(fse["train"], FeatureFiles) and isinstance(recipe.collate(fse["train"], sets["exams"][0]),
                                                                 recipe.ExamBatches)  # fmt: skip
    assert without_timing(s1m) == without_timing(s1e)
    wa, wb = (load_file(recipe.stage1_dir(d, "cnn-random", 0) / "model.safetensors") for d in (dm, de))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for split in SPLITS:
        assert np.array_equal(fsm[split].probs, fse[split].probs)
        assert np.array_equal(fsm[split].offsets, fse[split].offsets)
    assert without_timing(s2m) == without_timing(s2e)


def test_pretraining_on_the_store_equals_pretraining_on_stacked_tensors(both):
    _, sets = both
    mem, ex = sets["memory"][1].train, sets["exams"][1].train
    labels = slice_level_labels(mem.slice_counts.tolist(), num_bins=3)
    runs = []
    for slices in (mem.stacks(slice(None), dtype=torch.float16), stack_view(ex)):
        model = build_backbone("small_cnn", image_size=32, seed=0, width=8, feature_dim=16)
        runs.append(initialise(model, "supervised", slices=slices, labels=labels, steps=2, batch_size=8, seed=1,
                               num_classes=3))  # fmt: skip
    assert runs[0].losses == runs[1].losses
    assert all(torch.equal(runs[0].state_dict[k], runs[1].state_dict[k]) for k in runs[0].state_dict)


def test_real_rsna_exams_are_the_same_in_either_store(tmp_path):
    """Three exams per split written as an RSNA-STR tree (DICOMs + train.csv): the store holds the in-memory stacks."""
    pytest.importorskip("pydicom")
    from thrifty.data import ctpa_synth
    from thrifty.data.rsna_pe import write_ct_series

    exams = ctpa_synth.generate(6, seed=3, spec=ctpa_synth.CTPASpec(size=32, slices=(12, 12), indeterminate_rate=0.0))
    rows = []
    for ex in exams:
        series = ex.study_uid + ".1"
        write_ct_series(ex.volume, tmp_path / "train", positions=ex.positions, spacing=ex.spacing,
                        study_uid=ex.study_uid, series_uid=series,
                        name=lambda k, sop, ex=ex, series=series: f"{ex.study_uid}/{series}/{sop}.dcm")  # fmt: skip
        rows += [",".join([ex.study_uid, series, f"{series}.{k + 1}", str(int(ex.slice_labels[k])),
                           *(str(int(v)) for v in ex.labels.values())]) for k in range(ex.n_slices)]  # fmt: skip
    head = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "pe_present_on_image", *exams[0].labels]
    (tmp_path / "train.csv").write_text("\n".join([",".join(head), *rows]) + "\n")
    manifest = {"train": [e.study_uid for e in exams[:2]], "val": [exams[2].study_uid, exams[3].study_uid],
                "test": [e.study_uid for e in exams[4:]]}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    real = ["data.source=rsna", f"data.real.root={tmp_path / 'train'}", "data.real.labels_csv=../train.csv",
            f"data.real.manifest={tmp_path / 'manifest.json'}"]  # fmt: skip
    mem, ex = (prepare_data(smoke(tmp_path, tmp_path / "c", *real, f"data.store={st}"), tmp_path / "c", tmp_path,
                            AccessLog()) for st in ("memory", "exams"))  # fmt: skip
    assert mem.info == ex.info and mem.digest == ex.digest
    for a, b in zip(splits_of(mem).values(), splits_of(ex).values()):
        assert isinstance(b, ExamStore) and a.study_ids.tolist() == b.study_ids.tolist()
        assert np.array_equal(a.slice_labels, b.slice_labels) and np.array_equal(a.exam_labels, b.exam_labels)
        assert torch.equal(a.stacks(slice(None)), b.stacks(slice(None))) and b.slice_masks([0]) is None


# ------------------------------------------------------------------------------------ resume and corruption


def counted_jobs(jobs: list[ExamJob], loads: list[str]) -> list[ExamJob]:
    def load(job: ExamJob):
        loads.append(job.study_id)
        return job.load()

    return [ExamJob(j.study_id, lambda j=j: load(j)) for j in jobs]


def test_build_resumes_rewriting_only_a_deleted_exam_file(tmp_path):
    cfg = smoke(tmp_path, tmp_path, "data.store=exams")
    jobs = synthetic_jobs(cfg)["train"]
    loads: list[str] = []
    kw = {"split": "train", "digest": "d1", "keep_masks": False}
    assert build_exam_split(tmp_path, counted_jobs(jobs, loads), **kw) == len(jobs)
    files = {j.study_id: tmp_path / exam_file_name(j.study_id) for j in jobs}
    stamps = {s: p.stat().st_mtime_ns for s, p in files.items()}
    index = (tmp_path / "index.json").read_text()
    loads.clear()
    assert build_exam_split(tmp_path, counted_jobs(jobs, loads), **kw) == 0 and loads == []  # all reused
    gone = jobs[1].study_id
    files[gone].unlink()
    assert build_exam_split(tmp_path, counted_jobs(jobs, loads), **kw) == 1 and loads == [gone]
    assert all(files[s].stat().st_mtime_ns == stamps[s] for s in files if s != gone)
    assert (tmp_path / "index.json").read_text() == index  # the rewritten exam is the same exam
    assert not list(tmp_path.glob(".*tmp"))  # written atomically
    store = ExamStore.open(tmp_path, digest="d1")
    assert store.study_ids.tolist() == [j.study_id for j in jobs]
    assert build_exam_split(tmp_path, counted_jobs(jobs, loads), **{**kw, "digest": "d2"}) == len(jobs)  # settings


def tiny_exam(study: str, values, *, hw=(2, 2), masks: bool = False) -> dict:
    """An exam of len(values) slices, slice k filled with values[k] (exact in float16)."""
    s = len(values)
    exam = {"study_id": study, "slices": np.ones((s, *hw), np.float16) * np.asarray(values, np.float16)[:, None, None],
            "slice_labels": np.arange(s) % 2, "exam_labels": np.arange(9) % 2, "trivial": np.zeros((s, 2))}  # fmt: skip
    return exam | ({"masks": np.ones((s, *hw), np.uint8)} if masks else {})


def tiny_jobs(specs: dict[str, list[float]], loads: list[str] | None = None, **kw) -> list[ExamJob]:
    def load(sid: str, values: list[float]) -> dict:
        if loads is not None:
            loads.append(sid)
        return tiny_exam(sid, values, **kw)

    return [ExamJob(sid, lambda sid=sid, v=v: load(sid, v)) for sid, v in specs.items()]


TINY = {"kw": {"split": "train", "digest": "d", "keep_masks": False}}


def test_one_slice_exams_stack_their_slice_three_times(tmp_path):
    """Exams of 1, 3 and 1 slices (global slices 0 | 1 2 3 | 4, slice k holding the value k): the stacks are the
    hand-written neighbours (i-1, i, i+1 within the exam, edges replicated), in the store and in memory."""
    jobs = tiny_jobs({"one-a": [0.0], "three": [1.0, 2.0, 3.0], "one-b": [4.0]})
    build_exam_split(tmp_path, jobs, **TINY["kw"])
    store = ExamStore.open(tmp_path, digest="d")
    expected = torch.tensor([[0, 0, 0], [1, 1, 2], [1, 2, 3], [2, 3, 3], [4, 4, 4]], dtype=torch.float32)
    mem = ExamSet(slices=torch.arange(5, dtype=torch.float16)[:, None, None].expand(5, 2, 2).contiguous(),
                  offsets=np.array([0, 1, 4, 5]), slice_labels=np.zeros(5, np.uint8),
                  exam_labels=np.zeros((3, 9), np.uint8), study_ids=np.array(["one-a", "three", "one-b"]),
                  trivial=np.zeros((5, 2)))  # fmt: skip
    assert store.slice_counts.tolist() == [1, 3, 1]
    for exams in (store, mem):
        got = exams.stacks(slice(None))
        assert got.shape == (5, 3, 2, 2) and torch.equal(got, expected[:, :, None, None].expand(5, 3, 2, 2))
        assert torch.equal(exams.stacks([4, 0]), expected[[4, 0], :, None, None].expand(2, 3, 2, 2))
    # an exam of no slice cannot be preprocessed (pe_data.preprocess_exam refuses it) nor written
    with pytest.raises(ValueError, match="volume"):
        pe_data.preprocess_exam(np.zeros((0, 4, 4)), size=4, level=100, width=700, lung_crop=False)
    with pytest.raises(ValueError, match="empty: no slice"):
        write_exam_file(tmp_path / "empty.safetensors", tiny_exam("empty", []), digest="d", keep_masks=False)
    assert not (tmp_path / "empty.safetensors").exists()


def test_a_boolean_mask_reads_as_its_indices_and_float_indices_are_refused(tmp_path):
    build_exam_split(tmp_path, tiny_jobs({"a": [0.0, 1.0], "b": [2.0, 3.0, 4.0]}), **TINY["kw"])
    store = ExamStore.open(tmp_path, digest="d")
    mask = np.array([True, False, False, True, True])
    for m in (mask, torch.from_numpy(mask), mask.tolist()):
        assert as_rows(m, 5).tolist() == [0, 3, 4]
        assert torch.equal(store.stacks(m), store.stacks([0, 3, 4]))
        assert torch.equal(store.slice_images(m), store.slice_images(torch.tensor([0, 3, 4])))
    assert as_rows(np.zeros(5, bool), 5).tolist() == [] and as_rows([], 5).tolist() == []
    with pytest.raises(IndexError, match=r"\(5,\)"):
        as_rows(mask[:4], 5)  # a mask of another length
    for bad in (np.array([0.0, 1.7]), torch.tensor([1.0]), [0.5]):
        with pytest.raises(TypeError, match="integers or a boolean mask"):
            store.stacks(bad)


def test_a_build_removes_the_temporary_files_killed_writes_of_its_exams_left(tmp_path):
    jobs = tiny_jobs({"a": [0.0], "b": [1.0], "c": [2.0], "d": [3.0]})
    build_exam_split(tmp_path, jobs, **TINY["kw"])
    stale = {s: tmp_path / f".{exam_file_name(s)}.{99999 + k}.tmp" for k, s in enumerate("abcd")}
    for path in stale.values():
        path.write_bytes(b"half an exam")  # a write killed before its rename
    other = tmp_path / ".unrelated.safetensors.7.tmp"
    other.write_bytes(b"")
    assert build_exam_split(tmp_path, jobs, **TINY["kw"], rank=0, world_size=2) == 0  # rank 0: exams a and c
    assert [s for s, p in stale.items() if p.exists()] == ["b", "d"] and other.exists()  # rank 1's are its own
    build_exam_split(tmp_path, jobs, **TINY["kw"])
    assert not any(p.exists() for p in stale.values()) and other.exists()


def test_a_write_is_fsynced_and_a_failed_one_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / exam_file_name("a")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    write_exam_file(path, tiny_exam("a", [1.0]), digest="d", keep_masks=False)
    assert len(synced) == (2 if os.name == "posix" else 1)  # the file, then its directory
    before = path.read_bytes()

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_exam_file(path, tiny_exam("a", [2.0]), digest="d", keep_masks=False)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_exam_file_is_rewritten_by_the_build_and_named_by_an_open_store(tmp_path, damage, caplog):
    cfg = smoke(tmp_path, tmp_path / "data", "data.store=exams")
    prepare_data(cfg, tmp_path / "data", tmp_path, AccessLog())
    split_dir = exam_store_dir(next((tmp_path / "data").glob("pe_cad-*")), "val")
    store = ExamStore.open(split_dir, digest=json.loads((split_dir / "index.json").read_text())["digest"])
    bad = store.files[1]
    blob = bad.read_bytes()
    tensors = {k: v.clone() for k, v in load_file(bad).items()}  # copies: the file is truncated in place below
    first = slice(int(store.offsets[1]), int(store.offsets[1]) + 2)
    before = ExamStore.open(split_dir, digest=store.digest).stacks(first)
    bad.write_bytes(b"not a safetensors file" if damage == "garbage" else blob[: len(blob) // 2])
    with pytest.raises(CorruptExamFile, match=bad.name):  # a store already open meets it when reading that exam
        store.stacks(first)
    assert store.stacks([0]).shape == (1, 3, 32, 32)  # the other exams still read
    with caplog.at_level(logging.WARNING, logger=exam_store.__name__):
        prepare_data(cfg, tmp_path / "data", tmp_path, AccessLog())  # the build rewrites it
    warned = [r.getMessage() for r in caplog.records if bad.name in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith("rewriting it")
    again = {k: v.clone() for k, v in load_file(bad).items()}  # the same exam (the header may differ byte-wise)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert torch.equal(store.stacks(first), before)


def test_an_exam_file_of_the_wrong_tensors_is_rewritten(tmp_path, caplog):
    loads: list[str] = []
    build_exam_split(tmp_path, tiny_jobs({"a": [0.0], "b": [1.0]}), **TINY["kw"])  # no masks
    with caplog.at_level(logging.WARNING, logger=exam_store.__name__):
        kw = {**TINY["kw"], "keep_masks": True}
        assert build_exam_split(tmp_path, tiny_jobs({"a": [0.0], "b": [1.0]}, loads, masks=True), **kw) == 2
    assert loads == ["a", "b"] and sum("lacks the masks" in r.getMessage() for r in caplog.records) == 2
    assert ExamStore.open(tmp_path, digest="d").has_masks


def test_study_ids_sharing_a_file_name_are_refused_before_anything_is_written(tmp_path):
    loads: list[str] = []
    jobs = tiny_jobs({"1.2.3": [0.0], "study/4": [1.0], "study:4": [2.0]}, loads)
    assert exam_file_name("study/4") == exam_file_name("study:4")
    with pytest.raises(ValueError, match=r"'study/4' and study 'study:4'.*study_4\.safetensors"):
        build_exam_split(tmp_path / "split", jobs, **TINY["kw"])
    assert loads == [] and not (tmp_path / "split").exists()
    with pytest.raises(ValueError, match="'a' is listed twice"):
        build_exam_split(tmp_path / "split", tiny_jobs({"a": [0.0]}) * 2, **TINY["kw"])


def test_an_exam_of_another_size_or_tensors_is_named_by_the_index(tmp_path):
    jobs = tiny_jobs({"a": [0.0], "b": [1.0, 2.0]}) + tiny_jobs({"odd": [3.0]}, hw=(3, 3))
    with pytest.raises(CorruptExamFile, match=r"odd\.safetensors: slices 3x3.*first exam a\.safetensors \(slices 2x2"):
        build_exam_split(tmp_path, jobs, **TINY["kw"])
    assert not (tmp_path / "index.json").exists()
    write_exam_file(tmp_path / exam_file_name("odd"), tiny_exam("odd", [3.0], masks=True), digest="d",
                    keep_masks=True)  # fmt: skip
    with pytest.raises(CorruptExamFile, match=r"odd\.safetensors: slices 2x2, masks True"):
        write_exam_index(tmp_path, split="train", study_ids=["a", "b", "odd"], digest="d")


# ------------------------------------------------------------------------------------------------ laziness


def test_the_store_reads_lazily_with_at_most_open_exams_files_open(monkeypatch, both):
    _, sets = both
    val = sets["exams"][1].val.get("figure", "t")
    store = ExamStore(val.directory, json.loads((val.directory / "index.json").read_text()), open_exams=2)
    opened: list[str] = []
    live = [0, 0]  # now, most
    real = exam_store.safe_open

    class Counting:
        def __init__(self, path: str, framework: str) -> None:
            self.f = real(path, framework=framework)
            opened.append(Path(path).name)
            live[0] += 1
            live[1] = max(live[1], live[0])

        def __getattr__(self, name: str):
            return getattr(self.f, name)

        def __del__(self) -> None:
            live[0] -= 1

    monkeypatch.setattr(exam_store, "safe_open", Counting)
    a, b = int(store.offsets[1]), int(store.offsets[2])
    store.stacks(slice(a, b))  # one exam's slices: only its file is opened
    assert opened == [store.files[1].name]
    store.stacks(torch.arange(store.num_slices).flip(0))  # every exam, through an LRU of 2
    assert store.num_exams > 2 and sorted(opened) == sorted(p.name for p in store.files)  # each opened once
    assert live[1] <= 2 and len(store._open) == 2
    store.stacks([0])  # exam 0 was closed (least recently used): opened again
    assert opened[-1] == store.files[0].name and live[1] <= 2


def test_exam_batches_read_only_the_exams_asked_for(monkeypatch, both, tmp_path):
    _, sets = both
    cfg, data = sets["exams"]
    spec = importlib.util.spec_from_file_location("exam_store_check", Path(__file__).with_name("exam_store_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    check.write_fake_features(tmp_path, data.train, "train")
    fs = open_feature_split(tmp_path)
    read: list[str] = []
    real = pe_data.read_exam_features
    monkeypatch.setattr(pe_data, "read_exam_features", lambda p: read.append(p.name) or real(p))
    batches = recipe.collate(fs, cfg)
    assert read == [] and len(batches) == len(fs) == data.train.num_exams and batches.in_dim == 3 * fs.feature_dim
    assert np.array_equal(fs.slice_labels, data.train.slice_labels)  # labels without reading the features
    got = recipe.take(batches, torch.tensor([2, 0]))
    assert read == [fs.files[2].name, fs.files[0].name]
    s2 = cfg.stage2
    whole = collate_exams(fs.exams(), length=s2.seq_len, label_mode=s2.label_mode, long_mode=s2.long_mode)
    for key in ("x", "valid", "slice_labels", "exam_labels", "num_slices", "positive_ratio"):
        assert torch.equal(getattr(got, key), getattr(whole, key)[[2, 0]]), key


# ------------------------------------------------------------------------------------------------ torchrun


@pytest.mark.dist
def test_two_ranks_preprocess_their_shares_into_one_processs_files(tmp_path, both):
    """``torchrun --nproc_per_node=2``: each rank writes the exams dealt to it; the files and indexes equal one
    process's; stage 2 on per-exam feature files reads each training exam once per epoch, on one rank."""
    root, sets = both
    out, data = tmp_path / "ddp", tmp_path / "ddp" / "data"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(Path(__file__).with_name("exam_store_check.py")), str(out), str(data)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    teardown_abort = "terminate called without an active exception" in proc.stderr
    assert proc.stdout.count("STORE-OK") == 2 and (proc.returncode == 0 or teardown_abort), proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    one = splits_of(sets["exams"][1])
    (ddp_root,) = data.glob("pe_cad-*")
    for split, store in one.items():
        ids = store.study_ids.tolist()
        assert [r["written"][split] for r in ranks] == [ids[0::2], ids[1::2]]  # dealt round-robin
        ddp_dir = exam_store_dir(ddp_root, split)
        assert json.loads((ddp_dir / "index.json").read_text()) == json.loads(
            (store.directory / "index.json").read_text())  # fmt: skip
        assert sorted(p.name for p in ddp_dir.glob("*.safetensors")) == sorted(p.name for p in store.files)
        for path in store.files:
            a, b = load_file(path), load_file(ddp_dir / path.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            with safe_open(str(path), "pt") as fa, safe_open(str(ddp_dir / path.name), "pt") as fb:
                assert fa.metadata() == fb.metadata()
    epochs = 2
    train = Counter(r.split("/")[1] for rank in ranks for r in rank["reads"] if r.startswith("train/"))
    assert train == {exam_file_name(s): epochs for s in one["train"].study_ids}  # each exam once per epoch
    for rank in ranks:  # ... by one rank: each read half of them
        assert sum(r.startswith("train/") for r in rank["reads"]) == epochs * one["train"].num_exams // 2
    val = Counter(r.split("/")[1] for rank in ranks for r in rank["reads"] if r.startswith("val/"))
    assert val == {exam_file_name(s): epochs for s in one["val"].study_ids}  # evaluation sharded, not repeated
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"]


# --------------------------------------------------------------------------------------------- config keys


@pytest.mark.parametrize(("override", "match"), [("data.store=disk", "data.store"),
                                                  ("data.open_exams=0", "data.open_exams")])  # fmt: skip
def test_bad_store_keys_are_clear_errors(tmp_path, override, match):
    with pytest.raises((ValueError, ConfigError), match=match):
        smoke(tmp_path, tmp_path, override)


def test_full_preset_streams_exams_and_syncs_batchnorm():
    _, full = load_config("pe_cad", "full")
    _, quick = load_config("pe_cad", "quick")
    assert (full.data.store, full.stage1.sync_bn) == ("exams", True)
    assert (quick.data.store, quick.stage1.sync_bn) == ("memory", False)


def test_sync_bn_converts_on_cuda_ranks_only_and_refuses_cpu_ranks(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    keys = set(model.state_dict())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert recipe.with_sync_bn(model, enabled=False, world_size=2, device=cuda) is model
    assert recipe.with_sync_bn(model, enabled=True, world_size=1, device=cpu) is model  # one process: nothing to sync
    synced = recipe.with_sync_bn(model, enabled=True, world_size=2, device=cuda)
    assert isinstance(synced[1], nn.SyncBatchNorm) and set(synced.state_dict()) == keys
    with pytest.raises(ConfigError, match=r"stage1\.sync_bn"):
        recipe.with_sync_bn(model, enabled=True, world_size=2, device=cpu)
    cfg = smoke(tmp_path, tmp_path, "stage1.sync_bn=true")
    recipe.check_sync_bn(cfg, DistInfo(world_size=1))
    with pytest.raises(ConfigError, match=r"stage1\.sync_bn"):
        recipe.check_sync_bn(cfg, DistInfo(rank=0, world_size=2))


def test_only_the_main_rank_writes_the_split_manifest_with_either_store(monkeypatch, both):
    root, sets = both
    asked: list[bool] = []
    real = pe_data._source

    def source(cfg, run_dir, *, write_manifest):
        asked.append(write_manifest)
        return real(cfg, run_dir, write_manifest=write_manifest)

    monkeypatch.setattr(pe_data, "_source", source)
    for store in ("memory", "exams"):
        cfg = sets[store][0]
        for info in (None, DistInfo(rank=0, world_size=1), DistInfo(rank=1, world_size=2)):
            if store == "exams" and info is not None and info.world_size > 1:
                continue  # the exams store deals its exams to ranks: no second process here
            prepare_data(cfg, root / "data", root, AccessLog(), info=info)
    assert asked == [True, True, False, True, True]
