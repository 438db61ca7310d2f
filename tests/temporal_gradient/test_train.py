"""The temporal-gradient recipe end to end at the smoke budget, through the CLI: every arm and the label-fraction
sweep, the claims they allow, the test split read only for the final test, RGB-only exported weights that
reproduce the unit's test accuracy, determinism, reuse of finished units, clear config errors; and the pieces:
the learning-rate schedule, each arm's loss (pseudo-labels off during warm-up, ablated terms absent, gradients
everywhere), and the single-frame control's ability to learn when appearance does carry the class."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from thrifty.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from thrifty.core.registry import load_config
from thrifty.core.splits import AccessLog
from thrifty.methods.temporal_gradient import train as recipe
from thrifty.methods.temporal_gradient.config import ARMS, TemporalGradientConfig
from thrifty.methods.temporal_gradient.data import draw_step, prepare_data
from thrifty.methods.temporal_gradient.model import TwoStreamNet
from thrifty.methods.temporal_gradient.train import ARM_SPECS, ArmSpec, build_model, compute_loss, lr_at, predict
from thrifty.methods.temporal_gradient.trivial import frame_accuracy, train_frame_classifier, worst_frame_accuracy

RUN_ARGS = [
    f"arms=[{','.join(ARMS)}]",
    "seeds=[0]",
    "sweep.labelled_fractions=[0.25,0.5]",
    "sweep.arms=[supervised,tg_full]",
]
CLAIM_IDS = {
    "tg_beats_fixmatch_03",
    "fixmatch_095_beats_supervised",
    "fixmatch_03_not_below_095",
    "tg_full_beats_tg_no_align",
    "tg_full_beats_tg_no_contrast",
    "tg_full_beats_tg_rgb_pseudo",
    "gap_shrinks_with_labels",
    "single_frame_near_chance",
    "tg_works",
}
RGB_PREFIXES = ("rgb_backbone.", "rgb_head.")


def cli(out: Path, data_dir: Path, *overrides: str) -> int:
    args = ["run", "temporal_gradient", "--preset", "smoke", f"out_dir={out}", f"data_dir={data_dir}", "progress=false"]
    return main([*args, *overrides])


def smoke_cfg(data_dir: Path, *overrides: str) -> TemporalGradientConfig:
    return load_config("temporal_gradient", "smoke", [f"data_dir={data_dir}", "progress=false", *overrides])[1]


def unit_dir(run_dir: Path, arm: str, fraction: float | None = None) -> Path:
    base = run_dir / "units" if fraction is None else run_dir / "units" / "sweep" / f"p{fraction:g}"
    return base / arm / "seed0"


def unit_result(run_dir: Path, arm: str, fraction: float | None = None) -> dict:
    return json.loads((unit_dir(run_dir, arm, fraction) / "result.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    """Every arm with seed 0 plus the 25% / 50% sweep of supervised and TG-full, through ``thrifty run``."""
    out = tmp_path_factory.mktemp("tg-runs")
    rc = cli(out, data_dir, *RUN_ARGS)
    run_dir = out / "temporal_gradient" / "smoke"
    return rc, run_dir, json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def no_training(monkeypatch):
    """Building a network (the first thing a unit does when it trains) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a finished unit was trained again")

    monkeypatch.setattr(recipe, "build_model", refuse)


# ---------------------------------------------------------------------------------------------- end to end


