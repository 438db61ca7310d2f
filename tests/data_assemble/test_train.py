"""The Label-Assemble recipe end to end at the smoke budget: results, claims, tables and figures; unit files;
selection on validation only (the access log); determinism; reuse of finished units; the eval stage alone; the
loss falls; every arm runs; the release's loss ignores assembled rows; validation-only runs; clear config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from thrifty.cli import EXIT_USAGE, main
from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.data.chest_synth import FINDINGS, TARGET
from thrifty.methods.data_assemble import train as recipe
from thrifty.methods.data_assemble.config import ARMS, ROLES, DataAssembleConfig, ModelConfig
from thrifty.methods.data_assemble.data import LabelledImages, draw_batch, role_counts
from thrifty.methods.data_assemble.model import build_model
from thrifty.methods.data_assemble.train import ARM_SPECS, compute_loss, ema_update, lr_at, mean_teacher, train

SMOKE_ARMS = ["target_only", "naive", "assemble", "oracle"]  # the smoke preset's (the card's arms 1, 2, 3, 5)
TIMING = ("train_seconds", "train_images_per_s", "infer_images_per_s")


def smoke(out: Path, data_dir: Path, *overrides: str) -> DataAssembleConfig:
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", *overrides]
    return load_config("data_assemble", "smoke", args)[1]


def unit_result(run_dir: Path, arm: str, seed: int) -> dict:
    return json.loads((run_dir / "units" / arm / f"seed{seed}" / "result.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run under ``dest`` (``dest`` is the new out_dir), so reruns leave the original alone."""
    target = dest / "data_assemble" / "smoke"
    shutil.copytree(run_dir, target)
    return target


