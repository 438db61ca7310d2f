"""Real-format video data for the temporal-gradient recipe's full-scale path: decoding, split lists, frame sampling.

The recipe is Xiao et al., *Learning from Temporal Gradient for Semi-supervised Action Recognition* (CVPR 2022,
arXiv 2111.13241; official code ``lambert-x/video-semisup``, an MMAction2 0.16 fork). This module holds what the
recipe needs from real datasets and nothing recipe-specific:

- **Decoding.** :func:`read_video` decodes a file with PyAV (FFmpeg) into ``uint8`` RGB frames ``(T, H, W, 3)``; with
  ``indices`` it decodes sequentially, converts only the requested frames to RGB and stops after the last one.
  :func:`write_video` writes frames (default ``libx264``, CRF 18, ``yuv420p`` — **lossy**: expect a mean error of
  about one grey level and chroma blur at sharp colour edges; even height and width are required).
  :func:`video_info` reads the header.
- **Raw-frame folders** (MMAction2's ``rawframes`` layout, ``<frame_dir>/img_00001.jpg`` …, first file number 1):
  :func:`read_frame_folder`, :func:`count_frames`, :func:`write_frame_folder` (Pillow).
- **Split lists** as :class:`VideoRecord` lists: :func:`parse_ucf101`, :func:`parse_hmdb51`,
  :func:`parse_kinetics_csv`, the release's ``"frame_dir n_frames label"`` lists (:func:`parse_rawframe_list`) and
  ``"path label"`` video lists (:func:`parse_video_list`). The method card marks the public formats as unverified, so
  file names and column names are arguments. Checked against the release: its UCF-101 labels are ``classInd`` id − 1,
  its HMDB-51 labels are the alphabetical class order, and its Kinetics-400 labels are the sorted class names after
  MMAction2's ``convert_label`` (``"`` removed, spaces → ``_``) — which is also the folder name.
- **Sampling.** :func:`sample_clip_indices` reproduces MMAction2's ``SampleFrames`` (``out_of_bound_opt='loop'`` by
  default) on the frames at or after ``min_index``, so the raw predecessor ``index - 1`` of every sampled frame
  exists and the temporal gradient can be computed exactly, on the fly.

Every bad input — a missing, empty, corrupt or non-video file, a folder without frames, a malformed line — raises one
:class:`VideoDataError` whose message starts with the file (and ``:line`` for text files).
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO

import numpy as np

__all__ = [
    "DEFAULT_KINETICS_PATTERN",
    "DEFAULT_RAWFRAME_PATTERN",
    "VideoDataError",
    "VideoInfo",
    "VideoRecord",
    "check_exists",
    "count_frames",
    "decode_clip",
    "kinetics_label",
    "parse_hmdb51",
    "parse_kinetics_csv",
    "parse_rawframe_list",
    "parse_ucf101",
    "parse_video_list",
    "read_class_index",
    "read_frame_folder",
    "read_video",
    "sample_clip_indices",
    "video_info",
    "write_frame_folder",
    "write_video",
]

PathLike = str | os.PathLike[str]

DEFAULT_RAWFRAME_PATTERN = "img_{:05d}.jpg"
DEFAULT_KINETICS_PATTERN = "{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"
_DEFAULT_CODEC_OPTIONS: dict[str, dict[str, str]] = {"libx264": {"crf": "18"}}


class VideoDataError(ValueError):
    """A video, frame folder or split file is missing or malformed; the message starts with its name (and line)."""


@dataclass(frozen=True)
class VideoRecord:
    """One labelled video of a split.

    Attributes:
        path: the video file or raw-frame folder (``video_root`` / ``root`` joined with the listed relative path).
        label: 0-based class index.
        num_frames: frame count when the listing gives one (raw-frame lists), else ``None``.
        name: the listed relative path without extension, e.g. ``"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01"``.
    """

    path: str
    label: int
    num_frames: int | None = None
    name: str = ""


class VideoInfo(NamedTuple):
    """Header facts of a video file: ``num_frames`` (see :func:`video_info`), ``fps``, ``height``, ``width``."""

    num_frames: int
    fps: float
    height: int
    width: int


# ---------------------------------------------------------------------------------------------------------- decoding


def _av() -> Any:  # imported lazily so that the rest of the module (parsers, sampling) works without the `video` extra
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("video decoding needs PyAV: pip install 'thrifty[video]' (or pip install av)") from e
    return av


def _check_file(path: Path, what: str = "video file") -> None:
    if not path.exists():
        raise VideoDataError(f"{path}: {what} not found")
    if not path.is_file():
        raise VideoDataError(f"{path}: expected a {what}, found a directory or special file")
    if path.stat().st_size == 0:
        raise VideoDataError(f"{path}: empty file (0 bytes), expected a {what}")


def _ffmpeg_reason(err: BaseException) -> str:
    reason = getattr(err, "strerror", None)
    return str(reason) if reason else (str(err) or type(err).__name__)


def _open_video(path: Path) -> tuple[Any, Any]:
    """Open ``path`` with PyAV and return ``(container, video_stream)``; every failure is a VideoDataError."""
    av = _av()
    _check_file(path)
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoDataError(f"{path}: cannot open as a video ({_ffmpeg_reason(e)})") from e
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoDataError(f"{path}: no video stream (streams found: {', '.join(kinds)})")
    return container, container.streams.video[0]


def _as_index_array(indices: Sequence[int] | np.ndarray, source: Path) -> np.ndarray:
    arr = np.asarray(indices)
    if arr.size == 0:
        raise ValueError(f"{source}: no frame indices requested")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{source}: frame indices must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0:
        raise ValueError(f"{source}: frame indices must be >= 0, got {int(arr.min())}")
    return arr.astype(np.int64)


def read_video(
    path: PathLike,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Decode a video file into RGB frames.

    Args:
        path: any container/codec FFmpeg reads (``.avi``, ``.mp4``, ``.mkv``, ``.webm`` …).
        indices: 0-based frame indices, any shape (e.g. ``(num_clips, clip_len)`` from :func:`sample_clip_indices`),
            repeats and any order allowed. Frames are decoded sequentially from the start; only the requested ones
            are converted to RGB and decoding stops after the largest index.
        max_frames: without ``indices``, stop after this many frames.

    Returns:
        ``uint8`` array ``(T, H, W, 3)`` without ``indices``, else ``(*indices.shape, H, W, 3)``. Every frame is
        converted at the size of the first decoded frame.

    Raises:
        VideoDataError: missing, empty, corrupt or non-video file, no video stream, zero decodable frames, a decoding
            error, or an index at or beyond the number of decodable frames; the message starts with ``path``.
    """
    av = _av()
    src = Path(path)
    if indices is not None and max_frames is not None:
        raise ValueError("read_video: pass either indices or max_frames, not both")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"read_video: max_frames must be >= 1, got {max_frames}")
    wanted = _as_index_array(indices, src) if indices is not None else None
    needed = set(wanted.ravel().tolist()) if wanted is not None else None
    stop = int(wanted.max()) + 1 if wanted is not None else max_frames

    container, stream = _open_video(src)
    kept: dict[int, np.ndarray] = {}
    frames: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    n = 0
    try:
        for frame in container.decode(stream):
            if size is None:
                size = (frame.width, frame.height)
            if needed is None or n in needed:
                rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                if needed is None:
                    frames.append(rgb)
                else:
                    kept[n] = rgb
            n += 1
            if stop is not None and n >= stop:
                break
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoDataError(f"{src}: decoding failed after {n} frame(s) ({_ffmpeg_reason(e)})") from e
    finally:
        container.close()

    if n == 0:
        raise VideoDataError(f"{src}: no decodable video frames")
    if wanted is None:
        return np.stack(frames)
    if int(wanted.max()) >= n:
        raise VideoDataError(f"{src}: frame index {int(wanted.max())} requested but only {n} frame(s) decode")
    flat = np.stack([kept[i] for i in wanted.ravel().tolist()])
    return flat.reshape(*wanted.shape, *flat.shape[1:])


