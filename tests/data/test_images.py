"""Image loaders: decoding and range conversion, resize/crop, bad files, folder/ZhangLab/CheXpert scanners, holdout."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thrifty.data import images
from thrifty.data.images import (
    CHEXPERT_FINDINGS,
    ImageDataError,
    ImageRecord,
    load_image,
    load_images,
    scan_chexpert,
    scan_image_folder,
    scan_zhanglab,
    split_holdout,
)


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path)
    return path


def _gray(h: int = 8, w: int = 8, value: int = 128) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- decoding


def test_grayscale_png_loads_as_float_in_unit_range(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0 .. 252
    arr[0, 0], arr[-1, -1] = 0, 255
    out = load_image(_png(tmp_path / "g.png", arr))
    assert out.dtype == np.float32 and out.shape == (8, 8)
    np.testing.assert_allclose(out, arr / 255.0, atol=1e-6)
    rgb = load_image(tmp_path / "g.png", grayscale=False)
    assert rgb.shape == (8, 8, 3)
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 2])
    np.testing.assert_allclose(rgb[..., 1], arr / 255.0, atol=1e-6)


def test_rgb_png_keeps_channels_and_grayscale_uses_luma(tmp_path):
    arr = np.zeros((6, 10, 3), dtype=np.uint8)
    arr[..., 0] = 255  # pure red
    arr[:, 5:, 2] = 51  # some blue on the right half
    path = _png(tmp_path / "c.png", arr)
    rgb = load_image(path, grayscale=False)
    assert rgb.shape == (6, 10, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[..., 0], 1.0)
    np.testing.assert_allclose(rgb[:, :5, 2], 0.0)
    np.testing.assert_allclose(rgb[:, 5:, 2], 0.2, atol=1e-6)
    gray = load_image(path)
    assert gray.shape == (6, 10)
    np.testing.assert_allclose(gray[:, :5], 76 / 255.0, atol=1 / 255)  # 0.299 * 255 ≈ 76


def test_rgba_and_palette_images_convert_to_their_colours(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = 10  # nearly transparent: alpha is dropped, colour kept
    out = load_image(_png(tmp_path / "a.png", rgba), grayscale=False)
    np.testing.assert_allclose(out[..., 1], 1.0)
    np.testing.assert_allclose(out[..., 0], 0.0)

    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    pal.putpixel((1, 2), 1)
    pal.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png", grayscale=False)
    assert out.shape == (4, 4, 3)
    np.testing.assert_allclose(out[2, 1], [0.0, 0.0, 1.0])
    assert out.sum() == pytest.approx(1.0)


def test_16bit_png_keeps_its_scale(tmp_path):
    arr = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "x16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # really a 16-bit file
    out = load_image(path)
    np.testing.assert_allclose(out[0], arr[0] / 65535.0, atol=1e-6)
    assert out.max() == pytest.approx(1.0) and out[0, 1] < 0.01  # 256 is dark, not clipped to white
    rgb = load_image(path, grayscale=False)
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[..., 2], out)
    # 16-bit precision survives the resize (computed in floating point, not via 8-bit)
    smooth = np.full((16, 16), 1000, dtype=np.uint16)
    Image.fromarray(smooth).save(tmp_path / "s16.png")
    np.testing.assert_allclose(load_image(tmp_path / "s16.png", size=4), 1000 / 65535.0, rtol=1e-4)


# A minimal 16-bit PNG writer: Pillow cannot write 16-bit colour PNGs. Rows cycle through all five PNG filter
# types and Adam7 interlacing is optional, so the decoder's unfiltering (which depends on the bytes per pixel)
# and de-interlacing are exercised, not just the plain "None" filter.
_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> colour type: grey, grey+alpha, RGB, RGBA
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_filter_row(kind: int, cur: np.ndarray, prev: np.ndarray, bpp: int) -> bytes:
    cur, prev = cur.astype(np.int32), prev.astype(np.int32)
    left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
    upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
    if kind == 0:
        pred = np.zeros_like(cur)
    elif kind == 1:
        pred = left
    elif kind == 2:
        pred = prev
    elif kind == 3:
        pred = (left + prev) // 2
    else:  # Paeth
        p = left + prev - upleft
        pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
    return bytes([kind]) + ((cur - pred) % 256).astype(np.uint8).tobytes()


def _png_scanlines(arr: np.ndarray, bpp: int) -> bytes:
    rows = np.ascontiguousarray(arr.astype(">u2")).view(np.uint8).reshape(arr.shape[0], -1)
    out, prev = b"", np.zeros(rows.shape[1], np.uint8)
    for y, row in enumerate(rows):
        out += _png_filter_row(y % 5, row, prev, bpp)
        prev = row
    return out


def _png16(path: Path, arr: np.ndarray, *, interlace: bool = False) -> Path:
    """Write ``arr`` (uint16, ``(H, W)`` or ``(H, W, C)`` with C in 2..4) as a 16-bit PNG."""
    arr = np.asarray(arr, dtype=np.uint16)
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    bpp = 2 * channels
    if interlace:
        passes = [arr[ys::ystep, xs::xstep] for xs, ys, xstep, ystep in _ADAM7]
        raw = b"".join(_png_scanlines(p, bpp) for p in passes if p.size)
    else:
        raw = _png_scanlines(arr, bpp)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, _PNG_COLOUR_TYPES[channels], 0, 0, int(interlace))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def _grey_pairs(h: int = 6, w: int = 8) -> np.ndarray:
    """uint16 grey levels where horizontal neighbours are 256 k + 7 and 256 k + 200: equal in their high byte."""
    k = (np.arange(h * (w // 2)).reshape(h, w // 2) * 37) % 256
    out = np.empty((h, w), dtype=np.uint16)
    out[:, 0::2] = 256 * k + 7
    out[:, 1::2] = 256 * k + 200
    return out


@pytest.mark.parametrize("interlace", [False, True])
def test_16bit_rgb_png_keeps_full_range(tmp_path, interlace):
    grey = _grey_pairs()
    arr = np.repeat(grey[..., None], 3, axis=2)  # R = G = B
    arr[-1, :2] = [[65535, 300, 7], [12345, 54321, 40000]]  # two coloured pixels
    path = _png16(tmp_path / "rgb16.png", arr, interlace=interlace)
    with Image.open(path) as img:
        assert img.mode == "RGB"  # Pillow's own decode is 8-bit: this is what used to be cut
        assert np.array_equal(np.asarray(img), (arr >> 8).astype(np.uint8))

    out = load_image(path)
    assert out.dtype == np.float32 and out.shape == grey.shape
    np.testing.assert_allclose(out[:-1], grey[:-1] / 65535.0, rtol=0, atol=1e-6)
    diff = out[:-1, 1::2] - out[:-1, 0::2]  # same high byte, 193 apart below it
    np.testing.assert_allclose(diff, 193 / 65535.0, rtol=0, atol=1e-6)
    assert diff.min() > 0 and 193 / 65535.0 < 1 / 255.0  # a difference an 8-bit decode cannot show
    expected_luma = (arr[-1, :2].astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 65535.0
    np.testing.assert_allclose(out[-1, :2], expected_luma, rtol=0, atol=1e-6)

    rgb = load_image(path, grayscale=False)
    assert rgb.dtype == np.float32 and rgb.shape == arr.shape
    np.testing.assert_allclose(rgb, arr / 65535.0, rtol=0, atol=1e-6)

    # resizing keeps the 16-bit precision (a flat 16-bit grey that has no exact 8-bit value)
    flat = np.full((16, 16, 3), 1000, dtype=np.uint16)
    np.testing.assert_allclose(load_image(_png16(tmp_path / "flat.png", flat), size=4), 1000 / 65535.0, rtol=1e-5)


def test_16bit_colour_grey_matches_the_8bit_colour_path(tmp_path):
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    # the same colours at 16 bits (v * 257 is v / 255 exactly): the grey must agree with 8-bit colour's luma,
    # which PIL rounds to whole 8-bit levels
    from16 = load_image(_png16(tmp_path / "c16.png", rgb8.astype(np.uint16) * 257))
    from8 = load_image(_png(tmp_path / "c8.png", rgb8))
    np.testing.assert_allclose(from16, from8, rtol=0, atol=0.5 / 255 + 1e-6)
    # and the 8-bit colour path is unchanged: PIL's own ITU-R 601-2 luma, divided by 255
    with Image.open(tmp_path / "c8.png") as img:
        np.testing.assert_array_equal(from8, np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
    np.testing.assert_array_equal(load_image(tmp_path / "c8.png", grayscale=False), rgb8.astype(np.float32) / 255.0)


@pytest.mark.parametrize("interlace", [False, True])
def test_16bit_rgba_and_grey_alpha_pngs_keep_full_range(tmp_path, interlace):
    grey = _grey_pairs()
    alpha = np.full(grey.shape, 1234, dtype=np.uint16)  # dropped, as in the 8-bit path
    rgba = np.stack([grey, grey, grey, alpha], axis=-1)
    path = _png16(tmp_path / "rgba16.png", rgba, interlace=interlace)
    with Image.open(path) as img:
        assert img.mode == "RGBA"
    np.testing.assert_allclose(load_image(path), grey / 65535.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(load_image(path, grayscale=False), rgba[..., :3] / 65535.0, rtol=0, atol=1e-6)

    la = np.stack([grey, alpha], axis=-1)
    path = _png16(tmp_path / "la16.png", la, interlace=interlace)
    out = load_image(path)
    np.testing.assert_allclose(out, grey / 65535.0, rtol=0, atol=1e-6)
    assert (out[:, 1::2] > out[:, 0::2]).all()
    np.testing.assert_allclose(load_image(path, grayscale=False), np.repeat(out[..., None], 3, axis=2))


@pytest.mark.parametrize("interlace", [False, True])
def test_16bit_greyscale_png_still_keeps_full_range(tmp_path, interlace):
    grey = _grey_pairs()
    grey[0, :2] = [0, 65535]
    path = _png16(tmp_path / "g16.png", grey, interlace=interlace)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    out = load_image(path)
    np.testing.assert_allclose(out, grey / 65535.0, rtol=0, atol=1e-6)
    assert out[0, 0] == 0.0 and out[0, 1] == pytest.approx(1.0)


def test_16bit_colour_png_that_cannot_be_decoded_at_full_depth_is_refused(tmp_path, monkeypatch):
    path = _png16(tmp_path / "rgb16.png", np.repeat(_grey_pairs()[..., None], 3, axis=2))
    # a Pillow without the low-byte unpacker: refused, naming the file, rather than silently cut to 8 bits
    monkeypatch.setitem(images._PNG16_COLOUR_RAWMODES, "RGB;16B", "no-such-rawmode")
    with pytest.raises(ImageDataError, match=r"rgb16\.png: 16-bit colour PNG cannot be read without losing precision"):
        load_image(path)


def test_truncated_16bit_colour_png_raises_naming_the_file(tmp_path):
    path = _png16(tmp_path / "cut16.png", np.repeat(_grey_pairs(32, 32)[..., None], 3, axis=2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDataError, match=r"cut16\.png"):
        load_image(path)


def test_32bit_integer_mode_i_tiff_is_scaled_as_16bit(tmp_path):
    arr = np.array([[0, 65535], [4096, 100]], dtype=np.int32)
    path = tmp_path / "i.tif"
    Image.fromarray(arr).save(path)
    with Image.open(path) as img:
        assert img.mode == "I"
    np.testing.assert_allclose(load_image(path), arr / 65535.0, atol=1e-6)
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ImageDataError, match=r"big\.tif.*16-bit range"):
        load_image(tmp_path / "big.tif")


def test_resize_shorter_side_then_center_crop(tmp_path):
    wide = np.zeros((40, 80), dtype=np.uint8)
    wide[:, 20:60] = 255  # exactly the central square
    out = load_image(_png(tmp_path / "wide.png", wide), size=20)
    assert out.shape == (20, 20) and out.dtype == np.float32
    assert out[:, 2:-2].min() > 0.99  # the crop kept only the bright center
    assert out.min() >= 0.0 and out.max() <= 1.0

    tall = np.zeros((90, 30, 3), dtype=np.uint8)
    tall[:30] = (255, 0, 0)  # top third red: cropped away
    tall[30:60] = (0, 255, 0)  # middle green: kept
    tall[60:] = (0, 0, 255)  # bottom blue: cropped away
    out = load_image(_png(tmp_path / "tall.png", tall), size=10, grayscale=False)
    assert out.shape == (10, 10, 3)
    np.testing.assert_allclose(out[2:-2, :, 1], 1.0, atol=1e-5)
    assert out[2:-2, :, 0].max() < 1e-5 and out[2:-2, :, 2].max() < 1e-5

    up = load_image(_png(tmp_path / "small.png", _gray(4, 6, 200)), size=12)  # upscaling works too
    assert up.shape == (12, 12)
    np.testing.assert_allclose(up, 200 / 255.0, atol=1e-5)


def test_resize_is_antialiased(tmp_path):
    stripes = np.zeros((64, 64), dtype=np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes alias to pure 0 or 1 without a low-pass filter
    out = load_image(_png(tmp_path / "stripes.png", stripes), size=8)
    np.testing.assert_allclose(out, 0.5, atol=0.05)


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "missing", "directory"])
def test_bad_files_raise_image_data_error_naming_the_file(tmp_path, kind):
    if kind == "truncated":
        path = _truncated_jpeg(tmp_path / "cut_scan.jpeg")
    elif kind == "text":
        path = tmp_path / "notes_really.png"
        path.write_text("this is not an image\n")
    elif kind == "empty":
        path = tmp_path / "zero_bytes.png"
        path.write_bytes(b"")
    elif kind == "missing":
        path = tmp_path / "nowhere.png"
    else:
        path = tmp_path / "folder.png"
        path.mkdir()
    with pytest.raises(ImageDataError) as info:
        load_image(path)
    assert path.name in str(info.value)
    assert isinstance(info.value, ValueError)
    expected = {"empty": "empty", "missing": "does not exist", "directory": "directory"}.get(kind, "not a readable")
    assert expected in str(info.value)


def test_load_images_stacks_and_skip_bad_reports(tmp_path):
    good = [ImageRecord(_png(tmp_path / f"ok{i}.png", _gray(10, 14, 40 * i)), i % 2, "x") for i in range(3)]
    text = tmp_path / "bad.png"
    text.write_text("nope")
    cut = _truncated_jpeg(tmp_path / "cut.jpg")
    recs = [good[0], ImageRecord(text, 1, "x"), good[1], ImageRecord(cut, 0, "normal"), good[2]]

    with pytest.raises(ImageDataError, match=r"bad\.png"):
        load_images(recs, size=6)

    arr, kept, bad = load_images(recs, size=6, skip_bad=True)
    assert arr.shape == (3, 1, 6, 6) and arr.dtype == np.float32
    assert kept == good
    assert [p for p, _ in bad] == [text, cut]
    assert all(p.name in reason for p, reason in bad)
    for i in range(3):
        np.testing.assert_allclose(arr[i, 0], 40 * i / 255.0, atol=1e-5)

    rgb, kept_rgb, bad_rgb = load_images(good, size=5, grayscale=False)
    assert rgb.shape == (3, 3, 5, 5) and kept_rgb == good and bad_rgb == []
    np.testing.assert_allclose(rgb[2, 1], 80 / 255.0, atol=1e-5)

    empty, kept_none, _ = load_images([], size=4)
    assert empty.shape == (0, 1, 4, 4) and kept_none == []


def test_load_images_progress_logs_when_not_on_a_terminal(tmp_path, caplog):
    recs = [ImageRecord(_png(tmp_path / f"p{i}.png", _gray(value=i)), 0, "normal") for i in range(4)]
    with caplog.at_level("INFO"):
        arr, kept, _ = load_images(recs, size=4, show_progress=True)
    assert arr.shape == (4, 1, 4, 4) and kept == recs
    assert any("loading 4 images 4/4" in m for m in caplog.messages)


# ----------------------------------------------------------------------------------------------- scanners


def test_scan_image_folder_labels_kinds_and_order(tmp_path):
    root = tmp_path / "ds"
    for name in ["b.png", "a.PNG", "c.jpg"]:
        _png(root / "normal" / name, _gray())
    _png(root / "normal" / "sub" / "d.png", _gray())
    (root / "normal" / "readme.txt").write_text("not an image")
    (root / "normal" / "._a.png").write_bytes(b"\x00macos junk")
    _png(root / "abnormal" / "z.png", _gray())
    _png(root / "abnormal" / "tumor" / "t2.png", _gray())
    _png(root / "abnormal" / "tumor" / "t1.bmp", _gray())
    _png(root / "abnormal" / "bleed" / "deep" / "b1.tif", _gray())

    recs = scan_image_folder(root)
    rel = [r.path.relative_to(root).as_posix() for r in recs]
    assert rel == [
        "normal/a.PNG",
        "normal/b.png",
        "normal/c.jpg",
        "normal/sub/d.png",
        "abnormal/bleed/deep/b1.tif",
        "abnormal/tumor/t1.bmp",
        "abnormal/tumor/t2.png",
        "abnormal/z.png",
    ]
    assert [r.label for r in recs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r.kind for r in recs] == ["normal"] * 4 + ["bleed", "tumor", "tumor", "abnormal"]
    assert scan_image_folder(root) == recs  # deterministic

    only_normal = tmp_path / "train"
    _png(only_normal / "good" / "n.png", _gray())
    recs = scan_image_folder(only_normal, normal_dir="good", abnormal_dir="bad")
    assert [(r.path.name, r.label) for r in recs] == [("n.png", 0)]


def test_scan_image_folder_errors_list_what_was_found(tmp_path):
    with pytest.raises(ImageDataError, match=r"nothere.*does not exist"):
        scan_image_folder(tmp_path / "nothere")
    root = tmp_path / "ds"
    _png(root / "healthy" / "x.png", _gray())
    (root / "sick").mkdir()
    with pytest.raises(ImageDataError) as info:
        scan_image_folder(root)
    msg = str(info.value)
    assert str(root) in msg and "'normal'" in msg and "healthy/" in msg and "sick/" in msg
    (root / "normal").mkdir()
    (root / "normal" / "notes.txt").write_text("x")
    with pytest.raises(ImageDataError, match=r"normal.*no images.*notes\.txt"):
        scan_image_folder(root)


def _zhanglab(base: Path, split_names: dict[str, str] | None = None) -> None:
    names = split_names or {"train": "train", "test": "test", "val": "val"}
    layout = {
        "NORMAL": ["IM-0003-0001.jpeg", "IM-0001-0001.jpeg", "NORMAL2-IM-1427-0001.jpeg"],
        "PNEUMONIA": ["person1_bacteria_1.jpeg", "person3_virus_15.jpeg", "person2_Bacteria_9.jpeg", "odd_case.jpeg"],
    }
    for split, on_disk in names.items():
        for cls, files in layout.items():
            folder = base / on_disk / (cls if split != "val" else cls.lower())
            for f in files:
                _png(folder / f, _gray())
            (folder / ".DS_Store").write_bytes(b"junk")


def test_scan_zhanglab_layout_kinds_and_roots(tmp_path):
    chest = tmp_path / "chest_xray"
    _zhanglab(chest, {"train": "train", "test": "TEST", "val": "val"})
    recs = scan_zhanglab(chest, "test")
    assert [r.path.name for r in recs] == [
        "IM-0001-0001.jpeg",
        "IM-0003-0001.jpeg",
        "NORMAL2-IM-1427-0001.jpeg",
        "odd_case.jpeg",
        "person1_bacteria_1.jpeg",
        "person2_Bacteria_9.jpeg",
        "person3_virus_15.jpeg",
    ]
    assert [r.label for r in recs] == [0, 0, 0, 1, 1, 1, 1]
    assert [r.kind for r in recs] == ["normal"] * 3 + ["pneumonia", "bacteria", "bacteria", "virus"]
    assert all(r.path.parent.parent.name == "TEST" for r in recs)

    assert scan_zhanglab(tmp_path, "test") == recs  # the parent of chest_xray works too
    val = scan_zhanglab(chest, "val")  # lower-case class folders
    assert [r.label for r in val] == [0, 0, 0, 1, 1, 1, 1]
    assert all(r.path.parent.name in ("normal", "pneumonia") for r in val)

    kaggle = tmp_path / "kaggle"
    _zhanglab(kaggle / "chest_xray" / "chest_xray", {"train": "train"})
    train = scan_zhanglab(kaggle, "train")
    assert len(train) == 7 and all("train" in r.path.parts for r in train)


def test_scan_zhanglab_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        scan_zhanglab(tmp_path, "validation")
    with pytest.raises(ImageDataError, match="does not exist"):
        scan_zhanglab(tmp_path / "missing", "train")
    (tmp_path / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(ImageDataError, match=r"'test'.*found: chest_xray/"):
        scan_zhanglab(tmp_path, "test")
    with pytest.raises(ImageDataError, match=r"train: no PNEUMONIA folder; found: NORMAL/"):
        scan_zhanglab(tmp_path, "train")


_BASE_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]


def _chexpert_csv(csv_path: Path, rows: list[dict[str, str]], *, image_base: Path | None, drop: str | None = None):
    """Write a CheXpert-style CSV; rows give Path, Frontal/Lateral, AP/PA and the non-blank findings."""
    columns = [c for c in [*_BASE_COLUMNS, *CHEXPERT_FINDINGS] if c != drop]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            full = {c: "" for c in columns}
            full.update({"Sex": "Female", "Age": "68"})
            full.update({k: v for k, v in row.items() if k in full})
            writer.writerow(full)
            if image_base is not None:
                _png(image_base / row["Path"], _gray(4, 4))
    return csv_path


def _row(n: int, view: str = "PA", frontal: str = "Frontal", **findings: str) -> dict[str, str]:
    path = f"CheXpert-v1.0-small/train/patient{n:05d}/study1/view1_{frontal.lower()}.jpg"
    return {
        "Path": path,
        "Frontal/Lateral": frontal,
        "AP/PA": view,
        **{k.replace("_", " "): v for k, v in findings.items()},
    }


def _chexpert_rows() -> list[dict[str, str]]:
    return [
        _row(1, No_Finding="1.0"),  # normal
        _row(2, Cardiomegaly="1.0", Edema="1.0"),  # abnormal, kind = first finding (Cardiomegaly)
        _row(3, view="AP", No_Finding="1.0"),  # AP: excluded by default
        _row(4, view="", frontal="Lateral", No_Finding="1.0"),  # lateral: always excluded
        _row(5, No_Finding="1.0", Support_Devices="1.0"),  # neither normal nor abnormal
        _row(6, Support_Devices="1.0", Edema="0.0"),  # neither
        _row(7, Edema="-1.0", Fracture="1.0"),  # uncertain Edema, certain Fracture
        _row(8, No_Finding="1.0", Atelectasis="-1.0"),  # uncertain only
        _row(9, Pneumothorax="1", Lung_Opacity="0"),  # integer coding
        _row(10),  # all blank: neither
    ]


def test_scan_chexpert_views_labels_and_uncertain_modes(tmp_path):
    root = tmp_path / "data"
    csv_path = _chexpert_csv(root / "CheXpert-v1.0-small" / "train.csv", _chexpert_rows(), image_base=root)

    def summary(recs):
        return [(int(r.path.parts[-3][len("patient") :]), r.label, r.kind) for r in recs]

    excl = scan_chexpert(csv_path)
    assert summary(excl) == [(1, 0, "normal"), (2, 1, "Cardiomegaly"), (9, 1, "Pneumothorax")]
    assert all(r.path.is_file() and r.path.is_relative_to(root) for r in excl)

    ones = scan_chexpert(csv_path, uncertain="ones")
    assert summary(ones) == [
        (1, 0, "normal"),
        (2, 1, "Cardiomegaly"),
        (7, 1, "Edema"),
        (8, 1, "Atelectasis"),
        (9, 1, "Pneumothorax"),
    ]
    zeros = scan_chexpert(csv_path, uncertain="zeros")
    assert summary(zeros) == [
        (1, 0, "normal"),
        (2, 1, "Cardiomegaly"),
        (7, 1, "Fracture"),
        (8, 0, "normal"),
        (9, 1, "Pneumothorax"),
    ]
    both = scan_chexpert(csv_path, views=("AP", "PA"))
    assert summary(both) == [(1, 0, "normal"), (2, 1, "Cardiomegaly"), (3, 0, "normal"), (9, 1, "Pneumothorax")]
    assert summary(scan_chexpert(csv_path, views="ap")) == [(3, 0, "normal")]
    with pytest.raises(ValueError, match="uncertain"):
        scan_chexpert(csv_path, uncertain="maybe")


def test_scan_chexpert_path_resolution(tmp_path):
    rows = [_row(1, No_Finding="1.0"), _row(2, Edema="1.0")]
    # images beside the CSV (the CSV's parent is the root): the grandparent misses, the parent fallback hits
    beside = tmp_path / "copy"
    csv_path = _chexpert_csv(beside / "labels.csv", rows, image_base=beside)
    recs = scan_chexpert(csv_path)
    assert [r.path for r in recs] == [beside / r["Path"] for r in rows]

    # explicit image_root, CSV kept elsewhere
    images_dir = tmp_path / "images"
    elsewhere = _chexpert_csv(tmp_path / "meta" / "deep" / "valid.csv", rows, image_base=images_dir)
    assert [r.path for r in scan_chexpert(elsewhere, image_root=images_dir)] == [images_dir / r["Path"] for r in rows]

    with pytest.raises(ImageDataError) as info:
        scan_chexpert(elsewhere)  # the defaults do not hold the images
    msg = str(info.value)
    assert "valid.csv" in msg and "patient00001/study1/view1_frontal.jpg" in msg
    assert str(tmp_path / "meta") in msg and str(tmp_path / "meta" / "deep") in msg


def test_scan_chexpert_bad_csv(tmp_path):
    csv_path = _chexpert_csv(tmp_path / "train.csv", [_row(1, No_Finding="1.0")], image_base=None, drop="AP/PA")
    with pytest.raises(ImageDataError) as info:
        scan_chexpert(csv_path)
    assert "train.csv" in str(info.value) and "'AP/PA'" in str(info.value)

    odd = _chexpert_csv(tmp_path / "odd.csv", [_row(1, Edema="yes")], image_base=None)
    with pytest.raises(ImageDataError, match=r"odd\.csv:2: column 'Edema' has 'yes'"):
        scan_chexpert(odd, image_root=tmp_path)
    with pytest.raises(ImageDataError, match=r"nope\.csv.*does not exist"):
        scan_chexpert(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------------------------- holdout


def test_split_holdout_is_deterministic_disjoint_and_sized():
    recs = [ImageRecord(Path(f"n{i:03d}.png"), 0, "normal") for i in range(50)]
    recs += [ImageRecord(Path(f"a{i:03d}.png"), 1, "virus" if i % 2 else "bacteria") for i in range(7)]
    rest, hold = split_holdout(recs, n_per_label=10, seed=3)
    assert sum(r.label == 0 for r in hold) == 10
    assert sum(r.label == 1 for r in hold) == 7  # fewer than asked: all of them
    assert len(rest) + len(hold) == len(recs)
    assert {r.path for r in rest}.isdisjoint({r.path for r in hold})
    assert {r.path for r in rest} | {r.path for r in hold} == {r.path for r in recs}
    assert [r.path for r in hold] == sorted(r.path for r in hold if r.label == 0) + sorted(
        r.path for r in hold if r.label == 1
    )  # input order kept

    again_rest, again_hold = split_holdout(recs, n_per_label=10, seed=3)
    assert again_hold == hold and again_rest == rest
    _, other = split_holdout(recs, n_per_label=10, seed=4)
    assert {r.path for r in other if r.label == 0} != {r.path for r in hold if r.label == 0}

    rest0, hold0 = split_holdout(recs, n_per_label=0, seed=3)
    assert hold0 == [] and rest0 == recs
    with pytest.raises(ValueError):
        split_holdout(recs, n_per_label=-1, seed=0)


def test_module_constants():
    assert images.IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    assert len(CHEXPERT_FINDINGS) == 14 and CHEXPERT_FINDINGS[0] == "No Finding"
    assert CHEXPERT_FINDINGS[-1] == "Support Devices"
    with pytest.raises(ValueError):
        ImageRecord(Path("x.png"), 2, "normal")


def test_scan_chexpert_names_the_physical_line_after_a_multi_line_quoted_field(tmp_path):
    # the first row's "Sex" cell holds a quoted line break, so the second row starts on line 4 of the file
    rows = [_row(1, No_Finding="1.0"), _row(2, Edema="maybe")]
    csv_path = _chexpert_csv(tmp_path / "train.csv", rows, image_base=tmp_path)
    text = csv_path.read_text().replace("Female", '"Fe\nmale"', 1)
    csv_path.write_text(text)
    with pytest.raises(ImageDataError, match=r"train\.csv:4: column 'Edema' has 'maybe'"):
        scan_chexpert(csv_path)