@pytest.fixture
def no_training(monkeypatch):
    """Building a network (the first thing a unit does when it trains) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a finished unit was trained again")

    monkeypatch.setattr(recipe, "build_model", refuse)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    results = train(smoke(out, data_dir))
    return out / "data_assemble" / "smoke", results


# ---------------------------------------------------------------------------------------------- results


def test_smoke_run_writes_claims_tables_figures_and_cost(smoke_run):
    run_dir, results = smoke_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["claims"] == results["claims"]
    assert on_disk["recipe"] == "data_assemble" and on_disk["paper"]["arxiv"] == "2109.12265"
    # the smoke arms allow the ordering claims, "on par with the oracle" and "works"; no adapter, release or
    # label-count sweep ran, so none of those claims is made
    assert {c["id"] for c in results["claims"]} == {
        "assemble_beats_naive_target_auc",
        "naive_beats_target_only_target_auc",
        "assemble_beats_naive_minority_auc",
        "assemble_on_par_with_oracle",
        "assemble_works",
    }
    for c in results["claims"]:
        lo, hi = c["ci95"]
        assert lo <= c["measured"] <= hi, c["id"]
        assert c["seeds"] == [0, 1] and c["preset"] == "smoke"
    on_par = next(c for c in results["claims"] if c["id"] == "assemble_on_par_with_oracle")
    for seed, diff in zip(on_par["seeds"], on_par["values"]):
        a, o = unit_result(run_dir, "assemble", seed), unit_result(run_dir, "oracle", seed)
        assert diff == pytest.approx(a["test"]["target_auc"] - o["test"]["target_auc"])
    assert on_par["threshold"] == pytest.approx(-2.0)  # on_par_margin 0.02 in AUC points

    auc, per_label, cost = results["tables"]
    assert auc["columns"] == ["arm", "seeds", "target AUC", "minority AUC", "macro AUC"]
    # the arms in run order, then the training-free baseline (named as in results["trivial"])
    assert [r[0] for r in auc["rows"]] == [*SMOKE_ARMS, results["trivial"]["arm"]]
    assert "training-free" in results["trivial"]["arm"]
    assert all(r[1] == 2 for r in auc["rows"][:-1])
    assert auc["title"].startswith("Test")
    assert per_label["columns"] == ["arm", *FINDINGS]
    assert [r[0] for r in cost["rows"]] == SMOKE_ARMS
    assert all(r[-1] == 2 for r in cost["rows"])  # steps

    assert set(results["figures"]) == {"figures/test_auc_per_arm.png", "figures/target_roc.png", "figures/examples.png"}
    for fig in results["figures"]:
        assert (run_dir / fig).stat().st_size > 2000, fig
    assert results["cost"]["world_size"] == 1 and results["cost"]["wall_time_s"] > 0
    trivial = results["trivial"]
    assert 0 <= trivial["val"]["target_auc"] <= 100 and 0 <= trivial["test"]["target_auc"] <= 100


def test_data_summary_describes_the_label_protocol(smoke_run):
    _, results = smoke_run
    info = results["data"]
    assert info["source"] == "synthetic" and info["labels"] == list(FINDINGS) and info["target"] == TARGET
    roles = info["roles"]
    assert roles["target"] == {"images": 16, "labels_given": [TARGET], "target_positives_given": 4}
    assert roles["assembled"]["images"] == 24 and roles["assembled"]["target_positives_given"] == 0
    assert roles["assembled"]["labels_given"] == [n for n in FINDINGS if n != TARGET]
    assert roles["unlabelled"] == {"images": 16, "labels_given": [], "target_positives_given": 0}
    assert (info["val_images"], info["test_images"]) == (40, 40)


def test_every_unit_saves_weights_card_and_result(smoke_run):
    run_dir, _ = smoke_run
    for arm in SMOKE_ARMS:
        for seed in (0, 1):
            unit = run_dir / "units" / arm / f"seed{seed}"
            assert (unit / "model.safetensors").stat().st_size > 10_000
            card = json.loads((unit / "card.json").read_text())
            assert (card["arm"], card["seed"], card["head"]) == (arm, seed, "multihead")
            assert card["labels"] == list(FINDINGS) and card["target"] == TARGET and card["image_size"] == 32
            res = unit_result(run_dir, arm, seed)
            assert (res["arm"], res["seed"], res["count"], res["steps"]) == (arm, seed, 16, 2)
            assert len(res["test_target_probs"]) == 40
            assert all(0.0 <= p <= 1.0 for p in res["test_target_probs"])
            for split in ("val", "test"):
                assert set(res[split]) == {"per_label_auc", "target_auc", "minority_auc", "macro_auc"}
                assert 0 <= res[split]["target_auc"] <= 100
            assert sum(res["batch_roles"].values()) == 8
            assert res["params"] > 1000


def test_the_kept_step_is_the_best_on_validation(smoke_run):
    """Every unit keeps the step of the highest validation AUC of the target (first on ties), and the kept
    weights score that AUC again on validation."""
    run_dir, _ = smoke_run
    for arm in SMOKE_ARMS:
        for seed in (0, 1):
            res = unit_result(run_dir, arm, seed)
            curve = res["curve"]
            assert [p["step"] for p in curve] == [1, 2]  # eval_every 1
            aucs = [p["val_target_auc"] for p in curve]
            assert res["best_step"] == curve[int(np.argmax(aucs))]["step"]
            assert res["val"]["target_auc"] == pytest.approx(max(aucs), abs=1e-9)


def test_no_test_read_reaches_selection_or_calibration(smoke_run):
    run_dir, _ = smoke_run
    entries = read_jsonl(run_dir / "access_log.jsonl")
    assert entries, "the access log is empty"
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert {e["purpose"] for e in entries if e["split"] == "test"} <= {"final_test", "figure"}
    assert {e["purpose"] for e in entries if e["split"] == "val"} <= {"selection", "calibration", "figure"}
    assert all(e["unit"] == "figures" for e in entries if e["purpose"] == "figure")
    train_units = {f"{arm}/seed{seed}" for arm in SMOKE_ARMS for seed in (0, 1)}
    assert {e["unit"] for e in entries} == train_units | {"trivial", "figures"}
    for unit in train_units | {"trivial"}:
        mine = [e for e in entries if e["unit"] == unit]
        tests = [e["index"] for e in mine if e["split"] == "test"]
        vals = [e["index"] for e in mine if e["split"] == "val"]
        assert len(tests) == 1, f"{unit} read the test split {len(tests)} times"
        assert vals and max(vals) < tests[0], f"{unit} read validation after the test split"
    for unit in train_units:
        assert any(e["unit"] == unit and e["purpose"] == "selection" for e in entries), unit


def test_a_unit_is_deterministic_and_the_seed_matters(smoke_run, tmp_path, data_dir):
    """The same unit trained again in a fresh run directory, alone rather than after other arms, repeats exactly;
    the other seed differs."""
    run_dir, _ = smoke_run
    train(smoke(tmp_path, data_dir, "arms=[assemble]", "seeds=[0]", "stages=[data,train]"))
    again = unit_result(tmp_path / "data_assemble" / "smoke", "assemble", 0)
    first = unit_result(run_dir, "assemble", 0)
    for key in ("best_step", "curve", "val", "test", "test_target_probs", "batch_roles", "params"):
        assert again[key] == first[key], key
    other = unit_result(run_dir, "assemble", 1)
    assert other["test_target_probs"] != first["test_target_probs"]
    assert other["curve"] != first["curve"]


def test_rerun_reuses_finished_units(smoke_run, tmp_path, data_dir, no_training):
    run_dir, results = smoke_run
    copy = copy_run(run_dir, tmp_path)
    weights = {p: p.stat().st_mtime_ns for p in (copy / "units").rglob("*") if p.is_file()}
    again = train(smoke(tmp_path, data_dir))
    assert {p: p.stat().st_mtime_ns for p in (copy / "units").rglob("*") if p.is_file()} == weights
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]
    assert again["tables"][0]["rows"] == results["tables"][0]["rows"]


def test_eval_stage_alone_rebuilds_claims_from_finished_units(smoke_run, tmp_path, data_dir, no_training):
    run_dir, results = smoke_run
    copy = copy_run(run_dir, tmp_path)
    (copy / "results.json").unlink()
    shutil.rmtree(copy / "figures")
    again = train(smoke(tmp_path, data_dir, "stages=[eval]"))
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]
    assert again["tables"][:2] == results["tables"][:2]
    assert set(again["figures"]) == set(results["figures"])
    assert all((copy / f).is_file() for f in again["figures"])
    # a subset of the arms evaluates only those
    subset = train(smoke(tmp_path, data_dir, "stages=[eval]", "arms=[naive,target_only]"))
    assert {c["id"] for c in subset["claims"]} == {"naive_beats_target_only_target_auc"}


def test_eval_stage_without_finished_units_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="train stage first"):
        train(smoke(tmp_path, data_dir, "stages=[eval]", "arms=[naive]"))


def test_data_stage_alone_trains_nothing(tmp_path, data_dir):
    res = train(smoke(tmp_path, data_dir, "stages=[data]"))
    assert res["claims"] == [] and res["data"]["roles"]["target"]["images"] == 16
    assert not (tmp_path / "data_assemble" / "smoke" / "units").exists()


# ------------------------------------------------------------------------------------------------ training


def test_the_loss_falls(tmp_path, data_dir):
    train(smoke(tmp_path, data_dir, "arms=[assemble]", "seeds=[0]", "max_steps=30", "eval_every=30",
                "batch_size=16", "stages=[data,train]"))  # fmt: skip
    records = [r for r in read_jsonl(tmp_path / "data_assemble/smoke/metrics.jsonl") if "total" in r]
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("total", "bce"):
        early = np.mean([r[key] for r in records[:5]])
        late = np.mean([r[key] for r in records[-10:]])
        assert late < 0.8 * early, (key, early, late)
    # the paper's method logs its pseudo-label and consistency terms
    assert all(r["pseudo"] > 0 and r["consistency"] > 0 for r in records)
    assert all(r["total"] == pytest.approx(r["bce"] + r["pseudo"] + r["consistency"]) for r in records)


def test_learning_rate_halves_on_schedule():
    cfg = DataAssembleConfig()
    cfg.optim.lr, cfg.optim.halve_every = 2e-4, 3
    assert [lr_at(s, cfg) for s in range(7)] == pytest.approx([2e-4] * 3 + [1e-4] * 3 + [5e-5])


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_runs_at_smoke_size(arm, tmp_path, data_dir):
    train(smoke(tmp_path, data_dir, f"arms=[{arm}]", "seeds=[0]", "stages=[data,train]"))
    run_dir = tmp_path / "data_assemble" / "smoke"
    res = unit_result(run_dir, arm, 0)
    card = json.loads((run_dir / "units" / arm / "seed0" / "card.json").read_text())
    assert card["head"] == ("adapter" if arm == "assemble_adapter" else "multihead")
    # the batch composition each arm's sources imply (8 images, shares 1/4, 1/2, 1/4 renormalised)
    expected = {
        "target_only": {"target": 8},
        "naive": {"target": 3, "assembled": 5},
    }.get(arm, {"target": 2, "assembled": 4, "unlabelled": 2})
    assert res["batch_roles"] == expected
    assert len(res["test_target_probs"]) == 40
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "total" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert np.isfinite(r["total"]) and r["bce"] > 0
        if arm in ("target_only", "naive"):  # BCE only
            assert r["pseudo"] == r["consistency"] == 0 and r["total"] == r["bce"]
        else:
            assert r["pseudo"] > 0 and r["consistency"] > 0


def _toy_batch(seed: int = 0, size: int = 32):
    """A batch of the recipe's composition drawn from random sources with the synthetic label protocol."""
    gen = torch.Generator().manual_seed(seed)
    t = FINDINGS.index(TARGET)
    train = {}
    for role in ROLES:
        n = 12
        given = torch.zeros(n, len(FINDINGS), dtype=torch.bool)
        if role == "target":
            given[:, t] = True
        elif role == "assembled":
            given[:, [j for j in range(len(FINDINGS)) if j != t]] = True
        labels = (torch.rand(n, len(FINDINGS), generator=gen) < 0.4).float()
        train[role] = LabelledImages(torch.rand(n, 1, size, size, generator=gen), labels, given, np.arange(n))
    counts = role_counts(8, {"target": 0.25, "assembled": 0.5, "unlabelled": 0.25}, list(ROLES))
    return draw_batch(train, counts, seed=seed, step=1), t


