"""CT volume loaders: NIfTI orientation and spacing, hand-written MetaImage pairs (element types, byte order,
LOCAL data, compression), DICOM series ordering and HU rescale on pydicom's bundled CT slice, and clear errors
naming the broken file."""

from __future__ import annotations

import copy
import importlib.util
import random
import re
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from thrifty.data.volumes import (
    Volume,
    VolumeError,
    clip_and_normalize,
    load_dicom_series,
    load_metaimage,
    load_nifti,
    load_volume,
    read_dicom_series,
)

# --------------------------------------------------------------------------------------------- helpers


def _xyz_ramp(nx: int, ny: int, nz: int) -> np.ndarray:
    """data[i, j, k] = 100·i + 10·j + k in (x, y, z) storage order: every voxel tells where it is."""
    i, j, k = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    return (100 * i + 10 * j + k).astype(np.float32)


def _write_mhd(
    directory: Path,
    zyx: np.ndarray,
    *,
    element_type: str = "MET_SHORT",
    dtype: str = "<i2",
    msb: bool | None = False,
    msb_key: str = "BinaryDataByteOrderMSB",
    local: bool = False,
    compressed: bool = False,
    spacing_xyz: tuple[float, float, float] = (0.7, 0.8, 2.5),
    offset_xyz: tuple[float, float, float] = (-150.5, -170.25, -310.0),
    name: str = "scan",
    extra: str = "",
) -> Path:
    """Write a MetaImage by hand; ``zyx`` is (z, y, x) so that x varies fastest on disk."""
    payload = np.ascontiguousarray(zyx).astype(dtype).tobytes()
    if compressed:
        payload = zlib.compress(payload)
    nz, ny, nx = zyx.shape
    lines = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
    ]
    if msb is not None:
        lines.append(f"{msb_key} = {msb}")
    lines += [
        f"CompressedData = {compressed}",
        "TransformMatrix = 1 0 0 0 1 0 0 0 1",
        f"Offset = {' '.join(map(str, offset_xyz))}",
        "CenterOfRotation = 0 0 0",
        "AnatomicalOrientation = RAI",
        f"ElementSpacing = {' '.join(map(str, spacing_xyz))}",
        f"DimSize = {nx} {ny} {nz}",
    ]
    if compressed:
        lines.append(f"CompressedDataSize = {len(payload)}")
    if extra:
        lines.append(extra)
    lines.append(f"ElementType = {element_type}")
    header = directory / f"{name}.{'mha' if local else 'mhd'}"
    if local:
        lines.append("ElementDataFile = LOCAL")
        header.write_bytes(("\n".join(lines) + "\n").encode() + payload)
    else:
        lines.append(f"ElementDataFile = {name}.raw")
        header.write_text("\n".join(lines) + "\n")
        (directory / f"{name}.raw").write_bytes(payload)
    return header


def _ct_small() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _write_series(directory: Path, z_positions: list[float], *, seed: int = 0) -> list[Path]:
    """Copies of CT_small at the given z positions; slice n's pixels are the original + 10·n (its signature)."""
    base = _ct_small()
    raw = np.frombuffer(base.PixelData, dtype="<i2").reshape(base.Rows, base.Columns)
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"img{n:03d}.dcm" for n in range(len(z_positions))]
    random.Random(seed).shuffle(names)  # file names no longer follow the slice order
    paths = []
    for n, z in enumerate(z_positions):
        ds = copy.deepcopy(base)
        x, y, _ = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z]
        ds.InstanceNumber = n + 1
        ds.SOPInstanceUID = f"{base.SOPInstanceUID}.{n + 1}"
        ds.PixelData = (raw + 10 * n).astype("<i2").tobytes()
        path = directory / names[n]
        ds.save_as(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_is_transposed_to_zyx_with_spacing_from_zooms(tmp_path, suffix):
    data = _xyz_ramp(5, 4, 3)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-100.0, -120.0, 30.0]
    path = tmp_path / f"ct{suffix}"
    nib.save(nib.Nifti1Image(data, affine), path)
    vol = load_nifti(path)
    assert vol.shape == (3, 4, 5) and vol.array.dtype == np.float32
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert vol.origin == pytest.approx((30.0, -120.0, -100.0))
    assert vol.path == path
    for k, j, i in [(0, 0, 0), (2, 1, 4), (1, 3, 2)]:
        assert vol.array[k, j, i] == 100 * i + 10 * j + k
    np.testing.assert_array_equal(load_volume(path).array, vol.array)


