"""Recipe data (pre-training cubes, target-task sets, label fractions), config checks and fine-tuning pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thrifty.core.config import ConfigError, load_config
from thrifty.core.splits import AccessLog
from thrifty.data.ct_phantom import generate_cohort
from thrifty.methods.genesis.config import GenesisConfig, parse_arm
from thrifty.methods.genesis.data import dense_score, fraction_patients, prepare_data, sample_cubes, task_set
from thrifty.methods.genesis.finetune import build_network, iou_dice, soft_dice_loss
from thrifty.methods.genesis.model import UNet3D, encoder_state_dict, save_weights

THR = (-150 + 1000) / 2000  # -150 HU in the [0, 1] window


def _cfg(*overrides: str) -> GenesisConfig:
    return load_config(GenesisConfig, None, list(overrides))


# --------------------------------------------------------------------------------------------------- config


def test_arms_parse_with_aliases() -> None:
    assert parse_arm("scratch") is None
    assert parse_arm("inpaint/on") == ("inpaint", True)
    assert parse_arm("transvw") == ("genesis", True)
    with pytest.raises(ValueError, match="unknown arm"):
        parse_arm("genesis/maybe")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("arms=[scratch,jigsaw/on]", "unknown arm"),
        ("arms=[genesis/on,transvw]", "twice"),
        ("data.cube=[12,32,32]", "divisible by 8"),
        ("data.cube=[16,32,24]", "h and w must be equal"),
        ("discovery.num_classes=100", "exceeds"),
        ("finetune.label_fractions=[0.0]", "label_fractions"),
        ("pretrain.optimizer=rmsprop", "optimizer"),
        ("finetune.task=ecc", "finetune.task"),
        ("pretrain.lambda_cls=abc", "lambda_cls"),
    ],
)
def test_bad_config_is_one_clear_error(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(override)


def test_selectors_narrow_arms_and_tasks() -> None:
    cfg = _cfg("pretrain.pretext=rotation", "pretrain.visual_words=true", "finetune.task=ncs")
    assert cfg.canonical_arms == ["scratch", "rotation/on"]
    assert cfg.tasks == ["ncs"]
    assert "pretrain.pretext" in cfg.SELECTORS
    assert isinstance(_cfg("pretrain.lambda_cls=0.5").pretrain.lambda_cls, float)  # float, not the release's int


# ----------------------------------------------------------------------------------------------------- cubes


def test_dense_score_reads_the_release_lookahead() -> None:
    air = np.zeros((6, 4, 4), np.float32)
    assert dense_score(air) == 0.0
    tissue = np.ones((6, 4, 4), np.float32)
    assert dense_score(tissue) == 1.0
    cube = np.zeros((6, 4, 4), np.float32)
    cube[4:] = 1.0  # slices 4 and 5 dense; output slices are 0..3 (6 - lookahead + 1)
    scores = dense_score(cube)
    # slices 0 and 1 see no dense slice in their next three (score 0); slice 2 meets one at k = 2 (1 - 2/2 = 0);
    # slice 3 at k = 1 (1 - 1/2 = 0.5)
    assert scores == pytest.approx(0.5 / 4)


def test_sample_cubes_respects_margin_and_filter() -> None:
    vol = np.ones((24, 40, 40), np.float32)  # solid tissue …
    vol[:, 10:30, 10:30] = 0.0  # … with an air hole in the middle
    rng = np.random.default_rng(0)
    cubes = sample_cubes(vol, count=6, cube=(8, 8, 8), margin=(2, 4, 4), max_dense_fraction=0.1, rng=rng)
    assert cubes.shape[1:] == (8, 8, 8) and 0 < len(cubes) <= 6
    for c in cubes:
        assert (c >= THR).mean() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="too small"):
        sample_cubes(vol, count=1, cube=(24, 8, 8), margin=(2, 4, 4), max_dense_fraction=1.0, rng=rng)


def test_task_set_labels_and_masks_come_from_the_phantom() -> None:
    patients = generate_cohort(2, seed=5)
    ts = task_set(patients, cube=(16, 32, 32), negatives_per_positive=2, jitter=2, seed=0)
    n_pos = sum(len(p.nodules) for p in patients)
    assert int(ts.ncc_labels.sum()) == n_pos
    assert int((ts.ncc_labels == 0).sum()) <= 2 * n_pos
    assert ts.ncs_cubes.shape == (n_pos, 1, 16, 32, 32) == ts.ncs_masks.shape
    assert set(ts.ncs_masks.unique().tolist()) <= {0.0, 1.0}
    assert (ts.ncs_masks.flatten(1).sum(1) > 0).all()  # every segmentation cube holds its nodule
    assert float(ts.ncc_cubes.min()) >= 0.0 and float(ts.ncc_cubes.max()) <= 1.0
    sub = ts.subset([1])
    assert sub.patients == [patients[1].index]
    assert int(sub.ncc_labels.sum()) == len(patients[1].nodules)


def test_label_fractions_are_nested_and_fixed() -> None:
    small, big = fraction_patients(40, 0.1, seed=0), fraction_patients(40, 0.5, seed=0)
    assert len(small) == 4 and len(big) == 20 and set(small) <= set(big)
    assert fraction_patients(40, 0.1, seed=0) == small
    assert fraction_patients(40, 1.0, seed=0) == list(range(40))
    assert len(fraction_patients(3, 0.01, seed=0)) == 1


def test_prepare_data_keeps_cohorts_and_splits_apart(tmp_path) -> None:
    cfg = _cfg(
        "data.unlabelled_patients=6",
        "data.target_patients=[3,2,2]",
        "data.cubes_per_patient=2",
        "discovery.num_classes=2",
        "discovery.top_k_train=2",
        "discovery.top_k_val=1",
    )
    log = AccessLog()
    data = prepare_data(cfg, tmp_path, log)
    m = data.manifest
    assert m["unlabelled_cohort"]["phantom_seed"] != m["target_cohort"]["phantom_seed"]
    assert not set(m["pretrain_train"]) & set(m["pretrain_val"])
    splits = [set(m["target_train"]), set(m["target_val"]), set(m["target_test"])]
    assert all(not a & b for i, a in enumerate(splits) for b in splits[i + 1 :])
    assert set(m["label_fractions"]["0.2"]) <= splits[0]
    assert data.cubes_train.shape[1:] == (1, 16, 32, 32)
    with pytest.raises(PermissionError):
        data.target_test.get("selection", "u")
    data.target_test.get("final_test", "u")
    assert log.entries == [{"index": 0, "split": "test", "purpose": "final_test", "unit": "u"}]


# ------------------------------------------------------------------------------------------------ fine-tuning


def test_iou_and_dice_known_values() -> None:
    pred = torch.zeros(3, 1, 2, 2, 2, dtype=torch.bool)
    target = torch.zeros_like(pred)
    pred[0, 0, 0, 0, :] = True  # 2 voxels
    target[0, 0, 0, 0, 0] = True  # 1 voxel, inside: IoU 1/2, Dice 2/3
    pred[1, 0, 1] = True
    target[1, 0, 0] = True  # disjoint: 0, 0
    iou, dice = iou_dice(pred, target)  # third: both empty → 1, 1
    assert iou == pytest.approx([0.5, 0.0, 1.0])
    assert dice == pytest.approx([2 / 3, 0.0, 1.0])


def test_soft_dice_is_zero_for_a_perfect_prediction() -> None:
    target = (torch.rand(2, 1, 4, 4, 4) > 0.5).float()
    assert float(soft_dice_loss(100 * (2 * target - 1), target)) == pytest.approx(0.0, abs=1e-4)
    assert float(soft_dice_loss(-100 * (2 * target - 1), target)) > 0.9


def test_fine_tuning_networks_load_what_pre_training_exported(tmp_path) -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    unet = UNet3D(width=cfg.pretrain.width)
    save_weights(unet, tmp_path / "unet.safetensors", {"part": "unet"})
    save_weights(encoder_state_dict(unet), tmp_path / "encoder.safetensors", {"part": "encoder"})
    seg, how = build_network("ncs", cfg, tmp_path)
    assert how == "unet"
    for k, v in unet.state_dict().items():
        assert torch.equal(seg.state_dict()[k], v), k  # encoder, decoder and head transfer
    cls, how = build_network("ncc", cfg, tmp_path)
    assert how == "encoder"
    for k, v in unet.encoder.state_dict().items():
        assert torch.equal(cls.encoder.state_dict()[k], v), k
    (tmp_path / "unet.safetensors").unlink()
    seg2, how = build_network("ncs", cfg, tmp_path)  # rotation arms export no decoder: encoder only
    assert how == "encoder"
    assert torch.equal(seg2.encoder.levels[0][0][0].weight, unet.encoder.levels[0][0][0].weight)
    assert build_network("ncc", cfg, None)[1] == "scratch"


@pytest.mark.parametrize("preset", ["smoke", "quick", "cpu", "full"])
def test_every_preset_loads(preset: str) -> None:
    from thrifty.core.registry import load_config as load_recipe

    _, cfg = load_recipe("genesis", preset, ["data.root=/data/LUNA16"] if preset == "full" else [])
    assert cfg.preset == preset
    if preset == "full":
        assert cfg.data.source == "luna16" and cfg.pretrain.width == 1.0 and cfg.data.cube == [32, 64, 64]