def test_every_arm_and_the_sweep_run_and_make_their_claims(smoke_run):
    rc, run_dir, results = smoke_run
    assert rc == EXIT_OK
    assert results["recipe"] == "temporal_gradient" and results["paper"]["arxiv"] == "2111.13241"
    assert {c["id"] for c in results["claims"]} == CLAIM_IDS
    assert all(c["seeds"] == [0] and c["preset"] == "smoke" for c in results["claims"])
    claims = {c["id"]: c for c in results["claims"]}

    def top1(arm: str, fraction: float | None = None) -> float:
        return unit_result(run_dir, arm, fraction)["test"]["top1"]

    # each paired claim is the difference of the units' test top-1
    for cid, a, b in (
        ("tg_beats_fixmatch_03", "tg_full", "fixmatch_03"),
        ("fixmatch_095_beats_supervised", "fixmatch_095", "supervised"),
        ("fixmatch_03_not_below_095", "fixmatch_03", "fixmatch_095"),
        ("tg_full_beats_tg_no_align", "tg_full", "tg_no_align"),
        ("tg_full_beats_tg_no_contrast", "tg_full", "tg_no_contrast"),
        ("tg_full_beats_tg_rgb_pseudo", "tg_full", "tg_rgb_pseudo"),
    ):
        assert claims[cid]["values"] == [pytest.approx(top1(a) - top1(b))], cid
    gap_lo = top1("tg_full") - top1("supervised")  # 25% = data.labelled_fraction: the main units
    gap_hi = top1("tg_full", 0.5) - top1("supervised", 0.5)
    assert claims["gap_shrinks_with_labels"]["values"] == [pytest.approx(gap_lo - gap_hi)]
    frame = results["trivial"]["test"]["0"]
    assert claims["single_frame_near_chance"]["values"] == [pytest.approx(frame)]
    assert claims["single_frame_near_chance"]["threshold"] == pytest.approx(15.0)  # chance (10%) + 5 points
    assert claims["tg_works"]["values"] == [pytest.approx(top1("tg_full") - frame)]

    acc, sweep, cost = results["tables"]
    assert [r[0] for r in acc["rows"]] == [*ARMS, results["trivial"]["arm"]]
    assert [r[0] for r in sweep["rows"]] == ["25%", "50%"]
    assert [r[0] for r in cost["rows"]] == list(ARMS)
    info = results["data"]
    assert (info["train_videos"], info["val_videos"], info["test_videos"], info["labelled_videos"]) == (40, 20, 20, 10)


def test_every_unit_saves_rgb_only_weights_a_card_and_a_result(smoke_run):
    _, run_dir, _ = smoke_run
    units = [(arm, None) for arm in ARMS] + [("supervised", 0.5), ("tg_full", 0.5)]
    for arm, fraction in units:
        d = unit_dir(run_dir, arm, fraction)
        for name in ("model.safetensors", "card.json", "result.json"):
            assert (d / name).is_file(), (arm, fraction, name)
        card = json.loads((d / "card.json").read_text())
        assert (card["recipe"], card["arm"], card["seed"]) == ("temporal_gradient", arm, 0)
        res = unit_result(run_dir, arm, fraction)
        assert res["labelled_fraction"] == (fraction or 0.25) and res["steps"] == 2
        assert res["labelled_videos"] == (20 if fraction == 0.5 else 10)
        assert [p["step"] for p in res["curve"]] == [1, 2]
        assert res["val"]["top1"] == max(p["val_top1"] for p in res["curve"])
        weights = load_file(str(d / "model.safetensors"))
        assert weights and all(k.startswith(RGB_PREFIXES) for k in weights), arm
        assert any(k.startswith("rgb_head.") for k in weights)
        n_params = sum(v.numel() for k, v in weights.items() if "running" not in k and "num_batches" not in k)
        assert n_params == res["inference_params"]
    # a two-stream arm trains twice the RGB network's parameters (and more); an RGB-only arm exactly those
    tg_full, sup = unit_result(run_dir, "tg_full"), unit_result(run_dir, "supervised")
    assert tg_full["params"] > 2 * tg_full["inference_params"]
    assert sup["params"] == sup["inference_params"] == tg_full["inference_params"]
    # the sweep's 25% units are the main units: none is trained twice
    assert not (run_dir / "units" / "sweep" / "p0.25").exists()


def test_the_test_split_is_read_only_for_the_final_test(smoke_run):
    _, run_dir, _ = smoke_run
    entries = read_jsonl(run_dir / "access_log.jsonl")
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert {e["purpose"] for e in entries if e["split"] == "test"} == {"final_test"}
    assert {e["purpose"] for e in entries if e["split"] == "val"} <= {"selection", "calibration", "figure"}
    units = {f"{arm}/seed0" for arm in ARMS} | {f"sweep/p0.5/{arm}/seed0" for arm in ("supervised", "tg_full")}
    for unit in units:
        mine = [e for e in entries if e["unit"] == unit]
        tests = [e["index"] for e in mine if e["split"] == "test"]
        selection = [e["index"] for e in mine if e["purpose"] == "selection"]
        assert len(tests) == 1, f"{unit} read the test split {len(tests)} times"
        assert len(selection) == 2 and max(selection) < tests[0], unit  # eval_every 1, 2 steps
    assert units <= {e["unit"] for e in entries}