def test_nifti_integer_hu_and_single_volume_4d(tmp_path):
    hu = np.array([-1024, -500, 0, 40, 3071], dtype=np.int16).reshape(5, 1, 1, 1)
    hu = np.broadcast_to(hu, (5, 2, 2, 1)).copy()
    path = tmp_path / "hu.nii.gz"
    img = nib.Nifti1Image(hu, np.eye(4))
    img.set_data_dtype(np.int16)
    nib.save(img, path)
    vol = load_nifti(path)
    assert vol.shape == (2, 2, 5)
    np.testing.assert_array_equal(vol.array[0, 0], [-1024, -500, 0, 40, 3071])


def test_nifti_canonical_reorients_flipped_axes(tmp_path):
    data = _xyz_ramp(4, 3, 2)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # x stored right-to-left (LAS)
    path = tmp_path / "las.nii"
    nib.save(nib.Nifti1Image(data, affine), path)
    stored = load_nifti(path)
    canonical = load_nifti(path, canonical=True)
    np.testing.assert_array_equal(canonical.array, stored.array[:, :, ::-1])


def test_garbage_nifti_raises_volume_error_naming_it(tmp_path):
    bad = tmp_path / "broken.nii"
    bad.write_bytes(b"this is not a NIfTI header" * 20)
    with pytest.raises(VolumeError, match=r"broken\.nii"):
        load_nifti(bad)
    good = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(_xyz_ramp(8, 8, 8), np.eye(4)), good)
    good.write_bytes(good.read_bytes()[:600])  # header intact, data truncated
    with pytest.raises(VolumeError, match=r"cut\.nii"):
        load_volume(good)


def test_missing_nibabel_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match="nibabel"):
        load_nifti(tmp_path / "x.nii")


# ------------------------------------------------------------------------------------------- MetaImage


@pytest.mark.parametrize(
    ("element_type", "dtype", "values"),
    [
        ("MET_SHORT", "<i2", [-1024, -1000, 0, 400, 3071]),
        ("MET_USHORT", "<u2", [0, 1, 1024, 4095, 65535]),
        ("MET_FLOAT", "<f4", [-1000.5, -0.25, 0.0, 12.75, 2000.0]),
        ("MET_UCHAR", "u1", [0, 1, 127, 128, 255]),
        ("MET_INT", "<i4", [-100000, -1, 0, 7, 100000]),
    ],
)
def test_metaimage_element_types_round_trip(tmp_path, element_type, dtype, values):
    zyx = np.resize(np.array(values, dtype=np.float64), (3, 4, 5)).astype(dtype)
    header = _write_mhd(tmp_path, zyx, element_type=element_type, dtype=dtype)
    vol = load_metaimage(header)
    assert vol.array.dtype == np.float32 and vol.shape == (3, 4, 5)
    np.testing.assert_array_equal(vol.array, zyx.astype(np.float32))
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert vol.origin == pytest.approx((-310.0, -170.25, -150.5))
    np.testing.assert_array_equal(load_volume(header).array, vol.array)


def test_metaimage_axis_order_x_fastest(tmp_path):
    zyx = _xyz_ramp(5, 4, 3).transpose(2, 1, 0)  # voxel (x=i, y=j, z=k) holds 100i + 10j + k
    vol = load_metaimage(_write_mhd(tmp_path, zyx))
    assert vol.array[2, 1, 4] == 100 * 4 + 10 * 1 + 2
    raw = (tmp_path / "scan.raw").read_bytes()
    assert np.frombuffer(raw, "<i2")[1] == 100  # second value on disk is x = 1


@pytest.mark.parametrize("msb_key", ["BinaryDataByteOrderMSB", "ElementByteOrderMSB"])
@pytest.mark.parametrize(("element_type", "dtype"), [("MET_SHORT", ">i2"), ("MET_FLOAT", ">f4")])
def test_metaimage_big_endian(tmp_path, msb_key, element_type, dtype):
    zyx = (np.arange(60).reshape(3, 4, 5) * 37 - 1000).astype(dtype)
    vol = load_metaimage(_write_mhd(tmp_path, zyx, element_type=element_type, dtype=dtype, msb=True, msb_key=msb_key))
    np.testing.assert_array_equal(vol.array, zyx.astype(np.float32))