def video_info(path: PathLike, *, exact: bool = False) -> VideoInfo:
    """Frame count, frame rate and size of a video file, cheaply.

    ``num_frames`` is the container's count when it stores one (MP4, AVI), else the number of non-empty video packets
    (MKV/WebM; demuxed, not decoded). On a truncated or damaged file the header count can exceed the number of
    *decodable* frames (a half-cut AVI still claims all its frames); ``exact=True`` decodes the stream (no RGB
    conversion) and counts frames — that is the number :func:`read_video` can serve. ``fps`` is the stream's average
    rate (0.0 when unknown).

    Raises:
        VideoDataError: as :func:`read_video`, naming ``path``.
    """
    av = _av()
    src = Path(path)
    container, stream = _open_video(src)
    try:
        ctx = stream.codec_context
        height, width = int(ctx.height or 0), int(ctx.width or 0)
        rate = stream.average_rate or stream.guessed_rate or 0
        fps = float(rate)
        if exact:
            count = 0
            for count, frame in enumerate(container.decode(stream), start=1):
                if count == 1 and (height == 0 or width == 0):
                    height, width = frame.height, frame.width
        elif stream.frames and stream.frames > 0:
            count = int(stream.frames)
        else:
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise VideoDataError(f"{src}: cannot read the video stream ({_ffmpeg_reason(e)})") from e
    finally:
        container.close()
    if count == 0:
        raise VideoDataError(f"{src}: no video frames")
    return VideoInfo(num_frames=count, fps=fps, height=height, width=width)