def test_saved_rgb_weights_load_alone_and_reproduce_the_test_accuracy(smoke_run, data_dir):
    _, run_dir, _ = smoke_run
    cfg = smoke_cfg(data_dir, *RUN_ARGS)
    data = prepare_data(cfg, data_dir, AccessLog())
    test = data.test.get("final_test", "re-evaluation")
    for arm in ("supervised", "fixmatch_03", "tg_full", "tg_rgb_pseudo"):
        card = json.loads((unit_dir(run_dir, arm) / "card.json").read_text())
        m = card["model"]
        net = TwoStreamNet(
            num_classes=len(card["classes"]),
            widths=m["widths"],
            blocks=m["blocks"],
            proj_dim=m["proj_dim"],
            dropout=m["dropout"],
            bn_eps=m["bn_eps"],
        ).drop_training_branches()
        net.load_state_dict(load_file(str(unit_dir(run_dir, arm) / "model.safetensors")), strict=True)
        assert net.tg_backbone is None and net.tg_head is None
        probs = predict(net, test, cfg, torch.device("cpu"))
        assert probs.shape == (20, 10)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        top1 = 100.0 * float(np.mean(probs.argmax(1) == test.labels))
        assert top1 == pytest.approx(unit_result(run_dir, arm)["test"]["top1"]), arm


def test_a_unit_is_deterministic(smoke_run, tmp_path, data_dir):
    """TG-full trained again, alone, in a fresh run directory repeats the shared run's unit exactly."""
    _, run_dir, _ = smoke_run
    assert cli(tmp_path, data_dir, "arms=[tg_full]", "seeds=[0]", "stages=[data,train]") == EXIT_OK
    again = unit_result(tmp_path / "temporal_gradient" / "smoke", "tg_full")
    first = unit_result(run_dir, "tg_full")
    for key in ("best_step", "curve", "val", "test", "params", "labelled_videos"):
        assert again[key] == first[key], key
    assert again["pseudo"]["confusion"] == first["pseudo"]["confusion"]
    # without the eval stage nothing is claimed
    assert json.loads((tmp_path / "temporal_gradient" / "smoke" / "results.json").read_text())["claims"] == []


def test_rerun_reuses_finished_units(smoke_run, tmp_path, data_dir, no_training):
    _, run_dir, results = smoke_run
    copy = tmp_path / "temporal_gradient" / "smoke"
    shutil.copytree(run_dir, copy)
    stamps = {p: p.stat().st_mtime_ns for p in (copy / "units").rglob("*") if p.is_file()}
    assert cli(tmp_path, data_dir, *RUN_ARGS) == EXIT_OK
    assert {p: p.stat().st_mtime_ns for p in (copy / "units").rglob("*") if p.is_file()} == stamps
    again = json.loads((copy / "results.json").read_text())
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]


def test_eval_stage_alone_rebuilds_the_claims_from_finished_units(smoke_run, tmp_path, data_dir, no_training):
    _, run_dir, results = smoke_run
    copy_dir = tmp_path / "temporal_gradient" / "smoke"
    shutil.copytree(run_dir, copy_dir)
    (copy_dir / "results.json").unlink()
    assert cli(tmp_path, data_dir, *RUN_ARGS, "stages=[eval]") == EXIT_OK
    again = json.loads((copy_dir / "results.json").read_text())
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]
    assert again["tables"][:2] == results["tables"][:2]


def test_eval_stage_on_an_empty_run_directory_is_a_clear_error(tmp_path, data_dir, capsys):
    assert cli(tmp_path, data_dir, "stages=[eval]", "arms=[tg_full]", "seeds=[0]") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "train stage first" in err and "no finished units" in err


