"""The PE CAD recipe end to end at the smoke budget: results with claims, tables and figures; unit files; selection
on validation only, read from the access log; exact repeats of retrained units and reuse of finished ones; the
stages one at a time; clear config errors. And its data: windowed, lung-cropped 3-slice stacks, splits disjoint by
study, the trivial baseline, and the real RSNA path on DICOM files the test writes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from thrifty.cli import EXIT_USAGE, main
from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.core.splits import AccessLog
from thrifty.data import ctpa_synth
from thrifty.methods.pe_cad import train as recipe
from thrifty.methods.pe_cad.config import PECadConfig
from thrifty.methods.pe_cad.data import ExamSet, exam_set, load_feature_split, prepare_data, preprocess_exam
from thrifty.methods.pe_cad.stage1 import build_backbone, stack_all
from thrifty.methods.pe_cad.train import (
    choose_features_arm,
    choose_trivial_setting,
    load_pretrained,
    train,
    trivial_scores,
)

ARMS = ["cnn-random", "cnn-supervised", "cnn-ssl:simclr", "vit-random"]
KINDS = ["cc", "mil_attention", "mil_max"]
RUN_ARGS = (f"stage1.arms=[{','.join(ARMS)}]", "seeds=[0,1]")
CLAIMS = {
    "pretrained_beats_scratch_cnn_supervised",
    "pretrained_beats_scratch_cnn_ssl_simclr",
    "ssl_not_worse_than_supervised_cnn_ssl_simclr",
    "cnn_beats_vit_random_init",
    "cc_not_worse_than_mil_attention",
    "cc_not_worse_than_mil_max",
    "image_detection_works",
    "exam_detection_works",
}


def smoke(out: Path, data_dir: Path, *overrides: str) -> PECadConfig:
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", *overrides]
    return load_config("pe_cad", "smoke", args)[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def unit(run_dir: Path, stage: str, name: str, seed: int) -> Path:
    return run_dir / "units" / stage / name.replace(":", "_") / f"seed{seed}"


def result(run_dir: Path, stage: str, name: str, seed: int) -> dict:
    return json.loads((unit(run_dir, stage, name, seed) / "result.json").read_text())


def copy_run(run_dir: Path, dest: Path) -> Path:
    target = dest / "pe_cad" / "smoke"
    shutil.copytree(run_dir, target)
    return target


def mtimes(folder: Path) -> dict[Path, int]:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Pretraining, a stage-1 step or a stage-2 loss fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a finished unit (or a cached pretraining) was trained again")

    for name in ("initialise", "ShardedBatchSampler", "rsna_weighted_bce"):
        monkeypatch.setattr(recipe, name, refuse)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    """The quick preset's arms (CNN scratch / supervised / SimCLR, ViT scratch) and every stage-2 kind, 2 seeds."""
    out = tmp_path_factory.mktemp("runs")
    results = train(smoke(out, data_dir, *RUN_ARGS))
    return out / "pe_cad" / "smoke", results


# ---------------------------------------------------------------------------------------------- results


def test_smoke_run_writes_results_claims_tables_and_figures(smoke_run):
    run_dir, results = smoke_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["claims"] == results["claims"]
    assert on_disk["recipe"] == "pe_cad" and on_disk["paper"]["arxiv"] == "2109.07029"
    assert {c["id"] for c in results["claims"]} == CLAIMS
    for c in results["claims"]:
        assert c["seeds"] == [0, 1] and c["preset"] == "smoke" and c["unit"] == "AUC points"
        assert c["holds"] == (c["ci95"][0] is not None and c["ci95"][0] > c["threshold"])
    titles = [t["title"] for t in results["tables"]]
    assert titles[0].startswith("Stage 1: image AUC") and titles[1].startswith("Stage 2: test exam AUC")
    assert titles[2].startswith("Cost")
    s1 = results["tables"][0]
    assert [r[0] for r in s1["rows"]] == [*ARMS, "defect fraction per slice"]
    s2 = results["tables"][1]
    assert [r[0] for r in s2["rows"]] == [*KINDS, "defect fraction per slice"]
    assert len(s2["columns"]) == 13 and all(len(r) == 13 for r in s2["rows"])
    assert [r[-1] for r in s2["rows"][1:3]] == ["n/a", "n/a"]  # MIL's image AUC: not applicable
    assert set(results["figures"]) == {f"figures/{n}.png" for n in ("arms", "roc", "slices")}
    for fig in results["figures"]:
        assert (run_dir / fig).stat().st_size > 2000, fig
    assert results["cost"]["wall_time_s"] > 0 and results["cost"]["peak_rss_mb"] > 0
    info = results["data"]
    assert (info["train"]["exams"], info["val"]["exams"], info["test"]["exams"]) == (4, 3, 3)
    assert set(results["pretraining"]) == {"cnn-supervised", "cnn-ssl:simclr"}
    for split in ("val", "test"):
        assert 0 <= results["trivial"][split]["image_auc"] <= 100
        assert len(results["trivial"][split]["exam_scores"]) == 3


