"""The MT-TransUNet recipe end to end at the smoke budget (results, claims, tables, figures; unit files; the
masked-fraction sweep; selection on validation only, read from the access log; reuse of finished units and exact
repeats of retrained ones; the eval stage alone), and its training pieces: ``make_batch`` (SDF only for masked
images, DTC's sign), ``compute_loss`` (cls_only is the plain CE; a mask-free image's mask changes no loss; the
gradient reaches exactly the parameters an arm uses) and clear config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from thrifty.cli import EXIT_USAGE, main
from thrifty.core.registry import load_config
from thrifty.data.dermoscopy import normalised_sdf
from thrifty.methods.mt_transunet import train as recipe
from thrifty.methods.mt_transunet.config import ARMS, CLASSES, MTTransUNetConfig
from thrifty.methods.mt_transunet.data import LesionSet
from thrifty.methods.mt_transunet.model import build_model
from thrifty.methods.mt_transunet.train import ARM_SPECS, Batch, compute_loss, make_batch, train

ARM = "seg+cls+dual"
UNITS = {"main": f"units/{ARM}/seed0", "sweep": f"units/sweep/f0.5/{ARM}/seed0"}
UNIT_NAMES = {"main": f"{ARM}/seed0", "sweep": f"sweep/f0.5/{ARM}/seed0"}
RUN_ARGS = (f"arms=[{ARM}]", "seeds=[0]", "sweep.masked_fractions=[0.5]", f"sweep.arms=[{ARM}]")
UNIT_KEYS = ("curve", "best_step", "val", "test", "shifted_test", "params", "masked_fraction", "steps_per_epoch")


def smoke(out: Path, data_dir: Path, *overrides: str) -> MTTransUNetConfig:
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", *overrides]
    return load_config("mt_transunet", "smoke", args)[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def unit_result(run_dir: Path, which: str) -> dict:
    return json.loads((run_dir / UNITS[which] / "result.json").read_text())


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run under ``dest`` (the new out_dir), so reruns leave the original alone."""
    target = dest / "mt_transunet" / "smoke"
    shutil.copytree(run_dir, target)
    return target


def mtimes(folder: Path) -> dict[Path, int]:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Drawing a training batch (what a unit does at every step) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a finished unit was trained again")

    monkeypatch.setattr(recipe, "make_batch", refuse)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    """The full method with seed 0 and its masked-fraction sweep at 50% (two units), every stage."""
    out = tmp_path_factory.mktemp("runs")
    results = train(smoke(out, data_dir, *RUN_ARGS))
    return out / "mt_transunet" / "smoke", results


# ---------------------------------------------------------------------------------------------- results


def test_smoke_run_writes_results_claims_tables_and_figures(smoke_run):
    run_dir, results = smoke_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["claims"] == results["claims"]
    assert on_disk["recipe"] == "mt_transunet" and on_disk["paper"]["arxiv"] == "2112.01767"
    # one arm: no paired comparison, the two "works" claims against the trivial baselines
    assert {c["id"] for c in results["claims"]} == {"segmentation_works", "classification_works"}
    for c in results["claims"]:
        assert c["seeds"] == [0] and c["preset"] == "smoke"
    titles = [t["title"] for t in results["tables"]]
    assert [t.split(" ")[0] for t in titles[:4]] == ["Test", "Test", "PH2-like", "PH2-like"]
    assert titles[4].startswith("Test sensitivity (%) at the threshold giving 89% specificity on validation")
    assert titles[5].startswith("Masked-fraction sweep") and titles[6].startswith("Cost per unit")
    # the sweep's rows: the asked fraction and the main run's 100% (its units reused, not retrained)
    assert [r[0] for r in results["tables"][5]["rows"]] == ["50%", "100%"]
    assert titles[7].startswith("Parameters and latency")
    cls = unit_result(run_dir, "main")["test"]["cls"]  # the diagnostics of the classification checkpoint
    assert 0.0 <= cls["attention_in_lesion"] <= 100.0
    for key in ("melanoma_sens_at_fixed_spec", "melanoma_spec_at_fixed_spec", "sk_sens_at_fixed_spec"):
        assert key in cls
    seg = results["tables"][0]
    assert seg["columns"] == ["arm", "seeds", "jaccard", "dice", "accuracy", "sensitivity", "specificity"]
    assert [r[0] for r in seg["rows"]] == [ARM, results["trivial"]["seg_name"]]
    assert set(results["figures"]) == {f"figures/{n}.png" for n in ("arms", "roc", "masked_fraction", "masks")}
    for fig in results["figures"]:
        assert (run_dir / fig).stat().st_size > 2000, fig
    assert results["cost"]["world_size"] == 1 and results["cost"]["wall_time_s"] > 0
    assert results["architecture"]["miniature"]["params"] == unit_result(run_dir, "main")["params"]
    info = results["data"]
    assert info["masked"] == {"images": 16, "with_mask": 16, "class_counts": info["masked"]["class_counts"]}
    assert info["unmasked"]["images"] == 16 and info["unmasked"]["with_mask"] == 0
    for split in ("val", "test", "shifted_test"):
        assert 0 <= results["trivial"][split]["seg"]["jaccard"] <= 100