# ------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["arms=[tg_full,mixmatch]"], "'arms'"),
        (["sweep.arms=[supervised,tg]"], "sweep.arms"),
        (["stages=[fit]"], "'stages'"),
        (["data.labelled_fraction=0"], "data.labelled_fraction"),
        (["sweep.labelled_fractions=[0.1,1.5]"], "sweep.labelled_fractions"),
        (["data.crop_area=[0.9,0.5]"], "data.crop_area"),
        (["data.synthetic.num_frames=16", "data.clip_len=9", "data.frame_interval=2"], "data.clip_len"),
        (["model.widths=[8,16,32]"], "model.widths"),
        (["loss.temperature=0"], "loss.temperature"),
        (["data.source=ucf101"], "data.real.video_root"),
        (["data.source=youtube"], "data.source"),
        (["data.synthetic.test_videos=0"], "test_videos"),
        (["loss.thresold=0.5"], "loss.thresold"),
        (["workers=0"], "'workers'"),
    ],
)
def test_bad_config_is_a_clear_usage_error(overrides, match, tmp_path, capsys):
    assert cli(tmp_path, tmp_path / "data", *overrides) == EXIT_USAGE
    assert match in capsys.readouterr().err
    assert not (tmp_path / "temporal_gradient").exists()


def test_a_clip_as_long_as_the_video_is_a_usage_error(tmp_path, data_dir, capsys):
    assert cli(tmp_path, data_dir, "data.clip_len=8", "stages=[data]") == EXIT_USAGE  # 8 frames of 8
    assert "data.clip_len" in capsys.readouterr().err


def test_an_unknown_motion_modality_is_a_usage_error(tmp_path, data_dir, capsys):
    assert cli(tmp_path, data_dir, "data.modality=flow", "arms=[tg_full]", "seeds=[0]") == EXIT_USAGE
    assert "data.modality" in capsys.readouterr().err


def test_a_real_source_without_its_files_is_a_clear_error_not_a_crash(tmp_path, data_dir, capsys):
    args = ["data.source=ucf101", f"data.real.video_root={tmp_path}", f"data.real.split_dir={tmp_path}"]
    assert cli(tmp_path, data_dir, *args) == EXIT_FAILED
    assert "classInd.txt" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the schedule


def schedule_cfg(**optim) -> TemporalGradientConfig:
    cfg = TemporalGradientConfig()
    cfg.max_steps = 120  # warm-up: 1/6 -> 20 steps
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    cfg = schedule_cfg(lr=0.1, warmup_ratio=0.1)
    lrs = np.array([lr_at(s, cfg) for s in range(cfg.max_steps)])
    assert lrs[0] == pytest.approx(0.01)  # warmup_ratio x lr
    assert lrs[10] == pytest.approx(0.055)  # half-way up the line from 0.01 to 0.1
    assert lrs[20] == pytest.approx(0.1)  # the peak at the end of the warm-up
    assert lrs.max() == pytest.approx(0.1)
    assert np.all(np.diff(lrs[:21]) > 0)
    assert np.all(np.diff(lrs[20:]) < 0)
    assert lrs[-1] < 1e-3 * 0.1  # ~0 at the last step
    # half-way through the decay the cosine is at half the peak
    assert lr_at(70, cfg) == pytest.approx(0.05)


def test_lr_without_warm_up_starts_at_the_peak():
    cfg = schedule_cfg(lr=0.2, warmup_fraction=0.0)
    assert lr_at(0, cfg) == pytest.approx(0.2)
    assert lr_at(60, cfg) == pytest.approx(0.1)


def test_scale_lr_applies_the_linear_scaling_rule_from_0_2_per_40_clips():
    cfg = schedule_cfg(lr=0.5, scale_lr=True)
    cfg.data.labelled_per_step, cfg.data.unlabelled_per_step = 8, 8
    assert lr_at(20, cfg) == pytest.approx(0.2 * 16 / 40)
    cfg.data.labelled_per_step, cfg.data.unlabelled_per_step = 20, 20
    assert lr_at(20, cfg) == pytest.approx(0.2)
    assert lr_at(0, cfg) == pytest.approx(0.2 * cfg.optim.warmup_ratio)


# ------------------------------------------------------------------------------------------------ the loss