def test_every_unit_saves_its_files_and_selects_on_validation(smoke_run):
    run_dir, results = smoke_run
    for arm in ARMS:
        for seed in (0, 1):
            d = unit(run_dir, "stage1", arm, seed)
            assert (d / "model.safetensors").stat().st_size > 1000
            card = json.loads((d / "card.json").read_text())
            assert (card["arm"], card["seed"], card["image_size"]) == (arm, seed, 32)
            r = result(run_dir, "stage1", arm, seed)
            assert (r["arm"], r["seed"], r["steps"]) == (arm, seed, 2)
            assert [p["step"] for p in r["curve"]] == [1, 2]  # eval_every 1
            scores = [p["val_image_auc"] for p in r["curve"]]
            assert r["best_step"] == r["curve"][int(np.argmax(scores))]["step"]
            assert r["val_image_auc"] == max(scores) and r["test_image_auc"] is not None
    for seed in (0, 1):
        chosen = results["selection"][str(seed)]
        val = {arm: result(run_dir, "stage1", arm, seed)["val_image_auc"] for arm in ARMS}
        assert val[chosen] == max(val.values())  # the best validation image AUC feeds stage 2
        fdir = unit(run_dir, "stage1", chosen, seed) / "features"
        assert {p.name for p in fdir.iterdir() if p.is_dir()} == {"train", "val", "test"}
        for split in ("train", "val", "test"):  # one safetensors file per exam, and the split's index
            files = sorted(p.name for p in (fdir / split).glob("*.safetensors"))
            assert len(files) == results["data"][split]["exams"] and (fdir / split / "index.json").is_file()
        val = load_feature_split(fdir / "val")
        assert val.features.shape == (results["data"]["val"]["slices"], 16)  # small_cnn feature_dim 16
        others = [a for a in ARMS if a != chosen]
        assert not any((unit(run_dir, "stage1", a, seed) / "features").exists() for a in others)
        for kind in KINDS:
            r = result(run_dir, "stage2", kind, seed)
            assert r["features_arm"] == chosen and r["epochs"] == 2
            scores = [p["val_mean_exam_auc"] for p in r["curve"]]
            assert r["best_epoch"] == r["curve"][int(np.argmax(scores))]["epoch"]
            assert np.asarray(r["test"]["exam_probs"]).shape == (3, 9)
            mil = kind.startswith("mil")
            assert r["image_weight"] == (0.0 if mil else 0.0736)
            assert (r["test"]["image_auc"] is None) == mil and r["image_auc_applicable"] == (not mil)
            assert (unit(run_dir, "stage2", kind, seed) / "model.safetensors").exists()