def test_every_unit_saves_weights_card_and_result(smoke_run):
    run_dir, _ = smoke_run
    for which, fraction in (("main", 1.0), ("sweep", 0.5)):
        unit = run_dir / UNITS[which]
        assert (unit / "model.safetensors").stat().st_size > 10_000
        card = json.loads((unit / "card.json").read_text())
        assert (card["recipe"], card["arm"], card["seed"], card["image_size"]) == ("mt_transunet", ARM, 0, 32)
        assert card["classes"] == list(CLASSES) and card["model"]["dim"] == 32 and card["model"]["weights"] == ""
        res = unit_result(run_dir, which)
        assert (res["arm"], res["seed"], res["steps"], res["masked_fraction"]) == (ARM, 0, 2, fraction)
        # 16 (or 8) masked images, 4 per batch of 8
        assert res["steps_per_epoch"] == 4  # one ramp schedule for every masked fraction (16 masked / 4 per batch)
        assert [p["step"] for p in res["curve"]] == [1, 2]  # eval_every 1
        for task, key in (("seg", "val_jaccard"), ("cls", "val_mean_auc")):
            scores = [p[key] for p in res["curve"]]
            assert res["best_step"][task] == res["curve"][int(np.argmax(scores))]["step"]
            assert res["val"][task]["jaccard" if task == "seg" else "mean_auc"] == pytest.approx(max(scores))
        for split, n in (("test", 24), ("shifted_test", 16)):
            assert set(res[split]) == {"seg", "cls", "cls_probs"}
            assert np.asarray(res[split]["cls_probs"]).shape == (n, 3)
            assert 0 <= res[split]["seg"]["jaccard"] <= 100
    # the sweep unit trained on its own streams
    assert unit_result(run_dir, "sweep")["curve"] != unit_result(run_dir, "main")["curve"]


def test_no_test_read_reaches_selection(smoke_run):
    """Every read of a test split is a final test or a figure, each unit reads each test split once, after all
    of its validation reads, and the figures read after every unit finished."""
    run_dir, _ = smoke_run
    entries = read_jsonl(run_dir / "access_log.jsonl")
    assert [e["index"] for e in entries] == list(range(len(entries)))
    held_out = {"test", "shifted_test"}
    assert {e["purpose"] for e in entries if e["split"] in held_out} <= {"final_test", "figure"}
    assert {e["purpose"] for e in entries if e["split"] == "val"} <= {"selection", "calibration", "figure"}
    assert all(e["unit"] == "figures" for e in entries if e["purpose"] == "figure")
    assert {e["unit"] for e in entries} == {*UNIT_NAMES.values(), "trivial", "figures"}
    for unit in [*UNIT_NAMES.values(), "trivial"]:
        mine = [e for e in entries if e["unit"] == unit]
        vals = [e["index"] for e in mine if e["split"] == "val"]
        assert vals, unit
        for split in held_out:
            reads = [e["index"] for e in mine if e["split"] == split]
            assert len(reads) == 1, f"{unit} read {split} {len(reads)} times"
            assert max(vals) < reads[0], f"{unit} read validation after {split}"
    for unit in UNIT_NAMES.values():
        assert sum(e["unit"] == unit and e["purpose"] == "selection" for e in entries) == 2  # 2 steps, eval_every 1
    last_unit_read = max(e["index"] for e in entries if e["unit"] in UNIT_NAMES.values())
    assert min(e["index"] for e in entries if e["unit"] == "figures") > last_unit_read


# ----------------------------------------------------------------------------------------- reruns


