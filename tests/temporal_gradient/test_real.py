"""The real-video path of the temporal-gradient recipe (Xiao et al., CVPR 2022, arXiv 2111.13241): a UCF-101 layout of
videos this test writes with PyAV, read clip by clip, held-out validation, release-style labelled lists, and the
whole recipe run on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from thrifty.cli import EXIT_OK, main
from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.data.video import VideoDataError, write_video
from thrifty.methods.temporal_gradient.config import TemporalGradientConfig
from thrifty.methods.temporal_gradient.real import fit_frames, labelled_rows, load_real

CLASSES = ("ApplyEyeMakeup", "Biking", "HandstandPushups")
FRAMES, H, W = 12, 24, 32  # 4:3, like UCF-101's 320 x 240
PER_CLASS_TRAIN, PER_CLASS_TEST = 6, 2
STEP = 20  # frame k of every video is a flat grey at 10 + STEP * k: decoding recovers k despite lossy coding


def frame_number(video: torch.Tensor) -> np.ndarray:
    """Frame numbers of decoded flat frames: ``video`` float (..., 3, T, h, w) in [0, 1] -> (..., T)."""
    grey = video.mean(dim=(-4, -2, -1)).numpy() * 255.0
    return np.rint((grey - 10.0) / STEP).astype(np.int64)


@pytest.fixture(scope="module")
def ucf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(video_root, split_dir) of a three-class UCF-101 layout with 6 training and 2 test videos per class."""
    base = tmp_path_factory.mktemp("ucf")
    root, split_dir = base / "UCF-101", base / "ucfTrainTestlist"
    split_dir.mkdir()
    (split_dir / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    frames = np.stack([np.full((H, W, 3), 10 + STEP * k, np.uint8) for k in range(FRAMES)])
    train, test = [], []
    for ci, c in enumerate(CLASSES):
        for g in range(PER_CLASS_TRAIN + PER_CLASS_TEST):
            rel = f"{c}/v_{c}_g{g + 1:02d}_c01.avi"
            (root / c).mkdir(parents=True, exist_ok=True)
            write_video(root / rel, frames, codec="mpeg4")
            (train if g < PER_CLASS_TRAIN else test).append((rel, ci + 1))
    (split_dir / "trainlist01.txt").write_text("".join(f"{rel} {label}\n" for rel, label in train))
    (split_dir / "testlist01.txt").write_text("".join(f"{rel}\n" for rel, _ in test))
    return root, split_dir


def real_cfg(ucf: tuple[Path, Path], *overrides: str) -> TemporalGradientConfig:
    root, split_dir = ucf
    return load_config(
        "temporal_gradient",
        "smoke",
        [
            "progress=false",
            "data.source=ucf101",
            f"data.real.video_root={root}",
            f"data.real.split_dir={split_dir}",
            "data.real.short_side=12",
            "data.crop_size=12",
            "data.frame_interval=2",
            "data.val_fraction=0.34",
            "data.labelled_fraction=0.5",
            *overrides,
        ],
    )[1]


def test_splits_hold_validation_out_of_training(ucf: tuple[Path, Path]) -> None:
    splits, classes, labelled = load_real(real_cfg(ucf))
    assert classes == list(CLASSES) and labelled is None
    names = {s: {r.name for r in splits[s].records} for s in ("train", "val", "test")}
    assert len(names["test"]) == 3 * PER_CLASS_TEST
    assert len(names["train"]) + len(names["val"]) == 3 * PER_CLASS_TRAIN
    assert not names["train"] & names["val"] and not (names["train"] | names["val"]) & names["test"]
    assert sorted(np.bincount(splits["val"].labels)) == [2, 2, 2]  # stratified: 34% of 6 per class
    again, _, _ = load_real(real_cfg(ucf))
    assert [r.name for r in again["val"].records] == [r.name for r in splits["val"].records]


def test_clips_decode_the_sampled_frames_and_their_predecessors(ucf: tuple[Path, Path]) -> None:
    cfg = real_cfg(ucf)
    splits, _, _ = load_real(cfg)
    train = splits["train"]
    assert train.num_frames(0) == FRAMES
    rows = np.array([0, 3, 5])
    rng = np.random.default_rng(0)
    video, idx = train.clips(rows, cfg, context=1, rng=rng, test_mode=False)
    assert video.shape[:2] == (3, 3) and video.shape[-2:] == (12, 16)  # short side 12, 4:3
    assert idx.shape == (3, 1, cfg.data.clip_len)
    numbers = frame_number(video)  # (n, M): the raw frame held at each position
    for n in range(3):
        sampled = numbers[n, idx[n, 0].numpy()]
        before = numbers[n, idx[n, 0].numpy() - 1]
        assert np.all(sampled >= 1) and np.all(np.diff(sampled) == cfg.data.frame_interval)
        assert np.array_equal(before, sampled - 1)  # the TG predecessor is the raw frame before
    # test mode: evenly spaced clips, deterministic
    v1, i1 = train.clips(rows, cfg, context=1, rng=None, test_mode=True)
    v2, i2 = train.clips(rows, cfg, context=1, rng=None, test_mode=True)
    assert torch.equal(v1, v2) and torch.equal(i1, i2)


def test_fit_frames_crops_to_aspect_then_resizes() -> None:
    frames = np.zeros((2, 30, 60, 3), np.uint8)
    frames[:, :, 15:45] = 200  # a 2:1 frame whose centre 30 x 40 (4:3) holds the bright band and 5 dark columns a side
    out = fit_frames(frames, (12, 16))
    assert out.shape == (2, 12, 16, 3) and out.dtype == torch.uint8
    assert int(out[0, 6, 8, 0]) == 200 and int(out[0, 6, 0, 0]) < 100
    same = np.random.default_rng(0).integers(0, 256, size=(1, 12, 16, 3), dtype=np.uint8)
    assert np.array_equal(fit_frames(same, (12, 16)).numpy(), same)  # already the right size: untouched


def test_labelled_list_matches_training_videos_by_name(ucf: tuple[Path, Path], tmp_path: Path) -> None:
    splits, _, _ = load_real(real_cfg(ucf))
    train = splits["train"]
    picks = [train.records[i] for i in (0, 4)]
    listing = tmp_path / "labelled_rawframes.txt"
    listing.write_text("".join(f"{r.name} {FRAMES} {r.label}\n" for r in picks))
    assert labelled_rows(train, str(listing), num_classes=3).tolist() == [0, 4]
    videos = tmp_path / "labelled_videos.txt"
    videos.write_text("".join(f"{r.name}.avi {r.label}\n" for r in picks))
    assert labelled_rows(train, str(videos), num_classes=3).tolist() == [0, 4]
    held = splits["val"].records[0]
    (tmp_path / "bad.txt").write_text(f"{held.name} {FRAMES} {held.label}\n")
    with pytest.raises(VideoDataError, match="not a training video"):
        labelled_rows(train, str(tmp_path / "bad.txt"), num_classes=3)
    wrong = (picks[0].label + 1) % 3
    (tmp_path / "wrong.txt").write_text(f"{picks[0].name} {FRAMES} {wrong}\n")
    with pytest.raises(VideoDataError, match="listing says"):
        labelled_rows(train, str(tmp_path / "wrong.txt"), num_classes=3)


def test_real_source_needs_paths_and_refuses_missing_videos(ucf: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.real\.video_root"):
        load_config("temporal_gradient", "full", ["progress=false"])
    with pytest.raises(ConfigError, match="short_side"):
        real_cfg(ucf, "data.real.short_side=8")
    with pytest.raises(ConfigError, match="labelled_list"):
        real_cfg(ucf, "data.real.labelled_list=x.txt", "sweep.labelled_fractions=[0.1]")
    _, split_dir = ucf
    with pytest.raises(VideoDataError):  # the listing names videos that are not under this root
        load_real(real_cfg((tmp_path / "empty", split_dir)))


def test_recipe_runs_end_to_end_on_real_videos(ucf: tuple[Path, Path], tmp_path: Path) -> None:
    rc = main(
        [
            "run",
            "temporal_gradient",
            "--preset",
            "smoke",
            f"out_dir={tmp_path / 'runs'}",
            f"data_dir={tmp_path / 'data'}",
            "progress=false",
            "data.source=ucf101",
            f"data.real.video_root={ucf[0]}",
            f"data.real.split_dir={ucf[1]}",
            "data.real.short_side=12",
            "data.crop_size=12",
            "data.frame_interval=2",
            "data.val_fraction=0.34",
            "data.labelled_fraction=0.5",
            "data.rgb_norm=dataset",
            "arms=[supervised,tg_full]",
            "seeds=[0]",
        ]
    )
    assert rc == EXIT_OK
    (run_dir,) = (tmp_path / "runs" / "temporal_gradient").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"]["source"] == "ucf101" and results["data"]["classes"] == list(CLASSES)
    assert results["data"]["train_videos"] == 12 and results["data"]["test_videos"] == 6
    assert "note" in results["trivial"] and not results["trivial"]["test"]
    for arm in ("supervised", "tg_full"):
        unit = json.loads((run_dir / "units" / arm / "seed0" / "result.json").read_text())
        assert 0.0 <= unit["test"]["top1"] <= 100.0
    assert (run_dir / "figures" / "examples.png").is_file()