def test_no_test_read_reaches_selection(smoke_run):
    """Test reads are final tests, feature extraction or figures; each training unit reads the test split once,
    after all of its validation reads; the features are extracted after every stage-1 unit finished."""
    run_dir, results = smoke_run
    entries = read_jsonl(run_dir / "access_log.jsonl")
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert {e["purpose"] for e in entries if e["split"] == "test"} <= {"final_test", "features", "figure"}
    assert {e["purpose"] for e in entries if e["split"] == "val"} <= {"selection", "calibration", "features", "figure"}
    units = {f"stage1/{a}/seed{s}" for a in ARMS for s in (0, 1)}
    units |= {f"stage2/{k}/seed{s}" for k in KINDS for s in (0, 1)}
    for u in units:
        mine = [e for e in entries if e["unit"] == u]
        vals = [e["index"] for e in mine if e["split"] == "val"]
        tests = [e["index"] for e in mine if e["split"] == "test"]
        assert vals and len(tests) == 1, u
        assert max(vals) < tests[0], f"{u} read validation after test"
        assert {e["purpose"] for e in mine} == {"selection", "final_test"}
    feature_reads = [e for e in entries if e["purpose"] == "features"]
    assert {e["unit"] for e in feature_reads} == {f"features/{results['selection'][str(s)]}/seed{s}" for s in (0, 1)}
    last_stage1 = max(e["index"] for e in entries if e["unit"].startswith("stage1/"))
    assert min(e["index"] for e in feature_reads) > last_stage1
    assert all(e["unit"] == "figures" for e in entries if e["purpose"] == "figure")


# ----------------------------------------------------------------------------------------- reruns


def test_rerun_retrains_missing_units_exactly(smoke_run, tmp_path, data_dir):
    """Delete seed 1's chosen stage-1 unit (with its features) and its CC unit: a rerun trains them again after the
    reused units, so from another global random state, and gets the same curves, metrics, features and weights."""
    run_dir, results = smoke_run
    copy = copy_run(run_dir, tmp_path)
    chosen = results["selection"]["1"]
    shutil.rmtree(unit(copy, "stage1", chosen, 1))
    shutil.rmtree(unit(copy, "stage2", "cc", 1))
    kept = unit(copy, "stage2", "mil_max", 1)
    before = mtimes(kept)
    again = train(smoke(tmp_path, data_dir, *RUN_ARGS))
    assert mtimes(kept) == before
    assert again["selection"] == results["selection"]
    for stage, name in (("stage1", chosen), ("stage2", "cc")):
        a, b = result(copy, stage, name, 1), result(run_dir, stage, name, 1)
        for key in ("curve", "val", "test", "val_image_auc", "test_image_auc", "best_step", "best_epoch", "params"):
            assert a.get(key) == b.get(key), (stage, key)
        wa, wb = (load_file(unit(d, stage, name, 1) / "model.safetensors") for d in (copy, run_dir))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    a, b = (load_feature_split(unit(d, "stage1", chosen, 1) / "features" / "test") for d in (copy, run_dir))
    assert torch.equal(a.features, b.features) and np.array_equal(a.probs, b.probs)
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]


def test_rerun_of_a_finished_run_trains_nothing(smoke_run, tmp_path, data_dir, no_training):
    run_dir, results = smoke_run
    copy = copy_run(run_dir, tmp_path)
    before = mtimes(copy / "units")
    again = train(smoke(tmp_path, data_dir, *RUN_ARGS))
    assert mtimes(copy / "units") == before
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]
    assert again["tables"][:2] == results["tables"][:2]
    assert again["pretraining"] == {}  # every unit that needed it was finished


def test_eval_stage_alone_rebuilds_claims_tables_and_figures(smoke_run, tmp_path, data_dir, no_training):
    run_dir, results = smoke_run
    copy = copy_run(run_dir, tmp_path)
    (copy / "results.json").unlink()
    shutil.rmtree(copy / "figures")
    again = train(smoke(tmp_path, data_dir, *RUN_ARGS, "stages=[eval]"))
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]
    assert again["tables"][:2] == results["tables"][:2]
    assert again["selection"] == results["selection"]
    assert set(again["figures"]) == set(results["figures"])
    new = read_jsonl(copy / "access_log.jsonl")[len(read_jsonl(run_dir / "access_log.jsonl")) :]
    assert {e["unit"] for e in new} == {"trivial", "figures"}