def _loss_and_grads(arm: str, model: torch.nn.Module, batch, t: int) -> tuple[float, list[torch.Tensor]]:
    cfg = DataAssembleConfig()
    model.zero_grad(set_to_none=True)
    parts = compute_loss(ARM_SPECS[arm], model, batch, cfg, torch.Generator().manual_seed(5), t)
    parts.total.backward()
    return float(parts.total.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _scramble_other_sources(batch):
    """The same batch with every row that is not from the target source replaced: new images, flipped labels,
    every label given."""
    other = batch.roles != ROLES.index("target")
    gen = torch.Generator().manual_seed(99)
    images, labels, given = batch.images.clone(), batch.labels.clone(), batch.given.clone()
    images[other] = torch.rand(images[other].shape, generator=gen)
    labels[other] = 1 - labels[other]
    given[other] = True
    return type(batch)(images, labels, given, batch.roles)


@pytest.mark.parametrize("arm", ["target_only", "naive", "assemble", "release_compat"])
def test_views_go_through_separate_forwards_so_batchnorm_never_pools_them(arm):
    """As in the release's train.py: weak view first, then (for arms with a consistency term) the strong view, each
    its own forward. In training mode the weak view's outputs then do not depend on the strong view at all."""
    torch.manual_seed(0)
    batch, t = _toy_batch(size=32)
    model = build_model(ModelConfig(), num_labels=len(FINDINGS)).train()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    cfg = DataAssembleConfig()
    parts = compute_loss(ARM_SPECS[arm], model, batch, cfg, torch.Generator().manual_seed(5), t)
    n = len(batch.images)
    assert [len(x) for x in seen] == ([n, n] if ARM_SPECS[arm].strong_view else [n])
    if not ARM_SPECS[arm].strong_view or arm == "release_compat":
        return  # release-compat's BCE covers target-source rows only; the call order above is what it pins
    # the weak view's BCE is what a model that only ever sees the weak view computes
    weak_only = build_model(ModelConfig(), num_labels=len(FINDINGS)).train()
    weak_only.load_state_dict(model.state_dict())  # same weights (running statistics do not enter train mode)
    logits = weak_only(seen[0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[batch.given], batch.labels[batch.given])
    assert parts.bce.item() == pytest.approx(bce.item(), rel=1e-5)


def test_release_compat_loss_ignores_every_row_outside_the_target_source():
    """The release's defect, end to end through the arm's loss: the assembled and unlabelled rows add no loss and
    no gradient (the network in eval mode, so rows do not interact through BatchNorm); the paper's loss uses them."""
    batch, t = _toy_batch()
    scrambled = _scramble_other_sources(batch)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), num_labels=len(FINDINGS)).eval()

    loss, grads = _loss_and_grads("release_compat", model, batch, t)
    loss2, grads2 = _loss_and_grads("release_compat", model, scrambled, t)
    assert loss2 == pytest.approx(loss, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, grads2))

    for arm in ("assemble", "naive"):
        a, _ = _loss_and_grads(arm, model, batch, t)
        b, _ = _loss_and_grads(arm, model, scrambled, t)
        assert abs(a - b) > 1e-4, arm

    # and the target rows do count: flipping their labels changes the release's loss
    flipped = type(batch)(batch.images, 1 - batch.labels, batch.given, batch.roles)
    assert abs(_loss_and_grads("release_compat", model, flipped, t)[0] - loss) > 1e-4


