"""The Models Genesis release's NCS metric (two-class mean IoU averaged over thresholds 0.5 … 0.95) and its
Dice-only loss, beside ours: known values on hand-made masks, the loss's value and gradient, the config switch,
and the metric in the NCS score dict and the NCS table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from thrifty.core.config import ConfigError, load_config
from thrifty.core.run import MetricsLog
from thrifty.core.splits import AccessLog, Guarded
from thrifty.methods.genesis import finetune as ft
from thrifty.methods.genesis.config import GenesisConfig
from thrifty.methods.genesis.data import TEST_PURPOSES, VAL_PURPOSES, GenesisData, TaskSet
from thrifty.methods.genesis.finetune import (
    RELEASE_THRESHOLDS,
    release_mean_iou,
    score,
    segmentation_loss,
    soft_dice_loss,
)
from thrifty.methods.genesis.train import task_table

CUBE = (8, 16, 16)  # d, h, w: divisible by 8 on every axis


def _cfg(*overrides: str) -> GenesisConfig:
    return load_config(GenesisConfig, None, list(overrides))


def _masks(n: int, k: int) -> torch.Tensor:
    """(n, 1, *CUBE) float masks, each with a k-voxel nodule at the start of its first row."""
    m = torch.zeros(n, 1, *CUBE)
    m.view(n, -1)[:, :k] = 1.0
    return m


def _numpy_release_miou(prob: np.ndarray, target: np.ndarray) -> float:
    """An independent reading of the release: a 2×2 confusion matrix per threshold (np.arange(0.5, 1, 0.05)),
    mean over classes with a non-zero union, mean over thresholds, in %."""
    y = (target.ravel() > 0.5).astype(np.int64)
    per_t = []
    for t in np.arange(0.5, 1.0, 0.05):
        p = (prob.ravel() > t).astype(np.int64)
        cm = np.bincount(2 * y + p, minlength=4).reshape(2, 2)  # rows: truth, columns: prediction
        union = cm.sum(0) + cm.sum(1) - np.diag(cm)
        valid = union > 0
        per_t.append(float((np.diag(cm)[valid] / union[valid]).mean()) if valid.any() else 0.0)
    return 100 * float(np.mean(per_t))


# --------------------------------------------------------------------------------------------------- metric


def test_release_thresholds_are_the_release_arange() -> None:
    assert list(RELEASE_THRESHOLDS) == pytest.approx(list(np.arange(0.5, 1.0, 0.05)))
    assert len(RELEASE_THRESHOLDS) == 10


def test_perfect_prediction_scores_100() -> None:
    target = _masks(3, 20)
    assert release_mean_iou(target.clone(), target) == pytest.approx(100.0)
    assert release_mean_iou(0.99 * target + 0.001, target) == pytest.approx(100.0)


def test_all_background_prediction_scores_half_the_background_share() -> None:
    n, k = 2, 20
    target = _masks(n, k)
    voxels = n * int(np.prod(CUBE))
    background_share = (voxels - n * k) / voxels
    # background IoU = share of background voxels, nodule IoU = 0, mean of the two classes
    got = release_mean_iou(torch.zeros_like(target), target)
    assert got == pytest.approx(50 * background_share)
    assert 49 < got < 50  # the background class alone keeps it near 50


def test_empty_truth_and_empty_prediction_score_100() -> None:
    target = torch.zeros(2, 1, *CUBE)  # the nodule class has no union: it is left out, as TF's mean_iou does
    assert release_mean_iou(torch.zeros_like(target), target) == pytest.approx(100.0)


def test_thresholds_are_averaged_and_strict() -> None:
    n, k = 1, 40
    target = _masks(n, k)
    voxels = int(np.prod(CUBE))
    missed = 50 * (voxels - k) / voxels  # every nodule voxel below the threshold
    prob = 0.72 * target  # above 0.5 … 0.70 (5 thresholds), below 0.75 … 0.95 (5)
    assert release_mean_iou(prob, target) == pytest.approx((5 * 100 + 5 * missed) / 10)
    prob = 0.5 * target  # y_pred > t is strict: 0.5 is not above 0.5
    assert release_mean_iou(prob, target) == pytest.approx(missed)
    prob = torch.where(target > 0, torch.tensor(0.96), torch.tensor(0.6))  # background above 0.5 … 0.55 only
    fp_iou = 100 * k / voxels / 2  # the whole cube predicted nodule: nodule IoU k/voxels, background 0
    assert release_mean_iou(prob, target) == pytest.approx((2 * fp_iou + 8 * 100) / 10)


def test_matches_an_independent_confusion_matrix_on_random_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(4, 1, *CUBE, generator=gen) > 0.8).float()
    prob = (0.6 * target + 0.5 * torch.rand(target.shape, generator=gen)).clamp(0, 1)
    assert release_mean_iou(prob, target) == pytest.approx(_numpy_release_miou(prob.numpy(), target.numpy()))


def test_one_confusion_matrix_over_the_set_not_a_mean_over_cubes() -> None:
    k = 30
    target = _masks(2, k)
    prob = target.clone()
    prob[1] = 0.0  # cube 0 perfect, cube 1 misses its nodule
    voxels = 2 * int(np.prod(CUBE))
    pooled = 50 * ((voxels - 2 * k) / (voxels - k) + k / (2 * k))
    assert release_mean_iou(prob, target) == pytest.approx(pooled)
    per_cube = np.mean([release_mean_iou(prob[i : i + 1], target[i : i + 1]) for i in range(2)])
    assert release_mean_iou(prob, target) != pytest.approx(per_cube)


# ----------------------------------------------------------------------------------------------------- loss


def test_dice_only_loss_is_one_minus_the_batch_soft_dice_and_has_gradients() -> None:
    gen = torch.Generator().manual_seed(1)
    target = (torch.rand(2, 1, *CUBE, generator=gen) > 0.7).float()
    logits = torch.randn(target.shape, generator=gen, requires_grad=True)
    loss = segmentation_loss(logits, target, kind="dice")
    p = torch.sigmoid(logits.detach())
    expected = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)  # the release's dice_coef, smooth 1
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(float(soft_dice_loss(logits.detach(), target, pooled=True)))
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # descending the gradient lowers the loss
    with torch.no_grad():
        stepped = logits - 10.0 * logits.grad
    assert float(segmentation_loss(stepped, target, kind="dice")) < float(loss.detach())


def test_default_loss_is_unchanged_and_a_bad_name_is_refused() -> None:
    gen = torch.Generator().manual_seed(2)
    target = (torch.rand(2, 1, *CUBE, generator=gen) > 0.7).float()
    logits = torch.randn(target.shape, generator=gen)
    ours = nn.functional.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)
    assert float(segmentation_loss(logits, target)) == pytest.approx(float(ours))
    assert float(segmentation_loss(logits, target, kind="bce_dice")) == pytest.approx(float(ours))
    with pytest.raises(ValueError, match="unknown segmentation loss"):
        segmentation_loss(logits, target, kind="focal")


def test_config_selects_the_loss_and_rejects_a_bad_name() -> None:
    assert _cfg().finetune.seg_loss == "bce_dice"
    assert _cfg("finetune.seg_loss=dice").finetune.seg_loss == "dice"
    with pytest.raises(ConfigError, match=r"finetune\.seg_loss"):
        _cfg("finetune.seg_loss=focal")


# ------------------------------------------------------------------------------------- scores and tables


def _ncs_set(logits: torch.Tensor, masks: torch.Tensor) -> TaskSet:
    """A TaskSet whose NCS cubes are the logits an identity network returns."""
    n = len(masks)
    return TaskSet(
        ncc_cubes=torch.zeros(0, 1, *CUBE),
        ncc_labels=torch.zeros(0, dtype=torch.long),
        ncc_patient=torch.zeros(0, dtype=torch.long),
        ncs_cubes=logits,
        ncs_masks=masks,
        ncs_patient=torch.arange(n),
        patients=list(range(n)),
    )


def test_ncs_score_reports_the_release_metric_beside_iou_and_dice() -> None:
    masks = _masks(3, 24)
    prob = 0.78 * masks
    prob[:, :, 0, 0, :4] = 0.02  # below every threshold: four nodule voxels per cube missed: foreground IoU 20/24
    logits = torch.logit(prob.clamp(1e-4, 1 - 1e-4))
    split = _ncs_set(logits, masks)
    cfg = _cfg("channels_last=false")
    for thr in (0.5, None):
        s = score("ncs", nn.Identity(), split, cfg, torch.device("cpu"), threshold=thr)
        assert {"iou", "dice", "release_miou", "threshold"} <= set(s)
        assert s["iou"] == pytest.approx(100 * 20 / 24)
        assert s["dice"] == pytest.approx(100 * 40 / 44)
        expected = release_mean_iou(torch.sigmoid(logits), masks)
        assert s["release_miou"] == pytest.approx(expected)
        # 0.78 is above 0.5 … 0.75 only: six thresholds see 20 of 24 voxels, four see none
        voxels = 3 * int(np.prod(CUBE))
        seen = 50 * ((voxels - 72) / (voxels - 60) + 60 / 72)
        missed = 50 * (voxels - 72) / voxels
        assert s["release_miou"] == pytest.approx((6 * seen + 4 * missed) / 10)


def test_ncs_table_has_the_release_column() -> None:
    cfg = _cfg("arms=[scratch]")
    result = {"test": {"iou": 40.0, "dice": 55.0, "release_miou": 70.0, "threshold": 0.5}, "val": 41.0}
    results = {"ncs": {0.2: {"scratch": {0: result, 1: {**result, "test": {**result["test"], "release_miou": 72.0}}}}}}
    table = task_table(cfg, results, "ncs", 0.2)
    col = next(i for i, c in enumerate(table["columns"]) if "release" in c)
    assert "IoU" in table["columns"][2] and "Dice" in table["columns"][3] and col == 4
    assert table["rows"][0][col].startswith("71")
    old = {"test": {"iou": 40.0, "dice": 55.0, "threshold": 0.5}, "val": 41.0}  # written before the metric existed
    table = task_table(cfg, {"ncs": {0.2: {"scratch": {0: old}}}}, "ncs", 0.2)
    assert table["rows"][0][col] == ""
    assert "release" not in " ".join(task_table(cfg, {}, "ncc", 0.2)["columns"])


def test_finetune_trains_ncs_with_the_configured_loss(tmp_path, monkeypatch) -> None:
    cfg = _cfg(
        "finetune.seg_loss=dice",
        "finetune.max_steps=2",
        "finetune.eval_every=1",
        "finetune.batch_size=2",
        "channels_last=false",
    )
    masks = _masks(4, 24)
    ts = _ncs_set(torch.rand(4, 1, *CUBE), masks)
    access = AccessLog()
    data = GenesisData(
        pool_train=torch.zeros(0),
        pool_val=torch.zeros(0),
        lung_train=np.zeros(0),
        lung_val=np.zeros(0),
        labels_train=np.zeros(0),
        cubes_train=torch.zeros(0),
        cubes_val=torch.zeros(0),
        target_train=ts,
        target_val=Guarded("val", ts, access, allowed=VAL_PURPOSES),
        target_test=Guarded("test", ts, access, allowed=TEST_PURPOSES),
        manifest={},
    )
    kinds: list[str] = []
    real = ft.segmentation_loss

    def spy(logits: torch.Tensor, target: torch.Tensor, *, kind: str = "bce_dice") -> torch.Tensor:
        kinds.append(kind)
        return real(logits, target, kind=kind)

    monkeypatch.setattr(ft, "segmentation_loss", spy)
    res = ft.finetune(
        "ncs", "scratch", 1.0, 0, cfg, data, None, tmp_path, MetricsLog(tmp_path / "m.jsonl"), torch.device("cpu")
    )
    assert kinds == ["dice", "dice"]
    assert {"iou", "dice", "release_miou"} <= set(res["test"])