def test_metaimage_local_and_compressed(tmp_path):
    zyx = (np.arange(2 * 6 * 7).reshape(2, 6, 7) * 13 - 900).astype("<i2")
    local = load_metaimage(_write_mhd(tmp_path, zyx, local=True, name="local"))
    np.testing.assert_array_equal(local.array, zyx)
    packed = _write_mhd(tmp_path, zyx, compressed=True, name="packed")
    np.testing.assert_array_equal(load_metaimage(packed).array, zyx)
    both = _write_mhd(tmp_path, zyx, compressed=True, local=True, name="both")
    np.testing.assert_array_equal(load_volume(both).array, zyx)


def test_metaimage_defaults_and_2d(tmp_path):
    header = tmp_path / "slice.mhd"
    header.write_text("NDims = 2\nDimSize = 3 2\nElementType = MET_UCHAR\nElementDataFile = slice.raw\n")
    (tmp_path / "slice.raw").write_bytes(bytes([1, 2, 3, 4, 5, 6]))
    vol = load_metaimage(header)
    assert vol.shape == (1, 2, 3) and vol.spacing == (1.0, 1.0, 1.0) and vol.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(vol.array[0], [[1, 2, 3], [4, 5, 6]])


def test_metaimage_errors_name_the_file(tmp_path):
    zyx = np.zeros((2, 3, 4), dtype="<i2")
    header = _write_mhd(tmp_path, zyx, name="trunc")
    raw = tmp_path / "trunc.raw"
    raw.write_bytes(raw.read_bytes()[:-3])
    with pytest.raises(VolumeError, match=r"trunc\.raw.*wrong data size.*45 bytes, expected 48"):
        load_metaimage(header)

    header = _write_mhd(tmp_path, zyx, name="gone")
    (tmp_path / "gone.raw").unlink()
    with pytest.raises(VolumeError, match=r"gone\.raw.*does not exist"):
        load_volume(header)

    header = _write_mhd(tmp_path, zyx, name="weird", element_type="MET_HALF_FLOAT")
    with pytest.raises(VolumeError, match=r"weird\.mhd.*unsupported ElementType"):
        load_metaimage(header)

    header = _write_mhd(tmp_path, zyx, name="bad_zip", compressed=True)
    (tmp_path / "bad_zip.raw").write_bytes(b"\x00not zlib data at all")
    with pytest.raises(VolumeError, match=r"bad_zip\.raw"):
        load_metaimage(header)

    header = _write_mhd(tmp_path, zyx, name="short_zip", compressed=True)
    data = (tmp_path / "short_zip.raw").read_bytes()
    (tmp_path / "short_zip.raw").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"short_zip\.raw.*truncated"):
        load_metaimage(header)

    header = _write_mhd(tmp_path, zyx, name="rgb", extra="ElementNumberOfChannels = 3")
    with pytest.raises(VolumeError, match=r"rgb\.mhd.*single-channel"):
        load_metaimage(header)

    garbage = tmp_path / "garbage.mhd"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    with pytest.raises(VolumeError, match=r"garbage\.mhd"):
        load_metaimage(garbage)

    no_data = tmp_path / "nodata.mhd"
    no_data.write_text("NDims = 3\nDimSize = 1 1 1\nElementType = MET_SHORT\n")
    with pytest.raises(VolumeError, match=r"nodata\.mhd.*ElementDataFile"):
        load_metaimage(no_data)

    with pytest.raises(VolumeError, match=r"absent\.mhd"):
        load_volume(tmp_path / "absent.mhd")


# ----------------------------------------------------------------------------------------------- DICOM


def test_single_dicom_slice_hu_matches_the_header_rescale():
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    assert (slope, intercept) == (1.0, -1024.0)
    stored = np.frombuffer(ds.PixelData, dtype="<i2").reshape(int(ds.Rows), int(ds.Columns)).astype(np.float64)
    vol = load_volume(path)
    assert vol.shape == (1, 128, 128)
    np.testing.assert_array_equal(vol.array[0], (stored * slope + intercept).astype(np.float32))
    assert vol.spacing == pytest.approx((float(ds.SliceThickness), *map(float, ds.PixelSpacing)))
    x, y, z = map(float, ds.ImagePositionPatient)
    assert vol.origin == pytest.approx((z, y, x))


def test_dicom_rescale_slope_is_applied(tmp_path):
    ds = _ct_small()
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -1000
    ds.save_as(tmp_path / "s.dcm")
    stored = np.frombuffer(ds.PixelData, dtype="<i2").reshape(128, 128).astype(np.float64)
    vol = load_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array[0], (2 * stored - 1000).astype(np.float32))