def test_oracle_reveals_the_hidden_labels_of_the_labelled_sources(tmp_path, data_dir, monkeypatch):
    """The oracle arm trains on batches whose target and assembled rows give every label; the other arms on the
    sources' own masks."""
    seen: dict[str, list[torch.Tensor]] = {}
    real = recipe.compute_loss

    def spy(spec, model, batch, cfg, gen, target_index, teacher=None):
        arm = next(a for a, s in ARM_SPECS.items() if s is spec)
        seen.setdefault(arm, []).append(torch.stack([batch.given[batch.roles == k].all() for k in range(3)]))
        return real(spec, model, batch, cfg, gen, target_index, teacher)

    monkeypatch.setattr(recipe, "compute_loss", spy)
    train(smoke(tmp_path, data_dir, "arms=[assemble,oracle]", "seeds=[0]", "stages=[train]"))
    assert all(x.tolist() == [True, True, False] for x in seen["oracle"])
    assert all(x.tolist() == [False, False, False] for x in seen["assemble"])


# ------------------------------------------------------------------------------------------- other runs


def test_validation_only_run_never_reads_the_test_split(tmp_path, data_dir):
    res = train(smoke(tmp_path, data_dir, "arms=[naive,assemble]", "seeds=[0]", "final_test=false"))
    run_dir = tmp_path / "data_assemble" / "smoke"
    entries = read_jsonl(run_dir / "access_log.jsonl")
    assert entries and all(e["split"] == "val" for e in entries)
    assert res["claims"] == []
    assert res["tables"][0]["title"].startswith("Validation")
    assert [r[0] for r in res["tables"][0]["rows"]] == ["naive", "assemble", res["trivial"]["arm"]]
    assert "test" not in res["trivial"]
    assert set(res["figures"]) == {"figures/val_auc_per_arm.png", "figures/examples.png"}
    for arm in ("naive", "assemble"):
        unit = unit_result(run_dir, arm, 0)
        assert "test" not in unit and "test_target_probs" not in unit and "infer_images_per_s" not in unit


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("arms=[assemble,mixup]", "'arms'"),
        ("sweep.arms=[naive,teacher]", "sweep.arms"),
        ("stages=[fit]", "'stages'"),
        ("data.target=lung_mass", "data.target"),
        ("data.labels=[nodule,effusion]", "data.target"),
        ("data.labels=[nodule,tumour,ground_glass]", "data.labels"),
        ("data.synthetic.target_positives=16", "target_positives"),
        ("data.synthetic.target_positives=20", "target_positives"),
        ("data.synthetic.target_positives=0", "target_positives"),
        ("data.synthetic.test_images=0", "test_images"),
        ("data.ratios.target=0", "data.ratios"),
        ("data.ratios.hospital=1", "data.ratios"),
        ("data.role_images={assembled: 8}", "data.role_images"),
        ("data.role_images={target: 0}", "data.role_images"),
        ("data.role_images={target: 4, hospital: 4}", "data.role_images"),
        ("sweep.target_images=[2,16]", "sweep.target_images"),
        ("data.source=real", "real_sources"),
        ("data.source=web", "data.source"),
        ("model.backbone=resnet50", "model.backbone"),
        ("loss.tau=1.5", "loss.tau"),
        ("loss.t=1", "loss.t"),
        ("batch_size=0", "batch_size"),
        ("on_par_margin=-1", "on_par_margin"),
        ("max_step=3", "max_steps"),
        ("data.intensity_window=[99,1]", "intensity_window"),
        ("data.intensity_window=[5]", "intensity_window"),
        ("data.synthetic.assembled_domain=C", "assembled_domain"),
        ("data.synthetic.consolidation=wispy", "data.synthetic.consolidation"),
        ("loss.ema_decay=1", "loss.ema_decay"),
        ("loss.ema_decay=-0.5", "loss.ema_decay"),
    ],
)
def test_bad_config_is_a_clear_error(override, match, tmp_path, capsys):
    assert main(["run", "data_assemble", "--preset", "smoke", f"out_dir={tmp_path}", override]) == EXIT_USAGE
    assert match in capsys.readouterr().err
    assert not (tmp_path / "data_assemble").exists()