def test_stages_run_one_at_a_time(tmp_path, data_dir):
    """stage1, then features, then stage2, then eval: each stage writes only its own files; a stage whose inputs
    are missing says which stage to run first."""
    args = ("stage1.arms=[cnn-random,vit-random]", "seeds=[0]", "stage2.kinds=[cc,mil_max]")
    run_dir = tmp_path / "pe_cad" / "smoke"
    with pytest.raises(ConfigError, match="stage1"):
        train(smoke(tmp_path, data_dir, *args, "stages=[features]"))
    res = train(smoke(tmp_path, data_dir, *args, "stages=[stage1]"))
    assert res["claims"] == [] and "selection" not in res
    assert {p.parent.parent.name for p in (run_dir / "units").rglob("result.json")} == {"cnn-random", "vit-random"}
    assert not list((run_dir / "units").rglob("features"))
    with pytest.raises(ConfigError, match="features stage"):
        train(smoke(tmp_path, data_dir, *args, "stages=[stage2]"))
    train(smoke(tmp_path, data_dir, *args, "stages=[features]"))
    assert len(list((run_dir / "units").rglob("features/*/index.json"))) == 3
    assert not (run_dir / "units" / "stage2").exists()
    train(smoke(tmp_path, data_dir, *args, "stages=[stage2]"))
    assert {p.parent.parent.name for p in (run_dir / "units" / "stage2").rglob("result.json")} == {"cc", "mil_max"}
    res = train(smoke(tmp_path, data_dir, *args, "stages=[eval]"))
    assert {c["id"] for c in res["claims"]} == {"cnn_beats_vit_random_init", "cc_not_worse_than_mil_max",
                                                "image_detection_works", "exam_detection_works"}  # fmt: skip


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("stages=[fit]", "'stages'"),
        ("stage1.arms=[cnn-imagenet]", "'stage1.arms'"),
        ("stage1.arms=[resnet-random]", "'stage1.arms'"),
        ("stage1.arms=[]", "'stage1.arms'"),
        ("stage2.kinds=[cc,gru]", "'stage2.kinds'"),
        ("stage2.features=vit-supervised", "'stage2.features'"),
        ("stage2.attention=dot", "'stage2.attention'"),
        ("stage1.image_size=40", "'stage1.image_size'"),
        ("stage1.steps=0", "'stage1.steps'"),
        ("stage1.vit=vit_l16", "'stage1.vit'"),
        ("stage1.cnn=vgg19", "'stage1.cnn'"),
        ("pretrain.simclr.batch_size=1", "'pretrain.simclr.batch_size'"),
        ("stage2.gamma=1.5", "'stage2.gamma'"),
        ("stage2.exam_weights=[1,2]", "'stage2.exam_weights'"),
        ("data.source=kaggle", "'data.source'"),
        ("data.source=rsna", "'data.real.root'"),
        ("data.synthetic.val_exams=0", "'data.synthetic.val_exams'"),
        ("data.synthetic.spec.noise=3", "data.synthetic.spec"),
        ("data.synthetic.spec={slices: [5, 9]}", "data.synthetic.spec"),
        ("stage1.step=3", "stage1.steps"),
    ],
)
def test_bad_config_is_a_clear_error_naming_the_key(override, match, tmp_path, capsys):
    assert main(["run", "pe_cad", "--preset", "smoke", f"out_dir={tmp_path}", override]) == EXIT_USAGE
    assert match in capsys.readouterr().err
    assert not (tmp_path / "pe_cad").exists()


def test_presets_load_and_full_names_the_release_settings():
    _, quick = load_config("pe_cad", "quick")
    assert quick.stage1.arms == ARMS and quick.stage2.kinds == KINDS and len(quick.seeds) == 3
    assert (quick.data.synthetic.train_exams, quick.data.synthetic.val_exams, quick.data.synthetic.test_exams) == (
        120, 40, 80)  # fmt: skip
    _, full = load_config("pe_cad", "full")
    assert (full.stage1.image_size, full.stage2.seq_len, full.stage2.hidden) == (576, 192, 512)
    assert (full.stage2.epochs, full.stage2.batch_size, full.stage1.lr, full.stage2.lr) == (25, 64, 4e-4, 5e-4)
    assert full.data.source == "rsna" and full.stage1.cnn == "sexception"