def test_dicom_series_is_sorted_by_position_with_z_spacing(tmp_path):
    z = [-75.7, -73.2, -70.7]  # 2.5 mm apart; files named in shuffled order
    _write_series(tmp_path / "series", z)
    vol = load_volume(tmp_path / "series")
    base = _ct_small()
    raw = np.frombuffer(base.PixelData, dtype="<i2").reshape(128, 128).astype(np.float32)
    assert vol.shape == (3, 128, 128)
    for n in range(3):  # slice n carries the signature +10·n
        np.testing.assert_array_equal(vol.array[n], raw + 10 * n - 1024)
    assert vol.spacing == pytest.approx((2.5, 0.661468, 0.661468))
    assert vol.origin[0] == pytest.approx(-75.7)
    assert vol.path == tmp_path / "series"

    # positions decide, not InstanceNumber or file names: reversed positions give the reversed stack
    paths = _write_series(tmp_path / "reversed", z[::-1], seed=3)
    rev = load_dicom_series(list(reversed(paths)))
    np.testing.assert_array_equal(rev.array, vol.array[::-1])


def test_dicom_series_falls_back_to_instance_number(tmp_path):
    paths = _write_series(tmp_path / "s", [0.0, 1.0, 2.0])
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.InstanceNumber = 4 - int(ds.InstanceNumber)  # reverse the order
        ds.save_as(p)
    vol = load_dicom_series(tmp_path / "s")
    raw = np.frombuffer(_ct_small().PixelData, dtype="<i2").reshape(128, 128).astype(np.float32)
    np.testing.assert_array_equal(vol.array[0], raw + 20 - 1024)
    assert vol.spacing[0] == pytest.approx(5.0)  # SliceThickness / SpacingBetweenSlices


def test_dicom_series_errors_name_the_file(tmp_path):
    series = tmp_path / "stray"
    _write_series(series, [0.0, 2.5, 5.0])
    (series / "notes.txt").write_text("not a DICOM file")
    with pytest.raises(VolumeError, match=r"notes\.txt.*not a readable DICOM"):
        load_volume(series)

    series = tmp_path / "mixed"
    paths = _write_series(series, [0.0, 2.5, 5.0])
    ds = pydicom.dcmread(paths[1])
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.save_as(paths[1])
    with pytest.raises(VolumeError, match=r"mixed.*2 series"):
        load_dicom_series(series)
    assert load_dicom_series(series, series_uid="1.2.3.4").shape == (1, 128, 128)

    series = tmp_path / "nopixels"
    paths = _write_series(series, [0.0, 2.5, 5.0])
    ds = pydicom.dcmread(paths[2])
    del ds.PixelData
    ds.save_as(paths[2])
    with pytest.raises(VolumeError, match=rf"{re.escape(paths[2].name)}.*no pixel data"):
        load_dicom_series(series)

    series = tmp_path / "shapes"
    paths = _write_series(series, [0.0, 2.5, 5.0])
    ds = pydicom.dcmread(paths[1])
    ds.Rows, ds.Columns = 64, 256  # same byte count, different slice shape
    ds.save_as(paths[1])
    with pytest.raises(VolumeError, match=rf"{re.escape(paths[1].name)}.*shape"):
        load_dicom_series(series)

    series = tmp_path / "gap"
    _write_series(series, [0.0, 2.5, 5.0, 10.0])
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        load_dicom_series(series)
    assert load_dicom_series(series, allow_uneven_spacing=True).spacing[0] == pytest.approx(2.5)

    series = tmp_path / "dup"
    _write_series(series, [0.0, 2.5, 2.5])
    with pytest.raises(VolumeError, match="same slice position"):
        load_dicom_series(series)

    series = tmp_path / "cut"
    paths = _write_series(series, [0.0, 2.5])
    paths[0].write_bytes(paths[0].read_bytes()[:2000])
    with pytest.raises(VolumeError, match=re.escape(paths[0].name)):
        load_dicom_series(series)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError, match="holds no files"):
        load_dicom_series(empty)


def test_read_dicom_series_reports_files_positions_and_uids_in_volume_order(tmp_path):
    z = [-75.7, -73.2, -70.7, -68.2]
    paths = _write_series(tmp_path / "s", z, seed=5)  # paths[n] holds the slice at z[n]
    series = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(series.volume.array, load_dicom_series(tmp_path / "s").array)
    assert series.files == paths
    np.testing.assert_allclose(series.positions, z)  # the slice normal is +z for CT_small's orientation
    np.testing.assert_allclose(series.image_positions[:, 2], z)
    base = _ct_small()
    assert series.sop_instance_uids == [f"{base.SOPInstanceUID}.{n + 1}" for n in range(4)]
    assert series.instance_numbers == [1, 2, 3, 4]
    assert series.series_instance_uid == str(base.SeriesInstanceUID)
    assert series.study_instance_uid == str(base.StudyInstanceUID)
    assert series.ordered_by == "position"