def test_fixed_role_images_give_every_arm_the_same_target_images_per_step(tmp_path, data_dir, monkeypatch):
    """With data.role_images every arm draws the same number of target-source images per step; the multi-source
    arms add the other sources' images on top."""
    seen: dict[str, set[tuple[int, ...]]] = {}
    real = recipe.compute_loss

    def spy(spec, model, batch, cfg, gen, target_index, teacher=None):
        arm = next(a for a, s in ARM_SPECS.items() if s is spec)
        seen.setdefault(arm, set()).add(tuple(int((batch.roles == k).sum()) for k in range(len(ROLES))))
        return real(spec, model, batch, cfg, gen, target_index, teacher)

    monkeypatch.setattr(recipe, "compute_loss", spy)
    overrides = ("arms=[target_only,naive,assemble]", "seeds=[0]", "stages=[train]", "final_test=false",
                 "data.role_images={target: 6, assembled: 4, unlabelled: 2}")  # fmt: skip
    train(smoke(tmp_path, data_dir, *overrides))
    assert seen == {"target_only": {(6, 0, 0)}, "naive": {(6, 4, 0)}, "assemble": {(6, 4, 2)}}
    unit = unit_result(tmp_path / "data_assemble" / "smoke", "assemble", 0)
    assert unit["batch_roles"] == {"target": 6, "assembled": 4, "unlabelled": 2}


