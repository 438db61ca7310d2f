"""MotionVideos: shapes, seeded prefix-stable determinism, disjoint digit pools, each class moving as named, and
no single-frame shortcut (appearance independent of the class)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from thrifty.data import motion_videos as mv

CLEAN = mv.MotionSpec(  # no noise, flat background, no shake, unit gain: the object's opacity can be read back
    noise_std=(0.0, 0.0), background_contrast=0.0, camera_shake_std=0.0, brightness=(1.0, 1.0)
)
CLS = {name: k for k, name in enumerate(mv.MOTION_CLASSES)}


def _opacity(batch: mv.MotionBatch) -> np.ndarray:
    """(N, T, H, W) object opacity recovered from CLEAN videos: frame = bg + alpha (fg - bg)."""
    frames = batch.videos.astype(np.float64) / 255.0
    bg = np.rint(batch.meta["bg_colour"].astype(np.float64) * 255)[:, None, None, None, :] / 255  # as quantised
    diff = batch.meta["fg_colour"].astype(np.float64)[:, None, None, None, :] - bg
    return ((frames - bg) * diff).sum(-1) / (diff**2).sum(-1)


def _circular_centroid(alpha: np.ndarray) -> np.ndarray:
    """(N, T, 2) opacity-weighted centroid (x, y) on the torus, unwrapped along time."""
    size = alpha.shape[-1]
    ang = 2 * np.pi * np.arange(size) / size
    out = []
    for axis in (-1, -2):  # x sums over rows, y over columns
        mass = alpha.sum(axis=-2 if axis == -1 else -1)  # (N, T, size)
        c = np.angle((mass * np.exp(1j * ang)).sum(-1)) * size / (2 * np.pi)
        step = np.mod(np.diff(c, axis=1) + size / 2, size) - size / 2
        out.append(np.concatenate([c[:, :1], c[:, :1] + np.cumsum(step, axis=1)], axis=1))
    return np.stack(out, axis=-1)


def _angular_velocity(alpha: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(N, T-1) rotation (rad/frame, positive = clockwise on screen) between consecutive frames, by least squares on
    brightness constancy about the true centre, jointly with a translation v:
    a_{t+1} - a_t ≈ -(v·grad a_t + w grad a_t·J(r)), J(x, y) = (-y, x)."""
    size = alpha.shape[-1]
    pix = np.arange(size)
    gx = (np.roll(alpha, -1, axis=-1) - np.roll(alpha, 1, axis=-1)) / 2
    gy = (np.roll(alpha, -1, axis=-2) - np.roll(alpha, 1, axis=-2)) / 2
    rx = np.mod(pix[None, None, None, :] - centre[..., 0, None, None] + size / 2, size) - size / 2
    ry = np.mod(pix[None, None, :, None] - centre[..., 1, None, None] + size / 2, size) - size / 2
    basis = np.stack([gx, gy, gx * -ry + gy * rx], axis=-1)[:, :-1]  # (N, T-1, H, W, 3)
    target = -np.diff(alpha, axis=1)
    n, t = target.shape[:2]
    basis, target = basis.reshape(n, t, -1, 3), target.reshape(n, t, -1)
    gram = np.einsum("ntpi,ntpj->ntij", basis, basis)
    rhs = np.einsum("ntpi,ntp->nti", basis, target)
    return np.linalg.solve(gram, rhs[..., None])[..., 2, 0]


def test_shapes_dtype_range_and_meta():
    batch = mv.generate(12, seed=0)
    assert batch.videos.shape == (12, 16, 32, 32, 3) and batch.videos.dtype == np.uint8
    assert batch.labels.shape == (12,) and batch.labels.dtype == np.int64
    assert len(batch) == 12 and set(batch.labels.tolist()) <= set(range(10))
    assert batch.videos.std() > 10 and batch.videos.min() < 60 and batch.videos.max() > 190
    for key, value in batch.meta.items():
        assert len(value) == 12, key
    assert batch.meta["centre"].shape == (12, 16, 2) and batch.meta["side"].shape == (12, 16)
    assert set(batch.meta["kind"].tolist()) <= {"digit", "polygon"}
    small = mv.generate(3, seed=1, num_frames=10, size=24, split="test")
    assert small.videos.shape == (3, 10, 24, 24, 3)
    sub = batch.subset([3, 0])
    assert np.array_equal(sub.videos[1], batch.videos[0]) and sub.labels.tolist() == batch.labels[[3, 0]].tolist()
    assert np.array_equal(sub.meta["sprite"], batch.meta["sprite"][[3, 0]])
    assert len(batch.subset(batch.labels == batch.labels[0])) == int((batch.labels == batch.labels[0]).sum())
    assert len(mv.generate(0, seed=0)) == 0