# --------------------------------------------------------------------------------------------------- data


def test_synthetic_splits_are_disjoint_by_study_and_preprocessed(tmp_path, data_dir):
    cfg = smoke(tmp_path, data_dir)
    data = prepare_data(cfg, data_dir, tmp_path, AccessLog())
    sets = {"train": data.train, "val": data.val.get("selection", "t"), "test": data.test.get("final_test", "t")}
    ids = [set(s.study_ids.tolist()) for s in sets.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for s in sets.values():
        assert s.slices.dtype == torch.float16 and s.slices.shape[1:] == (32, 32)
        assert float(s.slices.min()) >= 0 and float(s.slices.max()) <= 1
        assert s.exam_labels.shape == (s.num_exams, 9) and len(s.slice_labels) == s.num_slices
    assert sets["val"].masks is not None and sets["train"].masks is None
    # the val masks mark exactly the positive slices
    val = sets["val"]
    assert np.array_equal(val.masks.reshape(val.num_slices, -1).any(1), val.slice_labels.astype(bool))
    # exam 0 of the val split is the generator's exam (seed 102, index 0), preprocessed
    spec = ctpa_synth.CTPASpec.from_overrides(cfg.data.synthetic.spec)
    ex = ctpa_synth.generate_exam(cfg.data.synthetic.seed * 100 + 2, index=0, spec=spec)
    pre = preprocess_exam(ex.volume, size=32, level=100, width=700, lung_crop=True)
    n = ex.n_slices
    assert val.study_ids[0] == ex.study_id and val.offsets[1] == n
    assert np.array_equal(val.slices[:n].numpy(), pre["slices"])
    assert np.array_equal(val.slice_labels[:n], ex.slice_labels)
    np.testing.assert_allclose(val.trivial[:n], ctpa_synth.defect_fraction_grid(ex.volume))
    np.testing.assert_allclose(val.trivial[:n, 0], ctpa_synth.defect_fraction(ex.volume))  # column 0: the default
    # 3-slice stacks: the centre channel is the slice, neighbours stay inside the exam (edges replicated)
    stacks = val.stacks(range(val.num_slices))
    torch.testing.assert_close(stacks[:n], stack_all(val.slices[:n].float()))
    e1 = slice(int(val.offsets[1]), int(val.offsets[2]))
    torch.testing.assert_close(stacks[e1], stack_all(val.slices[e1].float()))


def test_preprocess_windows_and_crops():
    vol = np.full((3, 40, 40), 100, dtype=np.int16)  # 100 HU -> 0.5
    pre = preprocess_exam(vol, size=16, level=100, width=700, lung_crop=False)
    assert pre["slices"].shape == (3, 16, 16) and np.all(pre["slices"] == np.float16(0.5))
    vol = np.full((2, 40, 40), -1000, dtype=np.int16)
    vol[:, 4:36, 4:36] = 40  # a body
    vol[:, 10:20, 12:30] = -850  # a lung: the crop keeps it plus a 2-pixel margin
    vol[:, 0, 0] = 1000  # clipped to 1
    pre = preprocess_exam(vol, size=16, level=100, width=700, lung_crop=True)
    assert tuple(pre["bbox"]) == (10, 8, 32, 22)
    assert pre["slices"].min() == 0 and abs(float(pre["slices"].max()) - 290 / 700) < 1e-3


def _exam_set(slices: list[list[int]], scores: list[list[float]], negative: list[int]) -> ExamSet:
    labels = np.concatenate([np.asarray(s, np.uint8) for s in slices])
    n = len(labels)
    exam_labels = np.zeros((len(slices), 9), np.uint8)
    exam_labels[:, 0] = negative
    return exam_set({"slices": np.zeros((n, 4, 4), np.float16),
                     "offsets": np.cumsum([0, *[len(s) for s in slices]]), "slice_labels": labels,
                     "exam_labels": exam_labels, "study_ids": np.asarray([f"s{i}" for i in range(len(slices))]),
                     "trivial": np.concatenate([np.asarray(s, float) for s in scores])})  # fmt: skip


def test_trivial_baseline_scores_slices_and_exam_maxima():
    es = _exam_set([[0, 1, 0], [0, 0], [1, 1]], [[0.1, 0.5, 0.2], [0.3, 0.0], [0.4, 0.05]], negative=[0, 1, 0])
    t = trivial_scores(es)
    # positives 0.5, 0.4, 0.05 against negatives 0.1, 0.2, 0.3, 0.0: 2 x 4 wins, 0.05 beats only 0.0
    assert t["image_auc"] == pytest.approx(100 * (8 + 1) / 12)
    assert t["exam_scores"] == [0.5, 0.3, 0.4]
    assert t["exam_any_pe_auc"] == pytest.approx(100.0) and t["exam_negative_auc"] == pytest.approx(100.0)
    assert trivial_scores(_exam_set([[0, 0]], [[0.1, 0.2]], [1]))["image_auc"] is None  # one class: undefined


def test_choose_features_arm_uses_validation_only():
    cfg = PECadConfig()
    cfg.stage1.arms = ["cnn-random", "cnn-supervised", "vit-random"]
    s1 = {"cnn-random": {0: {"val_image_auc": 70.0, "test_image_auc": 99.0}},
          "cnn-supervised": {0: {"val_image_auc": 80.0, "test_image_auc": 50.0}},
          "vit-random": {0: {"val_image_auc": None}}}  # fmt: skip
    assert choose_features_arm(cfg, s1, 0) == "cnn-supervised"
    s1["cnn-random"][0]["val_image_auc"] = 80.0  # a tie: the first arm listed
    assert choose_features_arm(cfg, s1, 0) == "cnn-random"
    cfg.stage2.features = "vit-random"
    assert choose_features_arm(cfg, s1, 0) == "vit-random"
    cfg.stage2.features = "best"
    with pytest.raises(ConfigError, match="stage1"):
        choose_features_arm(cfg, s1, 1)


@pytest.mark.parametrize("name", ["small_cnn", "small_vit"])
def test_load_pretrained_keeps_the_fresh_head(name):
    kwargs = {"image_size": 32, **({"hidden_size": 16, "num_heads": 2, "mlp_dim": 32} if name == "small_vit" else {})}
    pretrained = build_backbone(name, seed=1, **kwargs).state_dict()
    model = build_backbone(name, seed=2, **kwargs)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(recipe.HEAD_PREFIXES)}
    assert head
    load_pretrained(model, pretrained)
    for k, v in model.state_dict().items():
        assert torch.equal(v, head[k] if k in head else pretrained[k]), k