def test_rerun_retrains_a_missing_unit_exactly_and_reuses_the_finished_one(smoke_run, tmp_path, data_dir):
    """Delete the sweep unit: a rerun trains it again (after the reused main unit, so with other global random
    state) and gets the same curves, metrics and weights; the finished main unit is not touched."""
    run_dir, _ = smoke_run
    copy = copy_run(run_dir, tmp_path)
    shutil.rmtree(copy / UNITS["sweep"])
    before = mtimes(copy / UNITS["main"])
    train(smoke(tmp_path, data_dir, *RUN_ARGS, "stages=[data,train]"))
    assert mtimes(copy / UNITS["main"]) == before
    again, first = unit_result(copy, "sweep"), unit_result(run_dir, "sweep")
    for key in UNIT_KEYS:
        assert again[key] == first[key], key
    w_again, w_first = (
        load_file(copy / UNITS["sweep"] / "model.safetensors"),
        load_file(run_dir / UNITS["sweep"] / "model.safetensors"),
    )
    assert w_again.keys() == w_first.keys()
    assert all(torch.equal(w_again[k], w_first[k]) for k in w_first)
    records = [r for r in read_jsonl(copy / "metrics.jsonl") if r.get("unit") == UNIT_NAMES["sweep"] and "total" in r]
    assert [r["step"] for r in records] == [1, 2]  # the rerun replaced the unit's records, not appended to them


def test_rerun_of_a_finished_run_trains_nothing(smoke_run, tmp_path, data_dir, no_training):
    run_dir, results = smoke_run
    copy = copy_run(run_dir, tmp_path)
    before = mtimes(copy / "units")
    again = train(smoke(tmp_path, data_dir, *RUN_ARGS))
    assert mtimes(copy / "units") == before
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]
    assert again["tables"][:5] == results["tables"][:5]


def test_eval_stage_alone_rebuilds_claims_tables_and_figures(smoke_run, tmp_path, data_dir, no_training):
    run_dir, results = smoke_run
    copy = copy_run(run_dir, tmp_path)
    (copy / "results.json").unlink()
    shutil.rmtree(copy / "figures")
    again = train(smoke(tmp_path, data_dir, *RUN_ARGS, "stages=[eval]"))
    assert [(c["id"], c["values"]) for c in again["claims"]] == [(c["id"], c["values"]) for c in results["claims"]]
    assert again["tables"][:6] == results["tables"][:6]  # all but the (timed) latency table
    assert set(again["figures"]) == set(results["figures"])
    assert all((copy / f).is_file() for f in again["figures"])
    # the eval stage reads the test splits only for the trivial baselines and the figures
    new = read_jsonl(copy / "access_log.jsonl")[len(read_jsonl(run_dir / "access_log.jsonl")) :]
    assert {e["unit"] for e in new} == {"trivial", "figures"}


# --------------------------------------------------------------------------------------------- batches