def test_labels_as_given_and_balanced_when_drawn():
    given = np.array([9, 0, 4, 4, 7])
    assert mv.generate(5, seed=2, labels=given).labels.tolist() == given.tolist()
    drawn = mv.balanced_labels(40, seed=3)
    assert np.bincount(drawn, minlength=10).tolist() == [4] * 10
    counts = np.bincount(mv.balanced_labels(23, seed=3), minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3
    assert np.array_equal(mv.balanced_labels(23, seed=3), drawn[:23])
    assert not np.array_equal(mv.balanced_labels(40, seed=4), drawn)
    assert np.array_equal(mv.generate(20, seed=3).labels, drawn[:20])


def test_prefix_determinism_and_seed_sensitivity():
    short = mv.generate(5, seed=7, split="val")
    long = mv.generate(70, seed=7, split="val")  # spans two render chunks: chunk-mates must not matter
    assert np.array_equal(short.videos, long.videos[:5])
    assert np.array_equal(short.labels, long.labels[:5])
    for key in short.meta:
        assert np.array_equal(short.meta[key], long.meta[key][:5]), key
    again = mv.generate(70, seed=7, split="val")
    assert np.array_equal(again.videos, long.videos)
    assert not np.array_equal(mv.generate(5, seed=8, split="val").videos, short.videos)
    assert not np.array_equal(mv.generate(5, seed=7, split="train").videos, short.videos)
    spec = dataclasses.replace(mv.MotionSpec(), translation_speed=(2.0, 2.5))
    assert not np.array_equal(mv.generate(5, seed=7, split="val", spec=spec).videos, short.videos)


def test_appearance_does_not_depend_on_the_label():
    """The class only chooses which of the (always drawn) motion parameters move the object."""
    zero = mv.generate(10, seed=4, labels=np.zeros(10, np.int64))
    nine = mv.generate(10, seed=4, labels=np.full(10, 9))
    for key in ("kind", "sprite", "fg_colour", "bg_colour", "gain", "noise_std", "shake"):
        assert np.array_equal(zero.meta[key], nine.meta[key]), key
    assert np.array_equal(zero.meta["side"], nine.meta["side"]) and np.array_equal(
        zero.meta["angle"], nine.meta["angle"]
    )
    assert not np.array_equal(zero.videos, nine.videos)


def test_splits_use_disjoint_digit_pools():
    from thrifty.data.digit_anatomy import load_mnist_pools

    pools = load_mnist_pools()
    spec = mv.MotionSpec(digit_fraction=1.0)
    rows = {}
    for split in mv.SPLITS:
        batch = mv.generate(60, seed=0, split=split, spec=spec)
        assert (batch.meta["kind"] == "digit").all() and (batch.meta["n_vertices"] == 0).all()
        for i in range(60):
            digit, row = int(batch.meta["digit"][i]), int(batch.meta["pool_index"][i])
            where = np.flatnonzero(pools.indices[split][digit] == row)
            assert where.size == 1  # a digit of this split's pool, of the recorded class
            assert np.array_equal(batch.meta["sprite"][i], pools.images[split][digit][where[0]])
        rows[split] = set(batch.meta["pool_index"].tolist())
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])
    polys = mv.generate(20, seed=0, spec=mv.MotionSpec(digit_fraction=0.0))
    assert (polys.meta["kind"] == "polygon").all() and (polys.meta["pool_index"] == -1).all()
    assert polys.meta["n_vertices"].min() >= 3 and polys.meta["n_vertices"].max() <= 7


@pytest.fixture(scope="module")
def clean_batch() -> mv.MotionBatch:
    """Six videos per class, half digits, rendered without noise so the opacity can be read back."""
    return mv.generate(60, seed=5, spec=CLEAN, labels=np.repeat(np.arange(10), 6))