@pytest.fixture(scope="module")
def loss_setup(data_dir):
    """The smoke data, a config with 60 steps (warm-up 10) and one step's clips of both streams."""
    cfg = smoke_cfg(data_dir, "max_steps=60")
    data = prepare_data(cfg, data_dir, AccessLog())
    labelled = data.labelled_indices(cfg.data.labelled_fraction)
    clips = draw_step(
        data, labelled, cfg, seed=0, step=1, rank=0, world=1, gen=torch.Generator().manual_seed(0), unlabelled=True
    )
    return cfg, clips


@pytest.fixture
def setup(loss_setup):
    """A private copy of the config (tests change loss.threshold) and the shared clips."""
    cfg, clips = loss_setup
    return copy.deepcopy(cfg), clips


def arm_model(cfg: TemporalGradientConfig, spec: ArmSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, spec, 10)


EXPECTED_PARTS = {
    "supervised": {"supervised", "total"},
    "fixmatch_095": {"supervised", "pseudo", "total"},
    "fixmatch_03": {"supervised", "pseudo", "total"},
    "tg_full": {"supervised", "pseudo", "align", "contrast", "total"},
    "tg_no_align": {"supervised", "pseudo", "contrast", "total"},
    "tg_no_contrast": {"supervised", "pseudo", "align", "total"},
    "tg_rgb_pseudo": {"supervised", "pseudo", "align", "contrast", "total"},
}


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_has_its_terms_and_no_pseudo_term_before_warm_up(arm, setup):
    cfg, clips = setup
    cfg.loss.threshold = 0.0  # the TG arms keep every clip, so their pseudo term is positive
    spec = ARM_SPECS[arm]
    if not spec.two_stream and spec.unlabelled:
        spec = ArmSpec(two_stream=False, unlabelled=True, threshold=0.0, pseudo_from="rgb")  # RGB FixMatch, all kept
    model = arm_model(cfg, spec).eval()  # eval: dropout off, so repeated calls agree
    warm = round(cfg.loss.warmup_fraction * cfg.max_steps)
    assert warm == 10
    for step in (0, warm - 1, warm, 30):
        res = compute_loss(spec, model, clips, cfg, step)
        parts = res.parts
        assert set(parts) == EXPECTED_PARTS[arm], parts
        assert all(np.isfinite(v) for v in parts.values()) and torch.isfinite(res.total)
        assert res.total.item() == pytest.approx(parts["total"])
        others = sum(v for k, v in parts.items() if k not in ("total", "pseudo"))
        if "pseudo" in parts:
            assert parts["pseudo"] > 0, "with a threshold of 0 every clip is kept"
            expected = others if step < warm else others + parts["pseudo"]
        else:
            expected = others
        assert parts["total"] == pytest.approx(expected, rel=1e-5), step
    # the supervised-only arm sees no unlabelled clip
    if arm == "supervised":
        assert res.pseudo is None


@pytest.mark.parametrize("arm", ["fixmatch_095", "tg_full", "tg_rgb_pseudo"])
def test_pseudo_labels_are_the_argmax_of_the_weak_views_logits(arm, setup):
    cfg, clips = setup
    cfg.loss.threshold = 0.3
    spec = ARM_SPECS[arm]
    model = arm_model(cfg, spec, seed=1).eval()  # eval BN: each clip's logits do not depend on its batch-mates
    yhat, mask = compute_loss(spec, model, clips, cfg, 30).pseudo
    with torch.no_grad():
        if spec.two_stream:
            out = model.forward_streams(clips.rgb_uw, clips.tg_uw)
            logits = out.logits_rgb if spec.pseudo_from == "rgb" else (out.logits_rgb + out.logits_tg) / 2
        else:
            logits = model(clips.rgb_uw)
    probs = torch.softmax(logits, dim=1)
    assert torch.equal(yhat, probs.argmax(1))
    threshold = spec.threshold if spec.threshold is not None else 0.3
    assert torch.equal(mask, probs.max(1).values >= threshold)