def disc_masks(n: int, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radii = torch.linspace(5, 10, n)
    return torch.stack([((yy - 15) ** 2 + (xx - 16) ** 2 <= r * r).long() for r in radii])


def hand_set(has_mask: list[bool], size: int = 32) -> LesionSet:
    """Random images with disc masks on *every* row (also where ``has_mask`` is False: a mask-free row's mask
    must not be read)."""
    n = len(has_mask)
    gen = torch.Generator().manual_seed(0)
    raw = (torch.rand(n, size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    images = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255
    labels = torch.arange(n) % len(CLASSES)
    return LesionSet(images, disc_masks(n, size), torch.tensor(has_mask), labels, raw)


def test_make_batch_computes_the_sdf_only_for_masked_images_with_dtc_sign():
    cfg = MTTransUNetConfig()
    cfg.data.augment.crop_prob, cfg.data.augment.flip = 0.0, False  # the identity
    part = hand_set([True, False, True, False])
    batch = make_batch(part, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert batch.images.shape == (4, 3, 32, 32) and batch.sdf.shape == (4, 1, 32, 32)
    torch.testing.assert_close(batch.images, part.images)
    assert torch.equal(batch.masks, part.masks) and torch.equal(batch.has_mask, part.has_mask)
    assert torch.equal(batch.labels, part.labels)
    sdf = batch.sdf[:, 0]
    assert torch.all(sdf[1] == 0) and torch.all(sdf[3] == 0)
    for i in (0, 2):
        inside = part.masks[i].bool()
        assert torch.all(sdf[i][inside] <= 0) and torch.all(sdf[i][~inside] > 0)
        assert float(sdf[i].min()) == -1.0 and float(sdf[i].max()) == 1.0
        assert torch.equal(torch.sigmoid(-1500 * sdf[i]) >= 0.5, inside)
        np.testing.assert_array_equal(sdf[i].numpy(), normalised_sdf(part.masks[i].numpy().astype(np.uint8)))


def test_make_batch_sdf_follows_the_augmented_masks():
    cfg = MTTransUNetConfig()
    cfg.data.augment.crop_prob = 1.0
    part = hand_set([True] * 6 + [False] * 2)
    batch = make_batch(part, cfg, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert not torch.equal(batch.masks, part.masks)  # cropped and flipped
    for i in range(6):
        inside = batch.masks[i].bool()
        assert torch.equal(batch.sdf[i, 0] <= 0, inside), i
    assert torch.all(batch.sdf[6:] == 0)
    # seeded: the same generator state gives the same batch
    again = make_batch(part, cfg, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(again.images, batch.images) and torch.equal(again.sdf, batch.sdf)


# ------------------------------------------------------------------------------------------------ losses


def smoke_model_and_batch(*, loss: dict | None = None) -> tuple[MTTransUNetConfig, torch.nn.Module, Batch]:
    _, cfg = load_config("mt_transunet", "smoke", [f"loss.{k}={v}" for k, v in (loss or {}).items()])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=len(CLASSES), image_size=32)
    part = hand_set([True, True, True, False, False, False])
    masks = part.masks
    sdf = torch.from_numpy(normalised_sdf(masks.numpy().astype(np.uint8))) * part.has_mask[:, None, None]
    return cfg, model, Batch(part.images, masks, sdf[:, None], part.has_mask, part.labels)


def test_cls_only_is_the_plain_cross_entropy_with_weight_one():
    cfg, model, batch = smoke_model_and_batch()
    model.eval()
    with torch.no_grad():
        parts = compute_loss(ARM_SPECS["cls_only"], model, batch, cfg, ramp=0.5)
        ce = F.cross_entropy(model(batch.images).cls_logits, batch.labels)
        # the other arms weigh CE_cls by 0.25
        both = compute_loss(ARM_SPECS["seg+cls"], model, batch, cfg, ramp=0.5)
        full = compute_loss(ARM_SPECS[ARM], model, batch, cfg, ramp=0.5)
    assert float(parts.total) == pytest.approx(float(ce), rel=1e-6)
    assert float(parts.cls) == pytest.approx(float(ce), rel=1e-6)
    assert parts.seg == parts.sdf == parts.cons == 0
    assert float(both.total) == pytest.approx(float(both.seg) + 0.25 * float(ce), rel=1e-6)
    want = full.seg + 0.5 * full.cons + 5 * full.sdf + 0.25 * full.cls
    assert float(full.total) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("arm", ARMS)
def test_a_mask_free_images_mask_changes_no_loss(arm):
    """Rewriting the mask and SDF of the rows without a mask leaves every term (the optional ones on) unchanged;
    those rows still feed CE_cls (their labels and images) and L_cons (their images), and nothing else. Eval mode:
    rows do not meet in BatchNorm."""
    cfg, model, batch = smoke_model_and_batch(loss={"att_weight": 0.1, "ds_weight": 0.1})
    model.eval()
    spec, free = ARM_SPECS[arm], ~batch.has_mask
    gen = torch.Generator().manual_seed(1)
    masks, sdf = batch.masks.clone(), batch.sdf.clone()
    masks[free] = (torch.rand(masks[free].shape, generator=gen) < 0.5).long()
    sdf[free] = torch.rand(sdf[free].shape, generator=gen) * 2 - 1
    base = compute_loss(spec, model, batch, cfg, ramp=0.7).floats()
    other = compute_loss(spec, model, Batch(batch.images, masks, sdf, batch.has_mask, batch.labels), cfg, 0.7)
    assert other.floats() == base

    labels = batch.labels.clone()
    labels[free] = (labels[free] + 1) % len(CLASSES)
    relabelled = compute_loss(
        spec, model, Batch(batch.images, batch.masks, batch.sdf, batch.has_mask, labels), cfg, 0.7
    )
    assert (relabelled.floats()["cls"] != base["cls"]) == spec.cls
    assert {k: v for k, v in relabelled.floats().items() if k not in ("cls", "total")} == {
        k: v for k, v in base.items() if k not in ("cls", "total")
    }
    # which terms the mask-free rows' images reach: the gradient of each term with respect to those rows
    images = batch.images.clone().requires_grad_(True)
    parts = compute_loss(spec, model, Batch(images, batch.masks, batch.sdf, batch.has_mask, batch.labels), cfg, 0.7)
    reach = {}
    for term in ("seg", "sdf", "cons", "cls", "att", "ds"):
        t = getattr(parts, term)
        grad = torch.autograd.grad(t, images, retain_graph=True, allow_unused=True)[0] if t.requires_grad else None
        reach[term] = grad is not None and bool(grad[free].abs().sum() > 0)
        if grad is not None and term in ("seg", "sdf", "att", "ds"):
            assert bool(grad[~free].abs().sum() > 0), term  # the masked rows do count
    assert reach == {"seg": False, "sdf": False, "cons": spec.dual, "cls": spec.cls, "att": False, "ds": False}


UNUSED = {
    "seg_only": {"cls_head", "sdf_head", "ds_head"},
    "cls_only": {"seg_head", "sdf_head", "ds_head", "decoder"},
    "seg+cls": {"sdf_head", "ds_head"},
    "seg+dual": {"cls_head", "ds_head"},
    "seg+cls+dual": {"ds_head"},
    "seg+cls+dual+cs": {"ds_head"},
    "seg+cls+dual+ac": {"ds_head"},
}


@pytest.mark.parametrize(("arm", "ds_weight"), [*[(a, 0.0) for a in ARMS], (ARM, 0.5)])
def test_the_gradient_reaches_exactly_the_parameters_the_arm_uses(arm, ds_weight):
    cfg, model, batch = smoke_model_and_batch(loss={"ds_weight": ds_weight})
    model.train()
    with torch.no_grad():  # a CLS token away from its zero init: at init LayerNorm maps it to 0, so in cls_only
        model.cls_token.normal_(std=0.02)  # (one layer, only the CLS query read) the query weight gets no gradient
    compute_loss(ARM_SPECS[arm], model, batch, cfg, ramp=0.5).total.backward()
    names = [n for n, _ in model.named_parameters()]
    assert not any("pos_embed" in n for n in names) and "cls_token" in names
    got = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    unused = UNUSED[arm] - ({"ds_head"} if ds_weight else set())
    want = {n for n in names if n.split(".")[0] not in unused}
    assert got == want, (sorted(want - got), sorted(got - want))
    # the trunk (stem, tokens, Transformer) always learns
    assert {n.split(".")[0] for n in got} >= {"stem", "patch_embed", "cls_token", "encoder"}


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("batch_size=7", "'batch_size'"),
        ("batch_size=0", "'batch_size'"),
        ("arms=[seg+cls,seg+cls+dual+xyz]", "'arms'"),
        ("sweep.arms=[dual]", "'sweep.arms'"),
        ("stages=[fit]", "'stages'"),
        ("loss.cons_on=sigmoid", "'loss.cons_on'"),
        ("data.source=web", "'data.source'"),
        ("data.source=isic2017", "'data.real.root'"),
        ("model.backbone=vit_l16", "'model.backbone'"),
        ("model.pos_embed=sine", "'model.pos_embed'"),
        ("model.num_heads=3", "'model.dim'"),
        ("data.image_size=8", "'data.image_size'"),
        ("data.masked_fraction=0", "data.masked_fraction"),
        ("sweep.masked_fractions=[0.5,1.5]", "sweep.masked_fractions"),
        ("data.augment.crop_fraction=[0.3,0.1]", "data.augment.crop_fraction"),
        ("steps_per_epoch=-1", "'steps_per_epoch'"),
        ("max_step=3", "max_steps"),
    ],
)
def test_bad_config_is_a_clear_error_naming_the_key(override, match, tmp_path, capsys):
    assert main(["run", "mt_transunet", "--preset", "smoke", f"out_dir={tmp_path}", override]) == EXIT_USAGE
    assert match in capsys.readouterr().err
    assert not (tmp_path / "mt_transunet").exists()


def test_training_lowers_the_loss(tmp_path, data_dir):
    """40 steps of the full method on the smoke data: the logged total loss falls (the card's "the loss falls")."""
    cfg = smoke(tmp_path, data_dir, f"arms=[{ARM}]", "seeds=[0]", "max_steps=40", "eval_every=40", "log_every=5",
                "stages=[data,train]")  # fmt: skip
    train(cfg)
    run_dir = tmp_path / "mt_transunet" / "smoke"
    totals = [r["total"] for r in read_jsonl(run_dir / "metrics.jsonl") if "total" in r]
    assert len(totals) == 8
    assert np.mean(totals[-2:]) < 0.7 * np.mean(totals[:2])