def test_translations_move_as_named(clean_batch):
    alpha = _opacity(clean_batch)
    centroid = _circular_centroid(alpha)
    net = centroid[:, -1] - centroid[:, 0]  # (N, 2)
    expected = clean_batch.meta["speed"] * 15
    for name, axis, sign in (("right", 0, 1), ("left", 0, -1), ("up", 1, -1), ("down", 1, 1)):
        rows = clean_batch.labels == CLS[name]
        assert np.all(sign * net[rows, axis] > 6), name  # at least 0.5 px/frame over 15 frames
        assert np.allclose(sign * net[rows, axis], expected[rows], atol=1.0), name
        assert np.all(np.abs(net[rows, 1 - axis]) < 0.5), name
    steady = [CLS[c] for c in ("clockwise", "counter_clockwise", "zoom_in", "zoom_out")]  # turn/scale in place
    assert np.all(np.abs(net[np.isin(clean_batch.labels, steady)]) < 1.0)


def test_oscillation_and_jitter(clean_batch):
    alpha = _opacity(clean_batch)
    centroid = _circular_centroid(alpha)
    step = np.diff(centroid, axis=1)  # (N, T-1, 2)
    osc = clean_batch.labels == CLS["oscillate"]
    turns = (np.diff(np.sign(step[osc, :, 0]), axis=1) != 0).sum(1)
    assert np.all(turns >= 2)  # goes back and forth
    assert np.all(np.ptp(centroid[osc, :, 0], axis=1) >= 2.5)  # amplitude >= 2 px
    assert np.all(np.ptp(centroid[osc, :, 1], axis=1) < 0.5)  # horizontal only
    amp = clean_batch.meta["oscillation_amplitude"][osc]
    assert np.all(np.abs(centroid[osc, -1, 0] - centroid[osc, 0, 0]) <= 2 * amp + 0.5)
    jit = clean_batch.labels == CLS["static_jitter"]
    spread = np.abs(centroid[jit] - centroid[jit].mean(1, keepdims=True)).max(axis=(1, 2))
    assert np.all(spread < 2.5) and np.all(spread > 0.1)  # small but nonzero
    assert np.all(np.abs(centroid[jit, -1] - centroid[jit, 0]) < 2.5)  # no drift


def test_zoom_changes_the_area(clean_batch):
    area = _opacity(clean_batch).sum((-1, -2))
    ratio = area[:, -1] / area[:, 0]
    growth = (1 + clean_batch.meta["zoom_rate"].astype(np.float64)) ** 30  # area ~ side², 15 frames
    zin, zout = clean_batch.labels == CLS["zoom_in"], clean_batch.labels == CLS["zoom_out"]
    assert np.all(ratio[zin] > 1.5) and np.allclose(ratio[zin], growth[zin], rtol=0.12)
    assert np.all(ratio[zout] < 1 / 1.5) and np.allclose(ratio[zout], 1 / growth[zout], rtol=0.12)
    steady = ~(zin | zout)
    assert np.all(np.abs(ratio[steady] - 1) < 0.08)


def test_rotation_direction():
    labels = np.repeat([CLS["clockwise"], CLS["counter_clockwise"], CLS["static_jitter"], CLS["right"]], 6)
    for kind, fraction in (("polygon", 0.0), ("digit", 1.0)):
        spec = dataclasses.replace(CLEAN, digit_fraction=fraction)
        batch = mv.generate(len(labels), seed=6, spec=spec, labels=labels)
        assert (batch.meta["kind"] == kind).all()
        omega = np.rad2deg(_angular_velocity(_opacity(batch), batch.meta["centre"].astype(np.float64)))
        per_video = np.median(omega, axis=1)
        truth = batch.meta["rotation_speed"]
        cw, ccw = batch.labels == CLS["clockwise"], batch.labels == CLS["counter_clockwise"]
        assert np.all(per_video[cw] > 0.5 * truth[cw]), (kind, per_video, truth)
        assert np.all(per_video[ccw] < -0.5 * truth[ccw]), (kind, per_video, truth)
        assert np.all(np.abs(per_video[~(cw | ccw)]) < 2.0), (kind, per_video)  # the minimum speed is 4 deg/frame
        assert np.allclose(np.diff(batch.meta["angle"][cw], axis=1), truth[cw, None], atol=1e-4)


