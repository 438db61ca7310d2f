"""Data of the temporal-gradient recipe: stratified nested labelled subsets, the stateless per-rank stream
samplers, the release's RGB/TG pairing, the shared crop and flip, one step's clips, the test views, frame sampling
that never wraps, and the cached, guarded MotionVideos splits."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import torch

from thrifty.core.config import ConfigError
from thrifty.core.registry import load_config
from thrifty.core.splits import AccessLog
from thrifty.data import motion_videos
from thrifty.data.video import VideoDataError
from thrifty.methods.temporal_gradient import tg
from thrifty.methods.temporal_gradient.config import TemporalGradientConfig
from thrifty.methods.temporal_gradient.data import (
    GuardedVideos,
    TGData,
    VideoSet,
    context_of,
    draw_step,
    eval_views,
    frame_indices,
    prepare_data,
    stratified_subset,
    stream_indices,
    two_streams,
    weak_views,
)


def smoke_cfg(*overrides: str) -> TemporalGradientConfig:
    # the coded-video tests decode pixels back from the release's fixed normalisation
    return load_config("temporal_gradient", "smoke", ["progress=false", "data.rgb_norm=dataset", *overrides])[1]


# ----------------------------------------------------------------------------------------- stratified_subset


def class_labels(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(labels)


# class sizes chosen so that no fraction x size falls on .5 (no rounding-rule ambiguity)
COUNTS = {0: 200, 1: 37, 2: 23, 3: 1, 4: 60}
# max(1, round(f * n_c)) by hand
EXPECTED = {
    0.01: {0: 2, 1: 1, 2: 1, 3: 1, 4: 1},
    0.05: {0: 10, 1: 2, 2: 1, 3: 1, 4: 3},
    0.1: {0: 20, 1: 4, 2: 2, 3: 1, 4: 6},
    1.0: COUNTS,
}


@pytest.mark.parametrize("fraction", sorted(EXPECTED))
def test_stratified_subset_takes_the_rounded_share_of_every_class(fraction):
    labels = class_labels(COUNTS)
    idx = stratified_subset(labels, fraction, seed=3)
    assert idx.dtype.kind == "i"
    assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"
    assert idx.min() >= 0 and idx.max() < len(labels)
    got = {c: int(np.sum(labels[idx] == c)) for c in COUNTS}
    assert got == EXPECTED[fraction]


def test_stratified_subsets_are_nested_across_fractions():
    labels = class_labels(COUNTS)
    subsets = [set(stratified_subset(labels, f, seed=5).tolist()) for f in (0.01, 0.05, 0.1, 0.5, 1.0)]
    for small, large in itertools.pairwise(subsets):
        assert small < large
    assert subsets[-1] == set(range(len(labels)))


def test_stratified_subset_is_deterministic_per_seed():
    labels = class_labels(COUNTS)
    a = stratified_subset(labels, 0.1, seed=11)
    np.testing.assert_array_equal(a, stratified_subset(labels, 0.1, seed=11))
    assert not np.array_equal(a, stratified_subset(labels, 0.1, seed=12))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, 2.0])
def test_stratified_subset_rejects_a_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_subset(class_labels(COUNTS), fraction, seed=0)


# ------------------------------------------------------------------------------------------- stream_indices


def test_ranks_of_one_step_take_disjoint_rows():
    for step in range(1, 8):
        r0 = stream_indices(20, 4, seed=1, stream=0, step=step, rank=0, world=2)
        r1 = stream_indices(20, 4, seed=1, stream=0, step=step, rank=1, world=2)
        assert len(r0) == len(r1) == 4
        assert not set(r0.tolist()) & set(r1.tolist()), step


@pytest.mark.parametrize(("n", "count", "world"), [(24, 3, 2), (12, 6, 2), (10, 5, 1), (16, 2, 4)])
def test_every_epoch_covers_each_item_exactly_once_over_the_ranks(n, count, world):
    steps_per_epoch = n // (count * world)
    epochs = []
    for e in range(3):
        rows = [
            stream_indices(n, count, seed=7, stream=1, step=e * steps_per_epoch + s, rank=r, world=world)
            for s in range(1, steps_per_epoch + 1)
            for r in range(world)
        ]
        epoch = np.concatenate(rows)
        assert sorted(epoch.tolist()) == list(range(n)), e
        epochs.append(epoch)
    # each epoch is a fresh permutation
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_a_stream_that_does_not_divide_the_epoch_still_deals_whole_permutations():
    """10 items, 3 per step: the concatenated stream, cut every 10 rows, is a permutation each time."""
    stream = np.concatenate([stream_indices(10, 3, seed=2, stream=0, step=s, rank=0, world=1) for s in range(1, 11)])
    for chunk in stream.reshape(3, 10):
        assert sorted(chunk.tolist()) == list(range(10))


def test_stream_indices_are_deterministic_and_depend_on_seed_and_stream():
    kw = dict(step=3, rank=1, world=2)
    a = stream_indices(50, 5, seed=4, stream=0, **kw)
    np.testing.assert_array_equal(a, stream_indices(50, 5, seed=4, stream=0, **kw))
    assert not np.array_equal(a, stream_indices(50, 5, seed=5, stream=0, **kw))
    assert not np.array_equal(a, stream_indices(50, 5, seed=4, stream=1, **kw))


@pytest.mark.parametrize(("n", "count"), [(0, 3), (5, 0), (-1, 2), (4, -2)])
def test_stream_indices_reject_empty_streams(n, count):
    with pytest.raises(ValueError):
        stream_indices(n, count, seed=0, stream=0, step=1, rank=0, world=1)


# --------------------------------------------------------------------------------------------- two_streams


def random_video(n: int = 2, frames: int = 6, size: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, frames, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rgb_is_the_earlier_frame_of_the_tg_pair():
    video = random_video()
    idx = torch.tensor([[1, 3, 5], [2, 3, 4]])
    rgb, motion = two_streams(video, idx, "tg")
    assert rgb.shape == motion.shape == (2, 3, 3, 3, 3)
    for v in range(2):
        for t, i in enumerate(idx[v].tolist()):
            torch.testing.assert_close(rgb[v, :, t], video[v, :, i - 1], rtol=0, atol=0)
            torch.testing.assert_close(motion[v, :, t], (video[v, :, i - 1] - video[v, :, i] + 1) / 2)


def test_rgb_modality_gives_the_sampled_frame_on_both_streams():
    video = random_video(seed=1)
    idx = torch.tensor([[0, 2, 5], [1, 1, 4]])
    rgb, motion = two_streams(video, idx, "rgb")
    for v in range(2):
        for t, i in enumerate(idx[v].tolist()):
            torch.testing.assert_close(rgb[v, :, t], video[v, :, i], rtol=0, atol=0)
    torch.testing.assert_close(motion, rgb, rtol=0, atol=0)


def test_two_step_gradient_pairs_with_the_frame_two_before():
    video = random_video(seed=2)
    idx = torch.tensor([[2, 4], [3, 5]])
    rgb, motion = two_streams(video, idx, "tg2")
    for v in range(2):
        for t, i in enumerate(idx[v].tolist()):
            torch.testing.assert_close(rgb[v, :, t], video[v, :, i - 2], rtol=0, atol=0)
            torch.testing.assert_close(motion[v, :, t], (video[v, :, i - 2] - video[v, :, i] + 1) / 2)


def test_unknown_modality_is_a_value_error():
    with pytest.raises(ValueError, match="flow"):
        two_streams(random_video(), torch.tensor([[1, 2], [1, 2]]), "flow")
    with pytest.raises(ValueError, match="flow"):
        context_of("flow")


# ---------------------------------------------------------------------------------------------- weak_views


def coordinate_clip(n: int, t: int, height: int, width: int) -> torch.Tensor:
    """(n, 3, t, H, W) in [0, 1]: channel 0 = column, channel 1 = row, channel 2 = frame."""
    cols = torch.linspace(0, 1, width).view(1, 1, width).expand(t, height, width)
    rows = torch.linspace(0, 1, height).view(1, height, 1).expand(t, height, width)
    frames = torch.linspace(0, 1, t).view(t, 1, 1).expand(t, height, width)
    return torch.stack([cols, rows, frames]).unsqueeze(0).expand(n, 3, t, height, width).clone()


def weak_cfg(flip_p: float, crop_size: int = 12) -> TemporalGradientConfig:
    cfg = TemporalGradientConfig()
    cfg.data.crop_area, cfg.data.flip_p, cfg.data.crop_size = [0.2, 0.6], flip_p, crop_size
    return cfg


def test_weak_views_apply_one_geometry_to_both_streams():
    x = coordinate_clip(16, 4, 20, 24)
    cfg = weak_cfg(flip_p=0.5)
    a, b = weak_views(x, x.clone(), cfg, torch.Generator().manual_seed(0))
    assert a.shape == (16, 3, 4, 12, 12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # another tensor on the same pixel grid: the second stream gets the crop and flip of the first
    a, b = weak_views(x, 1.0 - x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(b, 1.0 - a, rtol=0, atol=1e-6)
    # the crops differ between clips, and some clips are flipped and some not
    left_col = a[:, 0, 0, 0, 0]
    assert left_col.max() - left_col.min() > 0.1
    direction = torch.sign(a[:, 0, 0, 0, -1] - a[:, 0, 0, 0, 0])
    assert (direction > 0).any() and (direction < 0).any()
    # the time axis is untouched
    torch.testing.assert_close(a[:, 2, :, 5, 5], x[:, 2, :, 0, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("flip_p", "sign"), [(0.0, 1.0), (1.0, -1.0)])
def test_flip_probability_zero_and_one(flip_p, sign):
    x = coordinate_clip(6, 2, 16, 16)
    a, b = weak_views(x, 1.0 - x, weak_cfg(flip_p), torch.Generator().manual_seed(3))
    # column coordinate grows (no flip) or falls (flip) left to right, on both streams alike
    assert torch.all(torch.sign(a[:, 0, :, :, -1] - a[:, 0, :, :, 0]) == sign)
    assert torch.all(torch.sign(b[:, 0, :, :, -1] - b[:, 0, :, :, 0]) == -sign)


def test_weak_views_are_deterministic_per_generator_seed():
    x = coordinate_clip(5, 2, 16, 16)
    cfg = weak_cfg(0.5)
    a = weak_views(x, x, cfg, torch.Generator().manual_seed(9))
    b = weak_views(x, x, cfg, torch.Generator().manual_seed(9))
    c = weak_views(x, x, cfg, torch.Generator().manual_seed(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ------------------------------------------------------------------------------- hand-made coded videos


def coded_videos(n: int, frames: int, height: int, width: int | None = None) -> np.ndarray:
    """uint8 (n, F, H, W, 3): every pixel of frame f of video j is 10 j + f, so a clip names its source."""
    assert 10 * (n - 1) + frames - 1 < 256 and frames < 10
    code = 10 * np.arange(n)[:, None] + np.arange(frames)[None, :]
    return np.broadcast_to(code[:, :, None, None, None], (n, frames, height, width or height, 3)).astype(np.uint8)


def decode(clips: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Normalised RGB clips (n, 3, T, S, S) of coded videos -> (video id, raw frame) per clip and time, (n, T)."""
    mean = torch.tensor(tg.RGB_MEAN, dtype=clips.dtype).view(3, 1, 1, 1)
    std = torch.tensor(tg.RGB_STD, dtype=clips.dtype).view(3, 1, 1, 1)
    raw = torch.round((clips * std + mean) * 255).to(torch.int64)
    assert torch.all(raw == raw[:, :1, :, :1, :1]), "a coded clip is constant over channels and pixels"
    code = raw[:, 0, :, 0, 0].numpy()
    return code // 10, code % 10


