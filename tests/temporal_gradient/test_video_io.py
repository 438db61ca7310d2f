"""Video decoding, raw-frame folders, split parsers and clip sampling of :mod:`thrifty.data.video`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("PIL")

from thrifty.data.video import (
    VideoDataError,
    VideoRecord,
    check_exists,
    count_frames,
    decode_clip,
    parse_hmdb51,
    parse_kinetics_csv,
    parse_rawframe_list,
    parse_ucf101,
    parse_video_list,
    read_class_index,
    read_frame_folder,
    read_video,
    sample_clip_indices,
    video_info,
    write_frame_folder,
    write_video,
)

T, H, W, SQ = 20, 32, 32, 8  # frames, height, width, square side


def moving_square(t: int = T) -> np.ndarray:
    """(t, H, W, 3) uint8: dark grey background, a bright square moving one pixel right per frame."""
    frames = np.full((t, H, W, 3), 40, dtype=np.uint8)
    for i in range(t):
        frames[i, 12 : 12 + SQ, i : i + SQ] = (230, 220, 210)
    return frames


def square_x(frames: np.ndarray) -> np.ndarray:
    """Left edge of the bright square per frame, from the column brightness profile: (T,)."""
    cols = frames.astype(np.float64).mean(axis=(1, 3))  # (T, W)
    kernel = np.ones(SQ)
    return np.array([int(np.argmax(np.convolve(c, kernel, mode="valid"))) for c in cols])


@pytest.fixture
def video(tmp_path: Path) -> tuple[Path, np.ndarray]:
    frames = moving_square()
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=25)
    return path, frames


# ------------------------------------------------------------------------------------------------------------ decoding


def test_round_trip_shape_dtype_and_pixels(video: tuple[Path, np.ndarray]) -> None:
    path, frames = video
    out = read_video(path)
    assert out.shape == (T, H, W, 3)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(np.int16) - frames).mean() < 8  # lossy codec
    np.testing.assert_array_equal(square_x(out), np.arange(T))


@pytest.mark.parametrize(("codec", "suffix"), [("mpeg4", ".avi"), ("libx264", ".mkv")])
def test_other_codecs_and_containers(tmp_path: Path, codec: str, suffix: str) -> None:
    frames = moving_square()
    path = tmp_path / f"clip{suffix}"
    write_video(path, frames, codec=codec)
    out = read_video(path)
    assert out.shape == frames.shape
    assert np.abs(out.astype(np.int16) - frames).mean() < 8
    np.testing.assert_array_equal(square_x(out), np.arange(T))
    assert video_info(path) == (T, 25.0, H, W)  # .mkv has no header count: packets are counted


def test_indices_match_full_decode(video: tuple[Path, np.ndarray]) -> None:
    path, _ = video
    full = read_video(path)
    idx = np.array([[3, 1, 19], [7, 7, 0]])  # any shape, order and repeats
    out = read_video(path, indices=idx)
    assert out.shape == (2, 3, H, W, 3)
    np.testing.assert_array_equal(out, full[idx])
    np.testing.assert_array_equal(read_video(path, indices=[5]), full[[5]])
    np.testing.assert_array_equal(read_video(path, max_frames=4), full[:4])


def test_index_past_end_names_file(video: tuple[Path, np.ndarray]) -> None:
    path, _ = video
    with pytest.raises(VideoDataError, match=r"clip\.mp4.*index 20.*20 frame"):
        read_video(path, indices=[0, 20])
    with pytest.raises(ValueError, match=r"clip\.mp4"):
        read_video(path, indices=[-1])


def test_video_info(video: tuple[Path, np.ndarray]) -> None:
    path, _ = video
    info = video_info(path)
    assert info == (T, 25.0, H, W)
    assert (info.num_frames, info.height, info.width) == (T, H, W)
    assert video_info(path, exact=True).num_frames == T


def _write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("kind", ["random", "empty", "text", "truncated", "audio", "missing", "folder"])
def test_bad_video_files_raise_naming_file(tmp_path: Path, video: tuple[Path, np.ndarray], kind: str) -> None:
    path = tmp_path / f"bad_{kind}.mp4"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file, not a video\n" * 10)
    elif kind == "truncated":
        data = video[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "audio":
        path = tmp_path / "bad_audio.wav"
        _write_audio_only(path)
    elif kind == "folder":
        path.mkdir()
    for call in (lambda: read_video(path), lambda: video_info(path), lambda: read_video(path, indices=[0])):
        with pytest.raises(VideoDataError, match=re.escape(path.name)) as err:
            call()
        assert str(err.value).startswith(str(path))
    if kind == "audio":
        with pytest.raises(VideoDataError, match="no video stream"):
            read_video(path)


def test_write_video_validates_and_leaves_nothing_behind(tmp_path: Path) -> None:
    frames = moving_square()
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", frames[:, :31])
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", frames.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "gray.mp4", frames[..., 0])
    with pytest.raises(Exception):  # noqa: B017 - PyAV's own error for an unknown encoder
        write_video(tmp_path / "x.mp4", frames, codec="no-such-codec")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------- raw-frame folders


def test_frame_folder_round_trip(tmp_path: Path) -> None:
    frames = moving_square()
    folder = tmp_path / "v_Test_g01_c01"
    files = write_frame_folder(folder, frames)
    assert [f.name for f in files[:2]] == ["img_00001.jpg", "img_00002.jpg"]
    assert count_frames(folder) == T
    out = read_frame_folder(folder)
    assert out.shape == (T, H, W, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.int16) - frames).mean() < 8  # JPEG
    np.testing.assert_array_equal(square_x(out), np.arange(T))
    idx = np.array([[1, 9], [17, 1]])
    np.testing.assert_array_equal(read_frame_folder(folder, indices=idx), out[idx])

    png = tmp_path / "png"
    write_frame_folder(png, frames, pattern="frame{:04d}.png", start_index=0)
    assert (png / "frame0000.png").is_file()
    np.testing.assert_array_equal(read_frame_folder(png, pattern="frame{:04d}.png", start_index=0), frames)


def test_decode_clip_gives_tg_pairs_from_video_and_folder(tmp_path: Path, video: tuple[Path, np.ndarray]) -> None:
    path, frames = video
    folder = tmp_path / "png"
    write_frame_folder(folder, frames, pattern="img_{:05d}.png")
    idx = sample_clip_indices(T, clip_len=4, interval=4, test_mode=True)  # (1, 4), all >= 1
    pairs = decode_clip(folder, np.stack([idx - 1, idx]), pattern="img_{:05d}.png")
    assert pairs.shape == (2, 1, 4, H, W, 3)
    np.testing.assert_array_equal(pairs[0], frames[idx - 1])  # lossless PNG: exact predecessor frames
    np.testing.assert_array_equal(pairs[1], frames[idx])
    from_video = decode_clip(path, np.stack([idx - 1, idx]))
    np.testing.assert_array_equal(from_video, read_video(path)[np.stack([idx - 1, idx])])


def test_frame_folder_errors_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "vid"
    write_frame_folder(folder, moving_square(5))
    with pytest.raises(VideoDataError, match=r"img_00006\.jpg: frame not found"):
        read_frame_folder(folder, indices=[0, 5])
    (folder / "img_00003.jpg").unlink()
    with pytest.raises(VideoDataError, match=r"img_00003\.jpg"):
        read_frame_folder(folder, indices=[2])
    assert count_frames(folder) == 2  # a gap ends the run of frames
    (folder / "img_00002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VideoDataError, match=r"img_00002\.jpg: unreadable image"):
        read_frame_folder(folder, indices=[1])
    with pytest.raises(VideoDataError, match="nope: frame folder not found"):
        read_frame_folder(tmp_path / "nope")
    with pytest.raises(VideoDataError, match=r"tempgrad_00001\.jpg: first frame not found"):
        count_frames(folder, "tempgrad_{:05d}.jpg")
    with pytest.raises(ValueError, match="frame-number field"):
        count_frames(folder, "img.jpg")


# ------------------------------------------------------------------------------------------------------- split lists


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def ucf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ucfTrainTestlist"
    _write(d / "classInd.txt", "1 ApplyEyeMakeup\r\n2 Biking\r\n3 HandstandPushups\r\n")  # CRLF like the original
    _write(
        d / "trainlist01.txt",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nBiking/v_Biking_g21_c05.avi 2\n\n"
        "HandstandPushups/v_HandStandPushups_g08_c01.avi 3\n",
    )
    _write(d / "testlist01.txt", "Biking/v_Biking_g01_c01.avi\nApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02.avi\n")
    return d


def test_ucf101_train_and_test(ucf_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "videos"
    train, names = parse_ucf101(ucf_dir, split=1, subset="train", video_root=root)
    assert names == ["ApplyEyeMakeup", "Biking", "HandstandPushups"]
    assert [r.label for r in train] == [0, 1, 2]
    assert train[1] == VideoRecord(
        path=str(root / "Biking/v_Biking_g21_c05.avi"), label=1, num_frames=None, name="Biking/v_Biking_g21_c05"
    )
    test, _ = parse_ucf101(ucf_dir, subset="test", video_root=root)
    assert [(r.name, r.label) for r in test] == [
        ("Biking/v_Biking_g01_c01", 1),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02", 0),
    ]
    assert read_class_index(ucf_dir / "classInd.txt") == names


@pytest.mark.parametrize(
    ("subset", "line", "message"),
    [
        ("train", "Biking/v_Biking_g01_c01.avi 2 extra", "field"),
        ("train", "Biking/v_Biking_g01_c01.avi two", "integer"),
        ("train", "Biking/v_Biking_g01_c01.avi 4", "out of range"),
        ("train", "Biking/v_Biking_g01_c01.avi 1", "disagrees"),
        ("test", "Rowing/v_Rowing_g01_c01.avi", "unknown class 'Rowing'"),
    ],
)
def test_ucf101_bad_line_names_file_and_line(ucf_dir: Path, subset: str, line: str, message: str) -> None:
    list_file = ucf_dir / f"{subset}list01.txt"
    list_file.write_text(list_file.read_text() + line + "\n")
    bad_line = len(list_file.read_text().splitlines())
    with pytest.raises(VideoDataError, match=message) as err:
        parse_ucf101(ucf_dir, subset=subset, video_root="v")  # type: ignore[arg-type]
    assert str(err.value).startswith(f"{list_file}:{bad_line}:")


def test_ucf101_missing_files_and_bad_class_index(ucf_dir: Path) -> None:
    with pytest.raises(VideoDataError, match=r"trainlist02\.txt: UCF-101 train list not found"):
        parse_ucf101(ucf_dir, split=2, video_root="v")
    (ucf_dir / "classInd.txt").write_text("1 ApplyEyeMakeup\n3 Biking\n")
    with pytest.raises(VideoDataError, match=r"classInd\.txt: class ids must be 1\.\.2"):
        parse_ucf101(ucf_dir, video_root="v")
    (ucf_dir / "classInd.txt").write_text("1 ApplyEyeMakeup\nBiking\n")
    with pytest.raises(VideoDataError, match=r"classInd\.txt:2: expected 'id name'"):
        read_class_index(ucf_dir / "classInd.txt")


@pytest.fixture
def hmdb_dir(tmp_path: Path) -> Path:
    d = tmp_path / "testTrainMulti_7030_splits"
    _write(d / "wave_test_split1.txt", "wave_a.avi 1 \nwave_b.avi 2 \nwave_c.avi 0 \n")  # trailing spaces as shipped
    _write(d / "brush_hair_test_split1.txt", "brush_a.avi 2\nbrush_b.avi 1\n")
    _write(d / "brush_hair_test_split2.txt", "brush_a.avi 1\n")
    return d


def test_hmdb51_flags_and_sorted_classes(hmdb_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "hmdb"
    train, names = parse_hmdb51(hmdb_dir, split=1, subset="train", video_root=root)
    assert names == ["brush_hair", "wave"]
    assert [(r.name, r.label) for r in train] == [("brush_hair/brush_b", 0), ("wave/wave_a", 1)]
    assert train[1].path == str(root / "wave" / "wave_a.avi")
    test, _ = parse_hmdb51(hmdb_dir, split=1, subset="test", video_root=root)
    assert [r.name for r in test] == ["brush_hair/brush_a", "wave/wave_b"]  # flag 0 is in neither
    _, names2 = parse_hmdb51(hmdb_dir, split=2, video_root=root)
    assert names2 == ["brush_hair"]


def test_hmdb51_errors(hmdb_dir: Path) -> None:
    bad = hmdb_dir / "wave_test_split1.txt"
    bad.write_text("wave_a.avi 1\nwave_b.avi 3\n")
    with pytest.raises(VideoDataError, match="flag must be") as err:
        parse_hmdb51(hmdb_dir, video_root="v")
    assert str(err.value).startswith(f"{bad}:2:")
    with pytest.raises(VideoDataError, match="no HMDB-51 split files"):
        parse_hmdb51(hmdb_dir, split=3, video_root="v")
    with pytest.raises(VideoDataError, match=r"kiss_test_split1\.txt: HMDB-51 split file not found"):
        parse_hmdb51(hmdb_dir, video_root="v", classes=["brush_hair", "kiss"])


KINETICS_CSV = (
    "label,youtube_id,time_start,time_end,split\n"
    "riding a bike,abc123,12,22,train\n"
    "air drumming,--xyz_9,0,10,train\n"
    '"skiing (not slalom or crosscountry)",q-1,305.0,315.0,val\n'
    "air drumming,def456,7,17,val\n"
)


def test_kinetics_csv_pattern_and_classes(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "kinetics_train.csv", KINETICS_CSV)
    root = tmp_path / "k400"
    records, names = parse_kinetics_csv(csv_path, video_root=root)
    assert names == ["air_drumming", "riding_a_bike", "skiing_(not_slalom_or_crosscountry)"]  # MMAction2 folder names
    assert [r.label for r in records] == [1, 0, 2, 0]
    assert records[0].path == str(root / "riding_a_bike" / "abc123_000012_000022.mp4")
    assert records[2].name == "skiing_(not_slalom_or_crosscountry)/q-1_000305_000315"

    val, _ = parse_kinetics_csv(csv_path, video_root=root, subset="val", classes=names)
    assert [r.name for r in val] == [
        "skiing_(not_slalom_or_crosscountry)/q-1_000305_000315",
        "air_drumming/def456_000007_000017",
    ]
    flat, _ = parse_kinetics_csv(csv_path, video_root=root, pattern="{split}/{youtube_id}.mkv")
    assert flat[1].path == str(root / "train" / "--xyz_9.mkv")

    with pytest.raises(VideoDataError, match="unknown class 'riding a bike'") as err:
        parse_kinetics_csv(csv_path, video_root=root, classes=["air drumming"])
    assert str(err.value).startswith(f"{csv_path}:2:")


def test_kinetics_csv_errors(tmp_path: Path) -> None:
    bad_time = _write(tmp_path / "a.csv", KINETICS_CSV + "air drumming,zzz,soon,10,train\n")
    with pytest.raises(VideoDataError, match="time_start must be a number") as err:
        parse_kinetics_csv(bad_time, video_root="v")
    assert str(err.value).startswith(f"{bad_time}:6:")
    short = _write(tmp_path / "b.csv", KINETICS_CSV + "air drumming,zzz,0\n")
    with pytest.raises(VideoDataError, match=r"b\.csv:6: expected 5 fields"):
        parse_kinetics_csv(short, video_root="v")
    renamed = _write(tmp_path / "c.csv", "class,id,start,end\nx,y,0,10\n")
    with pytest.raises(VideoDataError, match=r"c\.csv:1: missing column"):
        parse_kinetics_csv(renamed, video_root="v")
    records, names = parse_kinetics_csv(
        renamed, video_root="v", label_column="class", id_column="id", start_column="start", end_column="end"
    )
    assert names == ["x"] and records[0].name == "x/y_000000_000010"
    with pytest.raises(VideoDataError, match=r"missing\.csv: Kinetics CSV not found"):
        parse_kinetics_csv(tmp_path / "missing.csv", video_root="v")


def test_rawframe_and_video_lists(tmp_path: Path) -> None:
    lst = _write(
        tmp_path / "ucf101_train_5_percent_labeled_split_1_rawframes.txt",
        "HighJump/v_HighJump_g12_c01 108 39\nRowing/v_Rowing_g17_c03 273 75\n",
    )
    records = parse_rawframe_list(lst, root=tmp_path / "rawframes", num_classes=101)
    assert records[0] == VideoRecord(
        path=str(tmp_path / "rawframes" / "HighJump/v_HighJump_g12_c01"),
        label=39,
        num_frames=108,
        name="HighJump/v_HighJump_g12_c01",
    )
    for (
        line,
        message,
    ) in [
        ("Biking/v_Biking_g21_c05 207", "expected 'frame_dir n_frames label'"),
        ("Biking/v_Biking_g21_c05 207 ten", "label must be an integer"),
        ("Biking/v_Biking_g21_c05 207 101", r"label 101 out of range 0\.\.100"),
        ("Biking/v_Biking_g21_c05 0 3", "n_frames must be >= 1"),
    ]:
        bad = _write(tmp_path / "bad.txt", "HighJump/v_HighJump_g12_c01 108 39\n" + line + "\n")
        with pytest.raises(VideoDataError, match=message) as err:
            parse_rawframe_list(bad, root="r", num_classes=101)
        assert str(err.value).startswith(f"{bad}:2:")

    vids = _write(tmp_path / "videos.txt", "pumping_fist/HfrG-Bt1bko_000012_000022.mp4 256\n")
    (rec,) = parse_video_list(vids, root=tmp_path)
    assert (rec.label, rec.num_frames, rec.name) == (256, None, "pumping_fist/HfrG-Bt1bko_000012_000022")
    with pytest.raises(VideoDataError, match=r"nothere\.txt: raw-frame list not found"):
        parse_rawframe_list(tmp_path / "nothere.txt", root="r")


def test_check_exists_names_missing(tmp_path: Path) -> None:
    present = tmp_path / "a.mp4"
    present.write_bytes(b"x")
    check_exists([VideoRecord(path=str(present), label=0)])
    records = [VideoRecord(path=str(tmp_path / f"gone{i}.mp4"), label=0) for i in range(7)]
    with pytest.raises(VideoDataError, match=r"7 listed video\(s\) not found: .*gone0\.mp4.*gone4\.mp4 \(and 2 more\)"):
        check_exists([VideoRecord(path=str(present), label=0), *records])


# ------------------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("test_mode", [False, True])
@pytest.mark.parametrize("total", [2, 9, 20, 64, 65, 66, 100, 300])
@pytest.mark.parametrize("num_clips", [1, 10])
def test_sampling_shape_and_range(total: int, test_mode: bool, num_clips: int) -> None:
    idx = sample_clip_indices(total, num_clips=num_clips, test_mode=test_mode, rng=np.random.default_rng(0))
    assert idx.shape == (num_clips, 8) and idx.dtype == np.int64
    assert idx.min() >= 1 and idx.max() < total


def test_train_sampling_random_reproducible_and_mmaction_range() -> None:
    a = sample_clip_indices(200, rng=np.random.default_rng(7))
    b = sample_clip_indices(200, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    starts = np.array([sample_clip_indices(200, rng=np.random.default_rng(s))[0, 0] for s in range(400)])
    assert len(set(starts.tolist())) > 50  # offsets vary with the generator
    # SampleFrames on the 199 frames from index 1: start uniform on [0, 199 - 64], then shifted by 1
    assert starts.min() == 1 and starts.max() == 200 - 64
    clip = sample_clip_indices(200, rng=np.random.default_rng(3))[0]
    np.testing.assert_array_equal(np.diff(clip), np.full(7, 8))
    # several train clips: one random start per segment, segments in order
    multi = sample_clip_indices(300, num_clips=3, rng=np.random.default_rng(0))
    seg = (299 - 64 + 1) // 3
    assert all(k * seg <= multi[k, 0] - 1 < (k + 1) * seg for k in range(3))


def test_test_sampling_deterministic_and_evenly_spaced() -> None:
    idx = sample_clip_indices(264, num_clips=10, test_mode=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(idx, sample_clip_indices(264, num_clips=10, test_mode=True))
    # usable = 263 frames, avg interval (263 - 64 + 1) / 10 = 20, offsets int(20k + 10), shifted by min_index 1
    np.testing.assert_array_equal(idx[:, 0], 11 + 20 * np.arange(10))
    np.testing.assert_array_equal(idx[0], 11 + 8 * np.arange(8))


def test_short_video_loops_or_repeats_last() -> None:
    # 20 frames: 19 usable, span 64 -> offset 0; MMAction2 'loop' wraps with % 19, then +1
    loop = sample_clip_indices(20, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(loop[0], np.array([0, 8, 16, 24, 32, 40, 48, 56]) % 19 + 1)
    np.testing.assert_array_equal(sample_clip_indices(20, test_mode=True), loop)
    last = sample_clip_indices(20, out_of_bound="repeat_last", rng=np.random.default_rng(0))
    np.testing.assert_array_equal(last[0], [1, 9, 17, 17, 17, 17, 17, 17])
    # MMAction2's avg_interval == 0 branch: 64 usable frames, 3 clips -> offsets around([0, 1/3, 2/3]) = [0, 0, 1]
    np.testing.assert_array_equal(sample_clip_indices(65, num_clips=3)[:, 0], [1, 1, 2])
    # min_index=0 is plain SampleFrames with start_index 0
    assert sample_clip_indices(1, min_index=0, clip_len=2, interval=1).tolist() == [[0, 0]]


def test_too_short_video_and_bad_arguments() -> None:
    for total in (0, 1):
        with pytest.raises(VideoDataError, match=f"{total} frame"):
            sample_clip_indices(total)
    with pytest.raises(ValueError, match="clip_len"):
        sample_clip_indices(100, clip_len=0)
    with pytest.raises(ValueError, match="out_of_bound"):
        sample_clip_indices(100, out_of_bound="clamp")  # type: ignore[arg-type]