def _features_single(frames: np.ndarray) -> np.ndarray:
    """Single-frame features (N, F): where the object is (8x8 pooled deviation from the median colour), its size and
    shape (low-frequency log power spectrum), colour and contrast statistics."""
    x = frames.astype(np.float64) / 255.0
    n, size = len(x), x.shape[1]
    dev = np.abs(x - np.median(x, axis=(1, 2), keepdims=True)).sum(-1)
    pooled = dev.reshape(n, 8, size // 8, 8, size // 8).mean((2, 4)).reshape(n, -1)
    gray = x.mean(-1)
    spectrum = np.abs(np.fft.rfft2(gray - gray.mean((1, 2), keepdims=True)))[:, :6, :6].reshape(n, -1)[:, 1:]
    stats = np.concatenate([x.mean((1, 2)), x.std((1, 2)), (dev > 0.3).mean((1, 2))[:, None]], axis=1)
    return np.concatenate([pooled, np.log(spectrum**2 + 1e-6), stats], axis=1)


def _features_motion(first: np.ndarray, later: np.ndarray) -> np.ndarray:
    """Two-frame features: the same single-frame features plus the normalised low-frequency cross-spectrum (its
    phase is the displacement) and the pooled absolute frame difference."""
    a, b = (f.astype(np.float64).mean(-1) / 255.0 for f in (first, later))
    n, size = len(a), a.shape[1]
    fa, fb = (np.fft.rfft2(g - g.mean((1, 2), keepdims=True))[:, :6, :6].reshape(n, -1)[:, 1:] for g in (a, b))
    cross = fb * np.conj(fa)
    cross /= np.abs(cross) + 1e-6
    pooled = np.abs(b - a).reshape(n, 8, size // 8, 8, size // 8).mean((2, 4)).reshape(n, -1)
    return np.concatenate([_features_single(first), cross.real, cross.imag, pooled], axis=1)


def _ridge_accuracy(x_tr, y_tr, x_te, y_te, lam: float = 100.0) -> float:
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a = np.c_[(x_tr - mu) / sd, np.ones(len(x_tr))]
    b = np.c_[(x_te - mu) / sd, np.ones(len(x_te))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(10)[y_tr])
    return float((np.argmax(b @ w, axis=1) == y_te).mean())


def test_single_frame_is_near_chance_but_motion_is_not():
    """A linear classifier on single-frame features sits near chance at any frame; the same classifier given a
    second frame (displacement features) is far above it. The default spec, 700 train / 400 test videos."""
    train, test = mv.generate(700, seed=11), mv.generate(400, seed=12, split="val")
    single = {
        t: _ridge_accuracy(
            _features_single(train.videos[:, t]), train.labels, _features_single(test.videos[:, t]), test.labels
        )
        for t in (0, 5, 10, 15)
    }
    assert max(single.values()) < 0.18, single  # chance 0.10; one sd at 400 test videos is 0.015
    assert np.mean(list(single.values())) < 0.15, single
    motion = _ridge_accuracy(
        _features_motion(train.videos[:, 5], train.videos[:, 9]),
        train.labels,
        _features_motion(test.videos[:, 5], test.videos[:, 9]),
        test.labels,
    )
    assert motion > 0.3 and motion > max(single.values()) + 0.15, (motion, single)


def test_frame_statistics_do_not_depend_on_the_class():
    """Per-class mean brightness, object area and position (on the torus) agree across classes at every frame."""
    batch = mv.generate(400, seed=13)
    frames = batch.videos.astype(np.float64).mean(axis=(2, 3, 4))  # (N, T) mean brightness
    for t in (0, 8, 15):
        means = np.array([frames[batch.labels == c, t].mean() for c in range(10)])
        sem = frames[:, t].std() / np.sqrt(40)
        assert np.ptp(means) < 6 * sem, (t, means)
        pos = batch.meta["centre"][:, t].astype(np.float64) * 2 * np.pi / 32
        for c in range(10):
            resultant = np.abs(np.exp(1j * pos[batch.labels == c]).mean(0))  # ~1/sqrt(40) when uniform
            assert np.all(resultant < 0.45), (t, c, resultant)
        log_side = np.log(batch.meta["side"][:, t].astype(np.float64))
        side_means = np.array([log_side[batch.labels == c].mean() for c in range(10)])
        steady = [c for c in range(10) if mv.MOTION_CLASSES[c] not in ("zoom_in", "zoom_out")]
        assert np.ptp(side_means[steady]) < 0.15, (t, side_means)
        # the zoom classes' size is shifted at most by half the largest zoom over the clip (documented residual cue)
        bound = 7.5 * np.log(1 + mv.MotionSpec().zoom_rate[1]) + 0.15
        assert np.all(np.abs(side_means - side_means[steady].mean()) < bound), (t, side_means)


def test_wrap_off_keeps_the_centre_in_the_middle_box():
    spec = mv.MotionSpec(wrap=False, center_range=0.4, camera_shake_std=0.0)
    batch = mv.generate(20, seed=3, spec=spec, labels=np.full(20, CLS["zoom_in"]))
    centre = batch.meta["centre"]
    assert np.all(np.abs(centre - 15.5) <= 0.2 * 32 + 1e-4)
    clean = dataclasses.replace(CLEAN, wrap=False, center_range=0.3, translation_speed=(0.5, 0.5))
    right = mv.generate(6, seed=3, spec=clean, labels=np.full(6, CLS["right"]))
    alpha = _opacity(right)
    x = (alpha.sum(-2) * np.arange(32)).sum(-1) / alpha.sum((-1, -2))
    assert np.all(np.diff(x, axis=1) > 0.2)


def test_camera_shake_moves_the_background():
    still = dataclasses.replace(CLEAN, background_contrast=0.2)
    shaky = dataclasses.replace(still, camera_shake_std=1.0)
    labels = np.full(4, CLS["zoom_in"])
    a = mv.generate(4, seed=9, spec=still, labels=labels).videos.astype(int)
    b = mv.generate(4, seed=9, spec=shaky, labels=labels).videos.astype(int)
    # far from the object (the frame's corner opposite its centre is not guaranteed, so use the median change)
    assert np.median(np.abs(np.diff(a, axis=1))) == 0
    assert np.median(np.abs(np.diff(b, axis=1))) > 0


def test_background_colour_range_bounds_the_background_and_the_default_keeps_the_old_draws():
    narrow = mv.generate(30, seed=4, spec=mv.MotionSpec(background_colour=(0.45, 0.55)))
    assert np.all((narrow.meta["bg_colour"] >= 0.45) & (narrow.meta["bg_colour"] <= 0.55))
    wide = mv.generate(30, seed=4).meta["bg_colour"]
    assert wide.min() >= 0.15 and wide.max() <= 0.85 and np.ptp(wide) > 0.5
    # only the background's mean colour comes from the knob: the rest of the stream is drawn as before
    default = mv.generate(30, seed=4)
    for key in ("kind", "digit", "centre", "angle", "side", "speed"):
        assert np.array_equal(narrow.meta[key], default.meta[key]), key
    assert np.array_equal(narrow.labels, default.labels)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("translation_speed", (1.0, 0.5)),
        ("rotation_speed", (5.0, 90.0)),
        ("zoom_rate", (-0.1, 0.1)),
        ("oscillation_period", (1.0, 4.0)),
        ("oscillation_amplitude", "wide"),
        ("scale_range", (0.0, 0.5)),
        ("brightness", (0.0, 1.0)),
        ("noise_std", (0.0, 2.0)),
        ("background_colour", (0.2, 1.2)),
        ("jitter_std", -1.0),
        ("camera_shake_std", float("nan")),
        ("digit_fraction", 1.5),
        ("background_contrast", -0.1),
        ("background_sigma", 0.0),
        ("min_colour_distance", 2.0),
        ("center_range", 1.5),
        ("wrap", "yes"),
    ],
)
def test_bad_spec_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        mv.MotionSpec(**{field: value})


def test_bad_arguments_raise():
    with pytest.raises(TypeError):
        mv.MotionSpec((0.5, 1.0))  # keyword-only
    with pytest.raises(ValueError, match="scale_range"):
        mv.generate(1, seed=0, num_frames=64)  # the default zoom would outgrow the frame
    with pytest.raises(ValueError, match="split"):
        mv.generate(1, seed=0, split="dev")
    with pytest.raises(ValueError, match="labels"):
        mv.generate(2, seed=0, labels=np.array([0, 10]))
    with pytest.raises(ValueError, match="labels"):
        mv.generate(2, seed=0, labels=np.array([0]))
    with pytest.raises(ValueError, match="seed"):
        mv.generate(1, seed=-1)
    with pytest.raises(ValueError, match="n must"):
        mv.generate(-1, seed=0)
    spec = mv.MotionSpec(translation_speed=[0.2, 0.4])  # lists are accepted and frozen as tuples
    assert spec.translation_speed == (0.2, 0.4) and spec.to_dict()["translation_speed"] == [0.2, 0.4]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.jitter_std = 1.0  # type: ignore[misc]