def test_dicom_sort_by_z_needs_no_orientation(tmp_path):
    paths = _write_series(tmp_path / "s", [0.0, 2.5, 5.0], seed=2)
    for p in paths:  # reverse InstanceNumber and drop the orientation: "normal" falls back, "z" does not
        ds = pydicom.dcmread(p)
        del ds.ImageOrientationPatient
        ds.InstanceNumber = 4 - int(ds.InstanceNumber)
        ds.save_as(p)
    by_z = read_dicom_series(tmp_path / "s", sort_by="z")
    assert by_z.ordered_by == "position" and by_z.files == paths
    assert by_z.volume.spacing[0] == pytest.approx(2.5)
    by_number = read_dicom_series(tmp_path / "s")
    assert by_number.ordered_by == "instance_number" and by_number.positions is None
    assert by_number.files == paths[::-1]
    with pytest.raises(ValueError, match="sort_by"):
        load_dicom_series(tmp_path / "s", sort_by="x")


def test_dicom_max_gap_ratio_refuses_a_missing_slice_naming_files_and_positions(tmp_path):
    paths = _write_series(tmp_path / "gap", [0.0, 2.5, 5.0, 10.0, 12.5])
    with pytest.raises(VolumeError, match="missing slice") as info:
        load_dicom_series(tmp_path / "gap", allow_uneven_spacing=True, max_gap_ratio=1.5)
    msg = str(info.value)
    assert msg.startswith(str(paths[3])) and paths[2].name in msg and "(5.0000 mm)" in msg and "(10.0000 mm)" in msg
    vol = load_dicom_series(tmp_path / "gap", allow_uneven_spacing=True, max_gap_ratio=2.5)
    assert vol.spacing[0] == pytest.approx(2.5)
    _write_series(tmp_path / "jitter", [0.0, 2.5, 5.2, 7.5])  # 2.7 mm < 1.5 x 2.5 mm: only the 1% rule objects
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        load_dicom_series(tmp_path / "jitter", max_gap_ratio=1.5)
    assert load_dicom_series(tmp_path / "jitter", allow_uneven_spacing=True, max_gap_ratio=1.5).shape[0] == 4
    with pytest.raises(ValueError, match="max_gap_ratio"):
        load_dicom_series(tmp_path / "jitter", max_gap_ratio=0.5)


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is not None for m in ("pylibjpeg", "gdcm", "jpeg_ls")),
    reason="a JPEG-LS decoder is installed, so the file decodes",
)
def test_dicom_undecodable_compression_names_the_file_and_the_optional_package(tmp_path):
    target = tmp_path / "jls.dcm"
    target.write_bytes(Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")).read_bytes())
    with pytest.raises(VolumeError, match=re.escape(str(target))) as info:
        load_dicom_series(target)
    msg = str(info.value)
    assert "cannot decode the pixel data" in msg and "JPEG-LS" in msg and "1.2.840.10008.1.2.4.80" in msg
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in msg and "python-gdcm" in msg


# ----------------------------------------------------------------------------------------- misc helpers


def test_clip_and_normalize_known_values():
    hu = np.array([-3000.0, -1000.0, -500.0, 0.0, 500.0, 1000.0, 2500.0])
    out = clip_and_normalize(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(
        clip_and_normalize([-200.0, 0.0, 100.0, 300.0], low=-100, high=200), [0, 1 / 3, 2 / 3, 1]
    )
    with pytest.raises(ValueError, match="high > low"):
        clip_and_normalize(hu, low=10, high=10)


def test_load_volume_rejects_unknown_and_missing_paths(tmp_path):
    other = tmp_path / "scan.png"
    other.write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match=r"scan\.png.*unknown volume format"):
        load_volume(other)
    with pytest.raises(VolumeError, match=r"nothing\.nii.*does not exist"):
        load_volume(tmp_path / "nothing.nii")


def test_volume_validates_its_fields():
    vol = Volume(array=np.zeros((2, 3, 4), dtype=np.int16), spacing=(1, 2, 3))
    assert vol.array.dtype == np.float32 and vol.spacing == (1.0, 2.0, 3.0) and vol.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="3-D"):
        Volume(array=np.zeros((2, 3)), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        Volume(array=np.zeros((2, 3, 4)), spacing=(1, 0, 1))