def coded_data(n: int = 24, frames: int = 8, size: int = 16, classes: int = 5) -> TGData:
    labels = (np.arange(n) * 7) % classes
    access = AccessLog()
    held = VideoSet(coded_videos(4, frames, size), np.arange(4) % classes)
    return TGData(
        class_names=[f"c{k}" for k in range(classes)],
        train=VideoSet(coded_videos(n, frames, size), labels.astype(np.int64)),
        val=GuardedVideos("val", held, access),
        test=GuardedVideos("test", held, access),
        seed=0,
        info={},
    )


def step(data, labelled, cfg, *, seed=0, step_=1, rank=0, world=1, gen_seed=0, unlabelled=True):
    return draw_step(
        data,
        labelled,
        cfg,
        seed=seed,
        step=step_,
        rank=rank,
        world=world,
        gen=torch.Generator().manual_seed(gen_seed),
        unlabelled=unlabelled,
    )


# ------------------------------------------------------------------------------------------------ draw_step


def test_clip_normalisation_standardises_rgb_only():
    data, labelled = coded_data(), np.array([1, 4, 6, 9, 13, 20])
    fixed = step(data, labelled, smoke_cfg())
    per_clip = step(data, labelled, smoke_cfg("data.rgb_norm=clip"))
    mean = torch.tensor(tg.RGB_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(tg.RGB_STD).view(3, 1, 1, 1)
    for name in ("rgb_l", "rgb_uw", "rgb_us"):  # the same draws, standardised per clip instead
        raw = getattr(fixed, name) * std + mean
        torch.testing.assert_close(getattr(per_clip, name), tg.standardise_clip(raw), atol=1e-4, rtol=1e-4)
    for name in ("tg_l", "tg_uw", "tg_us"):  # the motion stream keeps the release's normalisation
        assert torch.equal(getattr(per_clip, name), getattr(fixed, name)), name
    flat = views(data.train.videos[:3], smoke_cfg("data.rgb_norm=clip")).flatten(3)
    torch.testing.assert_close(flat.mean(-1), torch.zeros(flat.shape[:3]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rgb_norm"):
        smoke_cfg("data.rgb_norm=imagenet")


def test_draw_step_shapes_labels_and_source_frames():
    cfg = smoke_cfg()  # 4 + 4 clips of 4 frames at interval 1, crops of 16 from 8-frame 16x16 videos
    data = coded_data()
    labelled = np.array([1, 4, 6, 9, 13, 20])
    c = step(data, labelled, cfg)
    shape = (4, 3, 4, 16, 16)
    for name in ("rgb_l", "tg_l", "rgb_uw", "tg_uw", "rgb_us", "tg_us"):
        assert tuple(getattr(c, name).shape) == shape, name
    assert c.y_l.dtype == torch.int64 and c.y_l.shape == (4,) and c.y_u.shape == (4,)

    vid_l, frame_l = decode(c.rgb_l)
    assert np.all(vid_l == vid_l[:, :1]), "a clip comes from one video"
    assert set(vid_l[:, 0].tolist()) <= set(labelled.tolist())
    assert len(set(vid_l[:, 0].tolist())) == 4  # four different labelled videos in one step
    np.testing.assert_array_equal(c.y_l.numpy(), data.train.labels[vid_l[:, 0]])
    # the RGB frames are consecutive raw frames (interval 1), each the predecessor of a sampled index in [1, 7]
    assert np.all(np.diff(frame_l, axis=1) == 1)
    assert frame_l.min() >= 0 and frame_l.max() <= 6

    vid_u, frame_u = decode(c.rgb_uw)
    np.testing.assert_array_equal(c.y_u.numpy(), data.train.labels[vid_u[:, 0]])
    assert np.all(np.diff(frame_u, axis=1) == 1)

    # TG of frames that brighten by 1/255 per frame: (I[i-1] - I[i] + 1) / 2, normalised like RGB
    mean = torch.tensor(tg.RGB_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(tg.RGB_STD).view(3, 1, 1, 1)
    for motion in (c.tg_l, c.tg_uw):
        torch.testing.assert_close(motion * std + mean, torch.full_like(motion, (1 - 1 / 255) / 2), atol=1e-5, rtol=0)
    # the strong views are not the weak views
    assert not torch.allclose(c.rgb_us, c.rgb_uw)


def test_draw_step_without_unlabelled_clips_gives_empty_tensors():
    cfg = smoke_cfg()
    c = step(coded_data(), np.arange(10), cfg, unlabelled=False)
    assert c.rgb_l.shape[0] == 4
    for name in ("rgb_uw", "tg_uw", "rgb_us", "tg_us"):
        t = getattr(c, name)
        assert t.shape[0] == 0 and t.shape[1:] == c.rgb_l.shape[1:], name
    assert c.y_u.shape == (0,) and c.y_u.dtype == torch.int64


def test_draw_step_is_a_function_of_seed_step_rank_and_generator_seed():
    cfg = smoke_cfg()
    cfg.data.flip_p = 0.5  # every random draw in play
    data, labelled = coded_data(), np.arange(0, 24, 2)
    a = step(data, labelled, cfg, seed=3, step_=2, rank=0, gen_seed=5)
    b = step(data, labelled, cfg, seed=3, step_=2, rank=0, gen_seed=5)
    for name in ("rgb_l", "tg_l", "y_l", "rgb_uw", "tg_uw", "rgb_us", "tg_us", "y_u"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    other_step = step(data, labelled, cfg, seed=3, step_=3, rank=0, gen_seed=5)
    assert not torch.equal(a.rgb_l, other_step.rgb_l)
    other_seed = step(data, labelled, cfg, seed=4, step_=2, rank=0, gen_seed=5)
    assert not torch.equal(a.rgb_l, other_seed.rgb_l)


def test_ranks_draw_disjoint_labelled_and_unlabelled_videos():
    cfg = smoke_cfg()
    data, labelled = coded_data(), np.arange(0, 24, 2)
    ranks = [step(data, labelled, cfg, rank=r, world=2, gen_seed=r) for r in (0, 1)]
    for c in ranks:
        assert c.rgb_l.shape[0] == 2 and c.rgb_uw.shape[0] == 2  # each rank holds half of the step
    ids_l = [set(decode(c.rgb_l)[0][:, 0].tolist()) for c in ranks]
    ids_u = [set(decode(c.rgb_uw)[0][:, 0].tolist()) for c in ranks]
    assert not ids_l[0] & ids_l[1]
    assert not ids_u[0] & ids_u[1]
    assert ids_l[0] | ids_l[1] <= set(labelled.tolist())


# ----------------------------------------------------------------------------------------------- eval_views


def views(videos: np.ndarray, cfg: TemporalGradientConfig) -> torch.Tensor:
    """:func:`eval_views` of every video of an in-memory array."""
    return eval_views(VideoSet(videos, np.zeros(len(videos), np.int64)), np.arange(len(videos)), cfg)


@pytest.mark.parametrize(("clips", "crops"), [(1, 1), (2, 1), (2, 3)])
def test_eval_views_shape_content_and_determinism(clips, crops):
    cfg = smoke_cfg(f"test_clips={clips}", f"test_crops={crops}")
    videos = coded_videos(3, 8, 16, 20)  # landscape frames: three crops along the width
    out = views(videos, cfg)
    assert tuple(out.shape) == (3, clips * crops, 3, 4, 16, 16)
    assert torch.equal(out, views(videos, cfg))
    vid, frame = decode(out.flatten(0, 1))
    np.testing.assert_array_equal(
        vid.reshape(3, clips * crops, 4), np.broadcast_to(np.arange(3)[:, None, None], (3, clips * crops, 4))
    )
    assert np.all(np.diff(frame, axis=1) == 1) and frame.min() >= 0 and frame.max() <= 6
    starts = frame.reshape(3, clips, crops, 4)[0, :, 0, 0]
    assert len(set(starts.tolist())) == clips  # evenly spaced clips start at different frames


def test_any_accepted_test_crops_gives_clips_times_crops_views():
    try:
        cfg = smoke_cfg("test_crops=2")
    except ConfigError:
        return  # rejecting the value is a fine fix too
    assert views(coded_videos(2, 8, 16), cfg).shape[1] == 2


# --------------------------------------------------------------------------------------------- frame sampling


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("smoke", []),
        ("quick", []),
        ("smoke", ["data.clip_len=7"]),
        ("smoke", ["data.clip_len=3", "data.frame_interval=3"]),
        ("quick", ["data.modality=tg2", "data.clip_len=7"]),
        ("smoke", ["data.clip_len=8"]),
        ("quick", ["data.modality=tg2"]),
    ],
)
def test_a_valid_config_samples_clips_that_never_wrap(preset, overrides):
    try:
        cfg = load_config("temporal_gradient", preset, overrides)[1]
    except ConfigError:
        return  # a config that is rejected samples nothing
    d, frames = cfg.data, cfg.data.synthetic.num_frames
    context = context_of(d.modality)
    rng = np.random.default_rng(0)
    for test_mode in (False, True):
        idx = frame_indices(50, frames, cfg, context=context, rng=rng, test_mode=test_mode)
        assert idx.shape == (50, cfg.test_clips if test_mode else 1, d.clip_len)
        assert idx.min() >= context and idx.max() < frames
        assert np.all(np.diff(idx, axis=-1) == d.frame_interval), (test_mode, idx[0])


def test_training_clips_start_at_random_frames_when_there_is_room():
    cfg = smoke_cfg()  # 4 frames at interval 1 in 7 usable frames: 4 possible starts
    idx = frame_indices(200, 8, cfg, context=1, rng=np.random.default_rng(1), test_mode=False)
    assert set(idx[:, 0, 0].tolist()) == {1, 2, 3, 4}


# ------------------------------------------------------------------------------------------ prepare_data


def video_hashes(videos: np.ndarray) -> set[str]:
    return {hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest() for v in videos}


@pytest.fixture(scope="module")
def smoke_data(data_dir):
    cfg = smoke_cfg(f"data_dir={data_dir}")
    access = AccessLog()
    return cfg, prepare_data(cfg, data_dir, access), access


def test_prepare_data_sizes_and_summary(smoke_data):
    cfg, data, _ = smoke_data
    assert data.train.videos.shape == (40, 8, 16, 16, 3) and data.train.videos.dtype == np.uint8
    assert data.train.labels.dtype == np.int64 and set(data.train.labels.tolist()) <= set(range(10))
    assert (len(data.val), len(data.test)) == (20, 20)
    assert data.class_names == list(motion_videos.MOTION_CLASSES)
    info = data.info
    assert (info["train_videos"], info["val_videos"], info["test_videos"]) == (40, 20, 20)
    assert (info["frames"], info["size"], info["source"]) == (8, 16, "synthetic")
    labelled = data.labelled_indices(cfg.data.labelled_fraction)
    assert info["labelled_videos"] == len(labelled)
    # 40 training videos, 4 per class: 25% is one video of each class
    assert sorted(data.train.labels[labelled].tolist()) == list(range(10))
    assert set(data.labelled_indices(0.25).tolist()) < set(data.labelled_indices(0.5).tolist())


def test_the_three_splits_hold_different_videos(smoke_data, data_dir):
    _, data, access = smoke_data
    n_before = len(access.entries)
    train = video_hashes(data.train.videos)
    val = video_hashes(data.val.get("selection", "test").videos)
    test = video_hashes(data.test.get("final_test", "test").videos)
    assert len(train) == 40 and len(val) == 20 and len(test) == 20  # no duplicate inside a split
    assert not train & val and not train & test and not val & test
    assert len(access.entries) == n_before + 2


def test_held_out_splits_are_guarded_and_logged(smoke_data):
    _, data, access = smoke_data
    with pytest.raises(PermissionError, match="test"):
        data.test.get("selection", "u")
    with pytest.raises(PermissionError):
        data.test.get("calibration", "u")
    with pytest.raises(PermissionError, match="val"):
        data.val.get("final_test", "u")
    n = len(access.entries)
    data.val.get("calibration", "u1")
    data.test.get("final_test", "u2")
    assert [(e["split"], e["purpose"], e["unit"]) for e in access.entries[n:]] == [
        ("val", "calibration", "u1"),
        ("test", "final_test", "u2"),
    ]
    assert isinstance(data.val, GuardedVideos) and isinstance(data.test, GuardedVideos)


def test_the_cache_is_reused(smoke_data, data_dir, monkeypatch):
    cfg, data, _ = smoke_data

    def refuse(*args, **kwargs):
        raise AssertionError("the cached videos were generated again")

    monkeypatch.setattr(motion_videos, "generate", refuse)
    again = prepare_data(cfg, data_dir, AccessLog())
    np.testing.assert_array_equal(again.train.videos, data.train.videos)
    np.testing.assert_array_equal(again.train.labels, data.train.labels)
    np.testing.assert_array_equal(again.test.get("final_test", "t").videos, data.test.get("final_test", "t").videos)


def test_a_changed_setting_gets_its_own_cache(tmp_path, monkeypatch):
    calls = []
    real = motion_videos.generate

    def counting(n, **kwargs):
        calls.append(kwargs["split"])
        return real(n, **kwargs)

    monkeypatch.setattr(motion_videos, "generate", counting)
    sizes = ["data.synthetic.train_videos=10", "data.synthetic.val_videos=3", "data.synthetic.test_videos=3"]
    cfg = smoke_cfg(*sizes)
    first = prepare_data(cfg, tmp_path, AccessLog())
    assert sorted(calls) == ["test", "train", "val"]
    prepare_data(cfg, tmp_path, AccessLog())
    assert len(calls) == 3
    changed = smoke_cfg(*sizes)
    changed.data.synthetic.spec = {"noise_std": [0.05, 0.06]}
    second = prepare_data(changed, tmp_path, AccessLog())
    assert len(calls) == 6
    caches = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(caches) == 2 and all((p / "train.npz").is_file() and (p / "settings.json").is_file() for p in caches)
    assert not np.array_equal(first.train.videos, second.train.videos)
    # the old cache is still there and still used
    prepare_data(cfg, tmp_path, AccessLog())
    assert len(calls) == 6


def test_a_real_dataset_without_its_files_is_one_error_naming_them(tmp_path):
    listing = tmp_path / "ucfTrainTestlist"
    listing.mkdir()
    real = [f"data.real.video_root={tmp_path / 'videos'}", f"data.real.split_dir={listing}"]
    cfg = smoke_cfg("data.source=ucf101", *real)
    root = tmp_path / "cache"
    root.mkdir()
    with pytest.raises(VideoDataError, match=r"classInd\.txt|trainlist01\.txt"):
        prepare_data(cfg, root, AccessLog())
    tmp_path = root
    assert not any(tmp_path.iterdir()), "nothing is generated for a real source"