def _check_frames(frames: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"{what}: expected frames of shape (T>=1, H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 frames, got {arr.dtype}")
    return arr


def write_video(
    path: PathLike,
    frames: np.ndarray,
    *,
    fps: int = 25,
    codec: str = "libx264",
    options: Mapping[str, str] | None = None,
) -> None:
    """Write ``uint8`` RGB frames ``(T, H, W, 3)`` to a video file (container from the suffix: .mp4, .avi, .mkv …).

    The default ``libx264`` at CRF 18 in ``yuv420p`` is lossy (about one grey level of mean error, chroma halved in
    both directions); ``codec="mpeg4"`` is the other encoder every PyAV wheel carries. ``yuv420p`` needs an even
    height and width. ``options`` are FFmpeg codec options (default ``{"crf": "18"}`` for libx264). The file is written
    to a temporary name beside ``path`` and renamed, so a failure leaves nothing behind.
    """
    av = _av()
    dst = Path(path)
    arr = _check_frames(frames, str(dst))
    _, height, width, _ = arr.shape
    if height % 2 or width % 2:
        raise ValueError(f"{dst}: yuv420p video needs an even height and width, got {height}x{width}")
    if int(fps) != fps or fps < 1:
        raise ValueError(f"{dst}: fps must be a positive integer, got {fps}")
    opts = dict(_DEFAULT_CODEC_OPTIONS.get(codec, {}) if options is None else options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=dst.suffix, dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=int(fps), options=opts)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for rgb in arr:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
            container.mux(stream.encode(None))  # flush delayed (B-)frames
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------ raw-frame folders


def _frame_name(pattern: str, number: int) -> str:
    try:
        name = pattern.format(number)
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"frame pattern {pattern!r} must take one integer field, e.g. 'img_{{:05d}}.jpg'") from e
    if name == pattern.format(number + 1):
        raise ValueError(f"frame pattern {pattern!r} has no frame-number field, e.g. 'img_{{:05d}}.jpg'")
    return name


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise VideoDataError(f"{folder}: frame folder not found")
    if not folder.is_dir():
        raise VideoDataError(f"{folder}: expected a raw-frame folder, found a file")


def count_frames(folder: PathLike, pattern: str = DEFAULT_RAWFRAME_PATTERN, *, start_index: int = 1) -> int:
    """Number of consecutive frame files ``pattern.format(start_index)``, ``pattern.format(start_index + 1)``, … in
    ``folder`` (one directory listing; a gap ends the count).

    Raises:
        VideoDataError: the folder is missing or holds no first frame.
    """
    src = Path(folder)
    _check_folder(src)
    names = set(os.listdir(src))
    count = 0
    while _frame_name(pattern, start_index + count) in names:
        count += 1
    if count == 0:
        raise VideoDataError(f"{src / _frame_name(pattern, start_index)}: first frame not found (pattern {pattern!r})")
    return count


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise VideoDataError(f"{path}: frame not found")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise VideoDataError(f"{path}: unreadable image ({e})") from e