def test_every_parameter_of_tg_full_gets_a_gradient(setup):
    cfg, clips = setup
    cfg.loss.threshold = 0.0
    spec = ARM_SPECS["tg_full"]
    model = arm_model(cfg, spec).train()
    res = compute_loss(spec, model, clips, cfg, 30)  # after warm-up: every term is on
    res.total.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("tg_backbone.") for n in names) and any(n.startswith("tg_proj.") for n in names)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_ablations_drop_exactly_their_term(setup):
    """With the same weights and clips, TG-full's total is the no-align total plus the alignment term, and the
    no-contrast total plus the contrast term."""
    cfg, clips = setup
    cfg.loss.threshold = 0.0
    full = compute_loss(ARM_SPECS["tg_full"], arm_model(cfg, ARM_SPECS["tg_full"]).eval(), clips, cfg, 30).parts
    no_align = compute_loss(ARM_SPECS["tg_no_align"], arm_model(cfg, ARM_SPECS["tg_full"]).eval(), clips, cfg, 30)
    no_contrast = compute_loss(ARM_SPECS["tg_no_contrast"], arm_model(cfg, ARM_SPECS["tg_full"]).eval(), clips, cfg, 30)
    assert full["total"] == pytest.approx(no_align.parts["total"] + full["align"], rel=1e-5)
    assert full["total"] == pytest.approx(no_contrast.parts["total"] + full["contrast"], rel=1e-5)


# -------------------------------------------------------------------------------------- single-frame control


def colour_coded_videos(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Videos whose class is their colour (one palette entry per class) plus pixel noise: (n, 4, 16, 16, 3)."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(0).uniform(20, 235, size=(10, 3))
    labels = rng.integers(0, 10, size=n)
    noise = rng.normal(0, 8, size=(n, 4, 16, 16, 3))
    videos = np.clip(palette[labels][:, None, None, None, :] + noise, 0, 255).astype(np.uint8)
    return videos, labels.astype(np.int64)


def test_the_single_frame_classifier_learns_when_appearance_carries_the_class():
    videos, labels = colour_coded_videos(200, seed=1)
    test_videos, test_labels = colour_coded_videos(100, seed=2)
    model = train_frame_classifier(videos, labels, num_classes=10, steps=60, seed=0, batch_size=32)
    assert not model.training
    assert frame_accuracy(model, test_videos, test_labels) >= 95.0
    # the same classifier, untrained, is not that good: the accuracy comes from training
    untrained = train_frame_classifier(videos, labels, num_classes=10, steps=0, seed=0)
    assert frame_accuracy(untrained, test_videos, test_labels) < 60.0


def test_the_control_reports_the_frame_position_that_leaks_the_class():
    """A class cue only in the last frame: the middle frame hides it, the best-frame score finds it."""
    rng = np.random.default_rng(3)
    palette = np.random.default_rng(0).uniform(20, 235, size=(10, 3))

    def videos_with_a_last_frame_cue(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, size=n)
        videos = rng.integers(0, 256, size=(n, 4, 16, 16, 3)).astype(np.float64)
        videos[:, -1] = palette[labels][:, None, None, :] + rng.normal(0, 8, size=(n, 16, 16, 3))
        return np.clip(videos, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train_v, train_y = videos_with_a_last_frame_cue(300)
    test_v, test_y = videos_with_a_last_frame_cue(150)
    model = train_frame_classifier(train_v, train_y, num_classes=10, steps=150, seed=0, batch_size=32)
    assert frame_accuracy(model, test_v, test_y) < 40.0  # the middle frame (index 2) is noise
    assert frame_accuracy(model, test_v, test_y, frame=3) >= 80.0
    assert worst_frame_accuracy(model, test_v, test_y) == frame_accuracy(model, test_v, test_y, frame=3)


def test_sync_bn_only_under_ddp_on_cuda():
    from thrifty.core.distributed import with_sync_bn

    def count(m: torch.nn.Module) -> int:
        return sum(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())

    net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 1), torch.nn.BatchNorm3d(4))
    assert count(with_sync_bn(net, enabled=True, device=torch.device("cpu"))) == 0  # gloo has no SyncBN
    assert count(with_sync_bn(net, enabled=False, device=torch.device("cuda"))) == 0
    keys = set(net.state_dict())
    converted = with_sync_bn(net, enabled=True, device=torch.device("cuda"))  # converting needs no GPU
    assert count(converted) == 1
    assert set(converted.state_dict()) == keys  # exports keep their keys