# ----------------------------------------------------------------------------------------- real RSNA path


def _write_dicom_exam(folder: Path, ex: ctpa_synth.Exam) -> list[str]:
    """One synthetic exam as a CT series under ``folder/<study>/<series>/<sop>.dcm`` (the RSNA-STR layout);
    returns the SOP instance UIDs in ascending z."""
    from thrifty.data.rsna_pe import write_ct_series

    series = ex.study_uid + ".1"
    write_ct_series(ex.volume, folder, positions=ex.positions, spacing=ex.spacing, study_uid=ex.study_uid,
                    series_uid=series, name=lambda k, sop: f"{ex.study_uid}/{series}/{sop}.dcm")  # fmt: skip
    return [f"{series}.{k + 1}" for k in range(ex.n_slices)]


def test_real_rsna_path_end_to_end_on_written_dicoms(tmp_path):
    """Six synthetic exams written as an RSNA-STR tree and train.csv; with a study manifest the recipe reads them
    (z-sorted, in HU), preprocesses them exactly like the synthetic path, and runs every stage."""
    pytest.importorskip("pydicom")
    spec = ctpa_synth.CTPASpec(size=32, slices=(12, 14), indeterminate_rate=0.0)
    drawn = ctpa_synth.generate(8, seed=1, spec=spec)
    exams = [e for e in drawn if e.slice_labels.any()][:3] + [e for e in drawn if not e.slice_labels.any()][:3]
    assert len(exams) == 6
    root = tmp_path / "train"
    rows = []
    for ex in exams:
        sops = _write_dicom_exam(root, ex)
        for k in np.random.default_rng(0).permutation(ex.n_slices):  # CSV rows out of z order
            rows.append({"StudyInstanceUID": ex.study_uid, "SeriesInstanceUID": ex.study_uid + ".1",
                         "SOPInstanceUID": sops[k], "pe_present_on_image": int(ex.slice_labels[k]),
                         **ex.labels})  # fmt: skip
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by_study = {ex.study_uid: ex for ex in exams}
    pos = [ex.study_uid for ex in exams if ex.slice_labels.any()]
    neg = [ex.study_uid for ex in exams if not ex.slice_labels.any()]
    manifest = {"train": [pos[0], neg[0]], "val": [pos[1], neg[1]], "test": [pos[2], neg[2]]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    real = ["data.source=rsna", f"data.real.root={root}", f"data.real.labels_csv={tmp_path / 'train.csv'}",
            f"data.real.manifest={tmp_path / 'manifest.json'}"]  # fmt: skip
    args = [*real, "stage1.arms=[cnn-random]", "seeds=[0]", "stage2.kinds=[cc]"]
    cfg = load_config("pe_cad", "smoke", [f"out_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'cache'}",
                                          "progress=false", *args])[1]  # fmt: skip
    res = train(cfg)
    run_dir = tmp_path / "runs" / "pe_cad" / "smoke"
    assert json.loads((run_dir / "split_manifest.json").read_text()) == manifest
    assert res["data"]["source"] == "rsna" and res["data"]["test"]["exams"] == 2
    data = prepare_data(cfg, tmp_path / "cache", run_dir, AccessLog())
    for split, es in (("train", data.train), ("test", data.test.get("final_test", "t"))):
        assert sorted(es.study_ids.tolist()) == sorted(manifest[split])
        for e, study in enumerate(es.study_ids):
            ex = by_study[study]
            a, b = int(es.offsets[e]), int(es.offsets[e + 1])
            pre = preprocess_exam(ex.volume, size=32, level=100, width=700, lung_crop=True)
            assert np.array_equal(es.slices[a:b].numpy(), pre["slices"])  # z-sorted, exact HU
            assert np.array_equal(es.slice_labels[a:b], ex.slice_labels)
            assert np.array_equal(es.exam_labels[e], ex.exam_labels)
    assert {c["id"] for c in res["claims"]} == {"image_detection_works", "exam_detection_works"}
    # a manifest naming a study the CSV does not have is refused, naming the manifest
    (tmp_path / "bad.json").write_text(json.dumps({**manifest, "test": ["2.25.999"]}))
    bad = load_config("pe_cad", "smoke", [f"out_dir={tmp_path / 'runs2'}", f"data_dir={tmp_path / 'cache'}",
                                          *real[:3], f"data.real.manifest={tmp_path / 'bad.json'}"])[1]  # fmt: skip
    with pytest.raises(ValueError, match=r"bad\.json.*not in the label CSV"):
        prepare_data(bad, tmp_path / "cache", tmp_path, AccessLog())


def test_trivial_setting_is_chosen_on_validation_and_scores_that_column():
    # two settings: column 0 ranks the positive slice last, column 1 first
    es = _exam_set([[1, 0, 0], [0, 0]], [[0.0, 0.1, 0.2], [0.3, 0.4]], negative=[0, 1])
    es.trivial = np.stack([es.trivial[:, 0], np.array([0.9, 0.1, 0.2, 0.3, 0.0])], axis=1)
    assert choose_trivial_setting(es) == 1
    assert trivial_scores(es, 1)["image_auc"] == pytest.approx(100.0)
    assert trivial_scores(es, 0)["image_auc"] == pytest.approx(0.0)
    assert trivial_scores(es, 1)["exam_scores"] == [0.9, 0.3]
    # ties keep the first setting; one slice class (AUC undefined) keeps the default
    es.trivial = np.repeat(es.trivial[:, 1:], 3, axis=1)
    assert choose_trivial_setting(es) == 0
    assert choose_trivial_setting(_exam_set([[0, 0]], [[0.1, 0.2]], [1])) == 0