def read_frame_folder(
    folder: PathLike,
    *,
    pattern: str = DEFAULT_RAWFRAME_PATTERN,
    start_index: int = 1,
    indices: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Read a raw-frame folder (MMAction2 ``rawframes``: ``img_00001.jpg`` is frame 0 when ``start_index=1``).

    Args:
        indices: 0-based frame indices of any shape; frame ``i`` is the file ``pattern.format(i + start_index)``.
            Each distinct file is read once. ``None`` reads all :func:`count_frames` frames.
        pattern: e.g. ``"tempgrad_{:05d}.jpg"`` reads the release's precomputed (lossy) TG frames instead.

    Returns:
        ``uint8`` RGB ``(T, H, W, 3)``, or ``(*indices.shape, H, W, 3)``.

    Raises:
        VideoDataError: missing folder or frame, unreadable image, or frames of different sizes; names the file.
    """
    src = Path(folder)
    _check_folder(src)
    if indices is None:
        wanted = np.arange(count_frames(src, pattern, start_index=start_index))
    else:
        wanted = _as_index_array(indices, src)
    cache: dict[int, np.ndarray] = {}
    for i in wanted.ravel().tolist():
        if i in cache:
            continue
        file = src / _frame_name(pattern, i + start_index)
        img = _read_image(file)
        if cache:
            first = next(iter(cache.values()))
            if img.shape != first.shape:
                raise VideoDataError(f"{file}: frame size {img.shape[:2]} differs from the folder's {first.shape[:2]}")
        cache[i] = img
    flat = np.stack([cache[i] for i in wanted.ravel().tolist()])
    return flat.reshape(*wanted.shape, *flat.shape[1:])


def write_frame_folder(
    folder: PathLike,
    frames: np.ndarray,
    *,
    pattern: str = DEFAULT_RAWFRAME_PATTERN,
    start_index: int = 1,
    quality: int = 95,
) -> list[Path]:
    """Write ``uint8`` RGB frames ``(T, H, W, 3)`` as images (JPEG is lossy; a ``.png`` pattern is exact).

    Returns the written paths, frame ``t`` as ``pattern.format(t + start_index)``.
    """
    from PIL import Image

    dst = Path(folder)
    arr = _check_frames(frames, str(dst))
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for t, rgb in enumerate(arr):
        file = dst / _frame_name(pattern, t + start_index)
        Image.fromarray(rgb, mode="RGB").save(file, quality=quality)
        written.append(file)
    return written


def decode_clip(
    source: PathLike,
    indices: Sequence[int] | np.ndarray,
    *,
    pattern: str = DEFAULT_RAWFRAME_PATTERN,
    start_index: int = 1,
) -> np.ndarray:
    """Frames at 0-based ``indices`` from a video file or a raw-frame folder: ``(*indices.shape, H, W, 3)`` uint8.

    For the temporal gradient ask for ``indices`` and ``indices - 1`` in one call (e.g. ``np.stack([idx - 1, idx])``)
    so the file is decoded once.
    """
    src = Path(source)
    if src.is_dir():
        return read_frame_folder(src, pattern=pattern, start_index=start_index, indices=indices)
    return read_video(src, indices=indices)


# ------------------------------------------------------------------------------------------------------------ sampling


def _train_offsets(num_frames: int, span: int, num_clips: int, rng: np.random.Generator) -> np.ndarray:
    """MMAction2 ``SampleFrames._get_train_clips`` (0.16 ``loading.py``), with ``rng`` for ``np.random``."""
    avg_interval = (num_frames - span + 1) // num_clips
    if avg_interval > 0:
        return np.arange(num_clips) * avg_interval + rng.integers(avg_interval, size=num_clips)
    if num_frames > max(num_clips, span):
        return np.sort(rng.integers(num_frames - span + 1, size=num_clips))
    if avg_interval == 0:
        ratio = (num_frames - span + 1.0) / num_clips
        return np.around(np.arange(num_clips) * ratio).astype(np.int64)
    return np.zeros(num_clips, dtype=np.int64)


def _test_offsets(num_frames: int, span: int, num_clips: int) -> np.ndarray:
    """MMAction2 ``SampleFrames._get_test_clips`` (0.16 ``loading.py``, ``twice_sample=False``)."""
    avg_interval = (num_frames - span + 1) / float(num_clips)
    if num_frames > span - 1:
        return (np.arange(num_clips) * avg_interval + avg_interval / 2.0).astype(np.int64)
    return np.zeros(num_clips, dtype=np.int64)


def sample_clip_indices(
    total_frames: int,
    *,
    clip_len: int = 8,
    interval: int = 8,
    num_clips: int = 1,
    test_mode: bool = False,
    rng: np.random.Generator | None = None,
    min_index: int = 1,
    out_of_bound: Literal["loop", "repeat_last"] = "loop",
) -> np.ndarray:
    """0-based frame indices of ``num_clips`` clips of ``clip_len`` frames, ``interval`` apart (MMAction2 semantics).

    MMAction2's ``SampleFrames`` runs on the ``total_frames - min_index`` frames from ``min_index`` on, and the result
    is shifted by ``min_index``; every index is in ``[min_index, total_frames)``, so with ``min_index=1`` the raw
    predecessor ``index - 1`` needed by the temporal gradient always exists.

    - Train (``test_mode=False``): the usable range is cut into ``num_clips`` segments and each clip starts at a
      random offset within its segment (``rng``; a fresh unseeded generator when ``None`` — pass a seeded one for
      reproducible runs). For ``clip_len=8, interval=8, num_clips=1`` the start is uniform on
      ``[0, usable - 64]``.
    - Test: ``num_clips`` evenly spaced clips, each centred in its segment; deterministic.
    - Videos shorter than the span (``clip_len * interval``): with ``out_of_bound="loop"`` (MMAction2's default)
      indices past the end **wrap around** (``% usable``); with ``"repeat_last"`` they repeat the clip's last
      in-range frame.

    This equals the release, which samples ``SampleFrames_Custom(total_frames_offset=-1)`` on ``n - 1`` frames with
    ``start_index=1``: its file number ``k`` is our index ``i``. The release pairs RGB ``img_k`` (raw frame
    ``i - 1``) with ``tempgrad_k = (raw[i-1] - raw[i] + 255) / 2``
    (``tools/data/build_rawframes_temporal_gradient.py``), i.e. its RGB frame is the *earlier* frame of the pair
    ``(i - 1, i)``; use ``frames[i - 1]`` as RGB to match it, ``frames[i]`` for the card's ``I_t``.

    Returns:
        ``int64`` array ``(num_clips, clip_len)``.

    Raises:
        VideoDataError: ``total_frames < min_index + 1`` (no frame has the predecessors it needs).
    """
    for name, value, low in (("clip_len", clip_len, 1), ("interval", interval, 1), ("num_clips", num_clips, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"sample_clip_indices: {name} must be an integer >= {low}, got {value}")
    if int(min_index) != min_index or min_index < 0:
        raise ValueError(f"sample_clip_indices: min_index must be an integer >= 0, got {min_index}")
    if out_of_bound not in ("loop", "repeat_last"):
        raise ValueError(f"sample_clip_indices: out_of_bound must be 'loop' or 'repeat_last', got {out_of_bound!r}")
    usable = int(total_frames) - int(min_index)
    if usable < 1:
        raise VideoDataError(
            f"video has {total_frames} frame(s); at least {min_index + 1} are needed (min_index={min_index})"
        )
    span = clip_len * interval
    if test_mode:
        offsets = _test_offsets(usable, span, num_clips)
    else:
        offsets = _train_offsets(usable, span, num_clips, rng if rng is not None else np.random.default_rng())
    inds = offsets.astype(np.int64)[:, None] + np.arange(clip_len, dtype=np.int64)[None, :] * interval
    if out_of_bound == "loop":
        inds = inds % usable
    else:
        inside = inds < usable
        last = np.max(np.where(inside, inds, 0), axis=1, keepdims=True)
        inds = np.where(inside, inds, last)
    return inds + int(min_index)


# --------------------------------------------------------------------------------------------------------- split lists


def _check_text_file(path: Path, what: str) -> None:
    if not path.exists():
        raise VideoDataError(f"{path}: {what} not found")
    if not path.is_file():
        raise VideoDataError(f"{path}: expected a {what}, found a directory")


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """Non-blank stripped lines of a text file with their 1-based numbers (UTF-8, BOM and CRLF tolerated)."""
    _check_text_file(path, what)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise VideoDataError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse_int(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise VideoDataError(f"{where}: {what} must be an integer, got {text!r}") from None


def _stem(rel: str) -> str:
    return os.path.splitext(rel)[0]


def read_class_index(path: PathLike) -> list[str]:
    """Class names from a UCF-101 style ``classInd.txt`` (lines ``"1 ApplyEyeMakeup"``; ids 1..N, any order).

    Returns names ordered by id, so ``names[label]`` is the class of 0-based ``label``.
    """
    src = Path(path)
    by_id: dict[int, str] = {}
    for n, line in _read_lines(src, "class index file"):
        where = f"{src}:{n}"
        fields = line.split()
        if len(fields) != 2:
            raise VideoDataError(f"{where}: expected 'id name', got {len(fields)} field(s): {line!r}")
        cid = _parse_int(fields[0], where, "class id")
        if cid in by_id:
            raise VideoDataError(f"{where}: class id {cid} appears twice")
        if fields[1] in by_id.values():
            raise VideoDataError(f"{where}: class name {fields[1]!r} appears twice")
        by_id[cid] = fields[1]
    if not by_id:
        raise VideoDataError(f"{src}: class index file lists no classes")
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        missing = sorted(set(range(1, len(by_id) + 1)) - set(by_id))
        raise VideoDataError(f"{src}: class ids must be 1..{len(by_id)}; missing {missing[:5]}")
    return [by_id[i] for i in range(1, len(by_id) + 1)]


def _class_lookup(names: Sequence[str]) -> Callable[[str], int | None]:
    exact = {name: i for i, name in enumerate(names)}
    folded: dict[str, int | None] = {}
    for i, name in enumerate(names):
        key = name.casefold()
        folded[key] = None if key in folded else i  # ambiguous case-insensitive names resolve to nothing

    def lookup(name: str) -> int | None:
        return exact[name] if name in exact else folded.get(name.casefold())

    return lookup


def parse_ucf101(
    split_dir: PathLike,
    *,
    split: int = 1,
    subset: Literal["train", "test"] = "train",
    video_root: PathLike,
    class_index_file: str = "classInd.txt",
    list_pattern: str = "{subset}list{split:02d}.txt",
) -> tuple[list[VideoRecord], list[str]]:
    """UCF-101 split (``ucfTrainTestlist``; file names are the usual ones but unverified, hence arguments).

    ``classInd.txt`` lines ``"1 ApplyEyeMakeup"``; ``trainlist01.txt`` lines
    ``"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"`` (1-based); ``testlist01.txt`` lines are paths only and the
    label comes from the folder name through ``classInd`` (exact name, else a unique case-insensitive match). Labels
    in the records are 0-based (``id - 1``, as in the release's lists). A train line whose folder names another class
    than its label is an error.

    Returns:
        ``(records, class_names)`` with ``class_names[label]`` the name. Videos need not exist (:func:`check_exists`).
    """
    if subset not in ("train", "test"):
        raise ValueError(f"parse_ucf101: subset must be 'train' or 'test', got {subset!r}")
    root = Path(split_dir)
    names = read_class_index(root / class_index_file)
    lookup = _class_lookup(names)
    list_file = root / list_pattern.format(subset=subset, split=split)
    records = []
    for n, line in _read_lines(list_file, f"UCF-101 {subset} list"):
        where = f"{list_file}:{n}"
        fields = line.split()
        if len(fields) not in (1, 2):
            raise VideoDataError(f"{where}: expected 'path [label]', got {len(fields)} field(s): {line!r}")
        rel = fields[0].replace("\\", "/")
        folder = rel.rsplit("/", 1)[0] if "/" in rel else None
        from_folder = lookup(folder) if folder is not None else None
        if len(fields) == 2:
            cid = _parse_int(fields[1], where, "label")
            if not 1 <= cid <= len(names):
                raise VideoDataError(f"{where}: label {cid} out of range 1..{len(names)}")
            label = cid - 1
            if folder is not None and from_folder is not None and from_folder != label:
                raise VideoDataError(
                    f"{where}: label {cid} ({names[label]}) disagrees with folder {folder!r} ({names[from_folder]})"
                )
        else:
            if folder is None:
                raise VideoDataError(f"{where}: path {rel!r} has no class folder and the line has no label")
            if from_folder is None:
                raise VideoDataError(f"{where}: unknown class {folder!r} (not in {class_index_file})")
            label = from_folder
        records.append(VideoRecord(path=str(Path(video_root) / rel), label=label, name=_stem(rel)))
    if not records:
        raise VideoDataError(f"{list_file}: lists no videos")
    return records, names


def parse_hmdb51(
    split_dir: PathLike,
    *,
    split: int = 1,
    subset: Literal["train", "test"] = "train",
    video_root: PathLike,
    file_pattern: str = "{class_name}_test_split{split}.txt",
    classes: Sequence[str] | None = None,
) -> tuple[list[VideoRecord], list[str]]:
    """HMDB-51 split from per-class files ``<class>_test_split<k>.txt`` with lines ``"video.avi 1"``.

    Flags: ``1`` train, ``2`` test, ``0`` unused (the format is unverified; ``file_pattern`` is an argument). Classes
    are the ``file_pattern`` files found in ``split_dir``, sorted — the order of the release's labels — unless
    ``classes`` is given. Videos are ``video_root/<class>/<video>``.

    Returns:
        ``(records, class_names)``; labels 0-based.
    """
    if subset not in ("train", "test"):
        raise ValueError(f"parse_hmdb51: subset must be 'train' or 'test', got {subset!r}")
    if "{class_name}" not in file_pattern:
        raise ValueError(f"parse_hmdb51: file_pattern {file_pattern!r} needs a '{{class_name}}' field")
    root = Path(split_dir)
    if not root.is_dir():
        raise VideoDataError(f"{root}: HMDB-51 split folder not found")
    if classes is None:
        prefix, suffix = file_pattern.format(class_name="\0", split=split).split("\0")
        found = [
            name[len(prefix) : len(name) - len(suffix)]
            for name in os.listdir(root)
            if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)
        ]
        names = sorted(found)
        if not names:
            example = file_pattern.format(class_name="<class>", split=split)
            raise VideoDataError(f"{root}: no HMDB-51 split files like {example!r}")
    else:
        names = list(classes)
    want = "1" if subset == "train" else "2"
    records = []
    for label, cls in enumerate(names):
        split_file = root / file_pattern.format(class_name=cls, split=split)
        for n, line in _read_lines(split_file, "HMDB-51 split file"):
            where = f"{split_file}:{n}"
            fields = line.split()
            if len(fields) != 2:
                raise VideoDataError(f"{where}: expected 'video flag', got {len(fields)} field(s): {line!r}")
            if fields[1] not in ("0", "1", "2"):
                raise VideoDataError(f"{where}: flag must be 0 (unused), 1 (train) or 2 (test), got {fields[1]!r}")
            if fields[1] == want:
                rel = f"{cls}/{fields[0]}"
                records.append(VideoRecord(path=str(Path(video_root) / rel), label=label, name=_stem(rel)))
    if not records:
        raise VideoDataError(f"{root}: no {subset} videos in split {split}")
    return records, names


def kinetics_label(raw: str) -> str:
    """MMAction2's Kinetics ``convert_label``: drop ``"`` and turn spaces into ``_`` (the class folder name)."""
    return raw.replace('"', "").replace(" ", "_")


def _time(text: str, where: str, column: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise VideoDataError(f"{where}: {column} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise VideoDataError(f"{where}: {column} must be a non-negative number, got {text!r}")
    return int(value)  # MMAction2: int(float(x))


def _read_csv_rows(src: Path, handle: TextIO) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """Header and ``(file:line, {column: value})`` rows of a CSV; blank rows skipped, ragged rows rejected."""
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
        raise VideoDataError(f"{src}: empty CSV")
    header = [h.strip() for h in header]
    rows = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{src}:{reader.line_num}"
        if len(row) != len(header):
            raise VideoDataError(f"{where}: expected {len(header)} fields, got {len(row)}")
        rows.append((where, dict(zip(header, (cell.strip() for cell in row)))))
    return header, rows


def parse_kinetics_csv(
    csv_path: PathLike,
    *,
    video_root: PathLike,
    pattern: str = DEFAULT_KINETICS_PATTERN,
    classes: Sequence[str] | None = None,
    subset: str | None = None,
    label_column: str = "label",
    id_column: str = "youtube_id",
    start_column: str = "time_start",
    end_column: str = "time_end",
    split_column: str = "split",
    label_transform: Callable[[str], str] = kinetics_label,
) -> tuple[list[VideoRecord], list[str]]:
    """Kinetics-400 style CSV (``label,youtube_id,time_start,time_end,split``; columns are arguments, unverified).

    Each row's label goes through ``label_transform`` (default :func:`kinetics_label`, MMAction2's folder name, e.g.
    ``"air drumming"`` → ``"air_drumming"``). Class order is the sorted transformed labels of **all** rows of the file
    (pass ``classes`` from the training CSV when reading validation); ``classes`` are transformed the same way. The
    video path is ``video_root / pattern.format(...)`` with fields ``label`` (transformed), ``raw_label``,
    ``youtube_id``, ``time_start`` and ``time_end`` (integers, parsed as ``int(float(x))``) and every column by name.
    The default pattern ``{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`` matches the release's lists.
    ``subset`` keeps rows whose ``split_column`` equals it.

    Returns:
        ``(records, class_names)``; labels 0-based.
    """
    src = Path(csv_path)
    _check_text_file(src, "Kinetics CSV")
    with src.open(newline="", encoding="utf-8-sig") as f:
        try:
            header, rows = _read_csv_rows(src, f)
        except UnicodeDecodeError as e:
            raise VideoDataError(f"{src}: Kinetics CSV is not UTF-8 text ({e.reason} at byte {e.start})") from e
    need = [label_column, id_column, start_column, end_column] + ([split_column] if subset is not None else [])
    missing = [c for c in need if c not in header]
    if missing:
        raise VideoDataError(f"{src}:1: missing column(s) {missing}; header is {header}")
    for where, values in rows:
        if not values[label_column]:
            raise VideoDataError(f"{where}: empty {label_column!r}")
    if not rows:
        raise VideoDataError(f"{src}: CSV has a header but no rows")
    if classes is None:
        names = sorted({label_transform(values[label_column]) for _, values in rows})
    else:
        names = [label_transform(c) for c in classes]
    index = {name: i for i, name in enumerate(names)}
    records = []
    for where, values in rows:
        if subset is not None and values[split_column] != subset:
            continue
        label = label_transform(values[label_column])
        if label not in index:
            raise VideoDataError(f"{where}: unknown class {values[label_column]!r}")
        fields = {
            **values,
            "label": label,
            "raw_label": values[label_column],
            "youtube_id": values[id_column],
            "time_start": _time(values[start_column], where, start_column),
            "time_end": _time(values[end_column], where, end_column),
        }
        try:
            rel = pattern.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"Kinetics file-name pattern {pattern!r}: {e!r}; fields are {sorted(fields)}") from e
        records.append(VideoRecord(path=str(Path(video_root) / rel), label=index[label], name=_stem(rel)))
    if not records:
        raise VideoDataError(f"{src}: no rows" + (f" with {split_column}={subset!r}" if subset is not None else ""))
    return records, names


def _parse_list(
    path: PathLike, root: PathLike, num_classes: int | None, with_frames: bool, what: str
) -> list[VideoRecord]:
    src = Path(path)
    expected = "frame_dir n_frames label" if with_frames else "path label"
    records = []
    for n, line in _read_lines(src, what):
        where = f"{src}:{n}"
        fields = line.split()
        if len(fields) != (3 if with_frames else 2):
            raise VideoDataError(f"{where}: expected '{expected}', got {len(fields)} field(s): {line!r}")
        label = _parse_int(fields[-1], where, "label")
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise VideoDataError(f"{where}: label {label} out of range {bound}")
        num_frames = None
        if with_frames:
            num_frames = _parse_int(fields[1], where, "n_frames")
            if num_frames < 1:
                raise VideoDataError(f"{where}: n_frames must be >= 1, got {num_frames}")
        rel = fields[0]
        name = rel if with_frames else _stem(rel)
        records.append(VideoRecord(path=str(Path(root) / rel), label=label, num_frames=num_frames, name=name))
    if not records:
        raise VideoDataError(f"{src}: lists no videos")
    return records


def parse_rawframe_list(path: PathLike, *, root: PathLike, num_classes: int | None = None) -> list[VideoRecord]:
    """MMAction2 raw-frame list, as the release's ``videossl_splits/*_rawframes.txt``: lines
    ``"frame_dir n_frames label"`` (e.g. ``"HighJump/v_HighJump_g12_c01 108 39"``; 0-based labels).

    ``n_frames`` counts the RGB ``img_*`` files; records get ``path = root / frame_dir``. With ``num_classes`` a label
    outside ``0..num_classes-1`` is an error.
    """
    return _parse_list(path, root, num_classes, True, "raw-frame list")


def parse_video_list(path: PathLike, *, root: PathLike, num_classes: int | None = None) -> list[VideoRecord]:
    """MMAction2 video list, as the release's ``kinetics400_train_*_percent_labeled_videos.txt``: lines
    ``"relative/path.mp4 label"`` (0-based)."""
    return _parse_list(path, root, num_classes, False, "video list")


def check_exists(records: Iterable[VideoRecord], *, max_listed: int = 5) -> None:
    """Raise one :class:`VideoDataError` naming the first ``max_listed`` records whose path does not exist."""
    missing: list[str] = []
    total = 0
    for record in records:
        if not os.path.exists(record.path):
            total += 1
            if len(missing) < max_listed:
                missing.append(record.path)
    if total:
        more = f" (and {total - len(missing)} more)" if total > len(missing) else ""
        raise VideoDataError(f"{total} listed video(s) not found: {', '.join(missing)}{more}")