def test_ratios_must_name_the_target():
    cfg = DataAssembleConfig()
    cfg.data.ratios = {"assembled": 0.5, "unlabelled": 0.5}
    with pytest.raises(ValueError, match="target required"):
        cfg.validate()


def test_a_batch_too_small_for_the_arms_sources_is_a_usage_error(tmp_path, data_dir, capsys):
    """batch_size=2 cannot hold one image of each of the paper's three sources: a config error, not a crash."""
    args = ["run", "data_assemble", "--preset", "smoke", f"out_dir={tmp_path}", f"data_dir={data_dir}",
            "progress=false", "arms=[assemble]", "seeds=[0]", "batch_size=2"]  # fmt: skip
    assert main(args) == EXIT_USAGE
    assert "batch" in capsys.readouterr().err


def test_ema_update_moves_the_teacher_towards_the_network_and_copies_its_buffers():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), num_labels=3).train()
    teacher = mean_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.rand(4, 1, 32, 32))  # moves BatchNorm's running statistics
    ema_update(teacher, model, 0.9)
    for old, new, cur in zip(before, teacher.parameters(), model.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * cur, atol=1e-6)
    for t_buf, buf in zip(teacher.buffers(), model.buffers()):
        assert torch.equal(t_buf, buf)


def test_the_mean_teacher_supplies_the_pseudo_labels_and_trains_with_the_assemble_arm(tmp_path, data_dir, monkeypatch):
    batch, t = _toy_batch(size=32)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), num_labels=len(FINDINGS)).train()
    cfg = DataAssembleConfig()
    own = compute_loss(ARM_SPECS["assemble"], model, batch, cfg, torch.Generator().manual_seed(5), t)
    twin = mean_teacher(model)  # before any update the teacher is the network, but in eval mode
    taught = compute_loss(ARM_SPECS["assemble"], model, batch, cfg, torch.Generator().manual_seed(5), t, twin)
    assert torch.equal(own.bce, taught.bce) and not torch.equal(own.pseudo, taught.pseudo)
    # a run with the teacher calls it on every step of the paper's arms and never on the others
    calls: list[str] = []
    real = recipe.ema_update
    monkeypatch.setattr(recipe, "ema_update", lambda tea, mod, d: (calls.append(d), real(tea, mod, d)))
    train(
        smoke(
            tmp_path,
            data_dir,
            "arms=[naive,assemble]",
            "seeds=[0]",
            "loss.ema_decay=0.99",
            "max_steps=3",
            "sweep.target_images=[]",
            "final_test=false",
        )
    )
    assert calls == [0.99] * 3


def test_sync_bn_is_asked_for_only_under_ddp(tmp_path, data_dir, monkeypatch):
    asked: list[bool] = []
    real = recipe.distributed.with_sync_bn
    monkeypatch.setattr(
        recipe.distributed, "with_sync_bn", lambda m, **kw: (asked.append(kw["enabled"]), real(m, **kw))[1]
    )
    train(
        smoke(
            tmp_path,
            data_dir,
            "arms=[naive]",
            "seeds=[0]",
            "model.sync_bn=true",
            "max_steps=2",
            "sweep.target_images=[]",
            "final_test=false",
        )
    )
    assert asked == [False]  # one process: nothing to synchronise (a CUDA DDP run converts; see core.distributed)
