"""Series loading: geometry, sorting, HU, compressed transfer syntaxes, radiographs, clear errors, model grid."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, generate_uid

from inference.volume import (
    CT_WINDOW_HU,
    GridMapping,
    InconsistentGeometryError,
    InconsistentSpacingError,
    MissingPixelDataError,
    MixedOrientationError,
    MixedSeriesError,
    MultiFrameError,
    NotDicomError,
    PixelDecodeError,
    SeriesError,
    TooFewInstancesError,
    UnsupportedSOPClassError,
    UnsupportedViewError,
    fill_left_out_slices,
    from_model_grid,
    load_series,
    mask_from_grid,
    mask_to_grid,
    normalise,
    resample_to_grid,
    to_model_grid,
    to_model_grid_with_mask,
)
from tests.conftest import DCMTK
from tests.dicomgen import make_ct_series, make_dx, make_undecodable, write_datasets

PATIENT_NAME = "Test^Synthetic"


def stored_hu(ds: Dataset) -> np.ndarray:
    raw = np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns)
    return raw.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_ct_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    series = make_ct_series(6, 24, 20, shuffle_instance_numbers=True, seed=2)
    by_z = sorted(series, key=lambda ds: ds.ImagePositionPatient[2])
    shuffled = [series[i] for i in (3, 0, 5, 1, 4, 2)]
    paths = write_datasets(shuffled, tmp_path)
    vol = load_series(paths)
    assert vol.modality == "CT" and vol.shape == (6, 24, 20)
    assert vol.sop_instance_uids == [ds.SOPInstanceUID for ds in by_z]
    for k, ds in enumerate(by_z):
        np.testing.assert_array_equal(vol.pixels[k], stored_hu(ds))  # HU, not stored values
        np.testing.assert_allclose(vol.positions[k], [float(v) for v in ds.ImagePositionPatient])
        assert vol.headers[k].SOPInstanceUID == ds.SOPInstanceUID and "PixelData" not in vol.headers[k]
    assert vol.pixel_spacing == (0.7, 0.7) and vol.slice_spacing == pytest.approx(2.5)
    assert vol.slice_thickness == 2.5
    np.testing.assert_allclose(vol.normal, [0, 0, 1])
    assert vol.voxel_volume_mm3 == pytest.approx(0.7 * 0.7 * 2.5)
    assert vol.series_instance_uid == series[0].SeriesInstanceUID
    assert [p.name for p in vol.paths] == [paths[shuffled.index(ds)].name for ds in by_z]


def test_oblique_series_sorts_along_its_normal(tmp_path: Path) -> None:
    series = make_ct_series(5, 16, 16, seed=1)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    normal = np.cross(row, col)
    origin = np.array([-5.0, -5.0, 10.0])
    order = [2, 4, 0, 3, 1]  # position index per file; z of the position alone would mislead
    for ds, k in zip(series, order, strict=True):
        ds.ImageOrientationPatient = [*row, *col]
        ds.ImagePositionPatient = [float(v) for v in origin + 3.0 * k * normal + 40.0 * k * col]
    vol = load_series(write_datasets(series, tmp_path))
    expected = [series[order.index(k)].SOPInstanceUID for k in range(5)]
    assert vol.sop_instance_uids == expected
    assert vol.slice_spacing == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("tool", "args", "exact"),
    [
        ("dcmcjpeg", [], True),  # JPEG lossless, process 14 SV1 (decoded by python-gdcm)
        ("dcmcrle", [], True),  # RLE lossless (pylibjpeg-rle)
        ("dcmcjpls", [], True),  # JPEG-LS lossless (pyjpegls)
        ("pydicom-j2k", [], True),  # JPEG 2000 lossless via pylibjpeg-openjpeg
    ],
)
def test_compressed_series_round_trip(
    tmp_path: Path, dcmtk: dict[str, Path], tool: str, args: list[str], exact: bool
) -> None:
    series = make_ct_series(3, 32, 32, seed=4)
    raw_paths = write_datasets(series, tmp_path / "raw")
    out = tmp_path / "compressed"
    out.mkdir()
    env = dict(os.environ, TCP_NODELAY="1")
    for p in raw_paths:
        target = out / p.name
        if tool == "pydicom-j2k":
            ds = pydicom.dcmread(p)
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(target)
        else:
            subprocess.run([str(dcmtk[tool]), *args, str(p), str(target)], check=True, env=env, capture_output=True)
    ts = pydicom.dcmread(out / raw_paths[0].name, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts.is_compressed
    ref = load_series(raw_paths)
    vol = load_series(sorted(out.iterdir()))
    assert vol.sop_instance_uids == ref.sop_instance_uids
    np.testing.assert_allclose(vol.positions, ref.positions)
    assert exact
    np.testing.assert_array_equal(vol.pixels, ref.pixels)


def test_undecodable_transfer_syntax_is_a_clear_error(tmp_path: Path, dcmtk: dict[str, Path]) -> None:
    """12-bit JPEG Extended (lossy) needs the GPL libjpeg plugin, which edgenode does not ship: a clear error."""
    ds = make_ct_series(1, 16, 16)[0]
    raw = write_datasets([ds], tmp_path / "raw")[0]
    target = tmp_path / "jpeg12.dcm"
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run([str(dcmtk["dcmcjpeg"]), "+ee", str(raw), str(target)], check=True, env=env, capture_output=True)
    uid = pydicom.dcmread(target, stop_before_pixels=True).SOPInstanceUID  # lossy: dcmcjpeg gives a new UID
    with pytest.raises(PixelDecodeError) as info:
        load_series([target])
    _assert_clear(info.value, uid)
    assert "JPEG Extended" in str(info.value)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    m2 = load_series(write_datasets([make_dx(48, 40, seed=5)], tmp_path / "m2"))
    m1 = load_series(write_datasets([make_dx(48, 40, seed=5, monochrome1=True)], tmp_path / "m1"))
    assert m1.modality == "DX" and m1.shape == (1, 48, 40)
    np.testing.assert_allclose(m1.pixels, m2.pixels, atol=1e-6)
    assert m2.pixels.min() >= 0 and m2.pixels.max() <= 1
    # bright = dense: the spine (bone) is brighter than the lungs, as in MONOCHROME2 display
    assert m1.pixels[0, int(48 * 0.775), 20] > m1.pixels[0, int(48 * 0.45), int(40 * 0.29)]
    assert m1.pixel_spacing == (0.5, 0.5) and m1.positions is None and m1.slice_thickness == 1.0


def test_radiograph_window_and_voi_lut(tmp_path: Path) -> None:
    ds = make_dx(16, 16, seed=0)
    ds.WindowCenter, ds.WindowWidth = 1000, 1001  # linear: (x - 999.5) / 1000 + 0.5
    vol = load_series(write_datasets([ds], tmp_path / "win"))
    raw = np.frombuffer(ds.PixelData, np.uint16).reshape(16, 16).astype(np.float64)
    np.testing.assert_allclose(vol.pixels[0], np.clip((raw - 999.5) / 1000 + 0.5, 0, 1), atol=1e-6)

    lut = make_dx(16, 16, seed=0)
    del lut.WindowCenter, lut.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]  # 4096 entries from stored value 0, 12-bit output
    item.add_new(0x00283006, "US", [min(4095, 2 * v) for v in range(4096)])  # LUT Data: a contrast stretch
    lut.VOILUTSequence = [item]
    vol = load_series(write_datasets([lut], tmp_path / "lut"))
    np.testing.assert_allclose(vol.pixels[0], np.minimum(4095, 2 * raw) / 4095, atol=1e-6)

    plain = make_dx(16, 16, seed=0)
    del plain.WindowCenter, plain.WindowWidth
    vol = load_series(write_datasets([plain], tmp_path / "plain"))
    assert vol.pixels.min() == 0 and vol.pixels.max() == 1


def _assert_clear(err: SeriesError, uid: str) -> None:
    assert uid in str(err) and err.sop_instance_uid == uid
    assert PATIENT_NAME not in str(err) and "Synthetic" not in str(err)


def test_inconsistent_spacing_is_rejected(tmp_path: Path) -> None:
    series = make_ct_series(5, 16, 16)
    series[3].ImagePositionPatient = [series[3].ImagePositionPatient[0], series[3].ImagePositionPatient[1], -90.0]
    for k in (4,):
        series[k].ImagePositionPatient = [*series[k].ImagePositionPatient[:2], -100 + 2.5 * k + 5]
    with pytest.raises(InconsistentSpacingError) as info:
        load_series(write_datasets(series, tmp_path))
    assert "slice gap" in str(info.value) and PATIENT_NAME not in str(info.value)
    assert info.value.sop_instance_uid in {ds.SOPInstanceUID for ds in series}


def test_missing_slice_and_duplicate_position(tmp_path: Path) -> None:
    series = make_ct_series(5, 16, 16)
    with pytest.raises(InconsistentSpacingError) as info:
        load_series(write_datasets([s for i, s in enumerate(series) if i != 2], tmp_path / "gap"))
    _assert_clear(info.value, series[3].SOPInstanceUID)
    series[1].ImagePositionPatient = series[0].ImagePositionPatient
    with pytest.raises(InconsistentSpacingError, match="same slice position"):
        load_series(write_datasets(series, tmp_path / "dup"))


def test_mixed_orientation_is_rejected(tmp_path: Path) -> None:
    series = make_ct_series(3, 16, 16)
    series[2].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(MixedOrientationError) as info:
        load_series(write_datasets(series, tmp_path))
    _assert_clear(info.value, series[2].SOPInstanceUID)


def test_missing_pixel_data_leaves_the_instance_out(tmp_path: Path) -> None:
    series = make_ct_series(3, 16, 16)
    del series[2].PixelData
    paths = write_datasets(series, tmp_path)
    vol = load_series(paths)
    assert vol.sop_instance_uids == [ds.SOPInstanceUID for ds in series[:2]] and vol.slots is None
    (left,) = vol.left_out
    assert left.path == paths[2] and left.sop_instance_uid == series[2].SOPInstanceUID
    assert left.summary == "no pixel data" and series[2].SOPInstanceUID in left.reason
    with pytest.raises(MissingPixelDataError) as info:  # nothing else in the series: its own error
        load_series(paths[2:])
    _assert_clear(info.value, series[2].SOPInstanceUID)


def test_an_undecodable_slice_is_left_out_and_its_gap_kept(tmp_path: Path) -> None:
    series = make_ct_series(6, 16, 16)
    reference = load_series(write_datasets(series, tmp_path / "good"))
    make_undecodable(series[2])
    vol = load_series(write_datasets(series, tmp_path / "bad"))
    kept = [0, 1, 3, 4, 5]
    assert vol.sop_instance_uids == [reference.sop_instance_uids[k] for k in kept]
    np.testing.assert_array_equal(vol.pixels, reference.pixels[kept])
    np.testing.assert_array_equal(vol.positions, reference.positions[kept])  # every slice where it was
    assert vol.slots.tolist() == kept and vol.slice_spacing == pytest.approx(2.5)
    (left,) = vol.left_out
    assert left.sop_instance_uid == series[2].SOPInstanceUID and left.summary == "pixel data cannot be decoded"
    assert "RLE" in left.reason and PATIENT_NAME not in left.reason
    regular = fill_left_out_slices(vol.pixels, vol.slots)
    assert regular.shape == reference.pixels.shape
    np.testing.assert_array_equal(regular[kept], vol.pixels)
    np.testing.assert_allclose(regular[2], (reference.pixels[1] + reference.pixels[3]) / 2)


def test_a_long_gap_keeps_the_longest_contiguous_part(tmp_path: Path) -> None:
    series = make_ct_series(10, 16, 16)
    for k in (2, 3, 4):
        make_undecodable(series[k])
    vol = load_series(write_datasets(series, tmp_path))
    assert vol.sop_instance_uids == [ds.SOPInstanceUID for ds in series[5:]] and vol.slots is None
    summaries = {left.sop_instance_uid: left.summary for left in vol.left_out}
    assert summaries == {
        **{series[k].SOPInstanceUID: "pixel data cannot be decoded" for k in (2, 3, 4)},
        **{series[k].SOPInstanceUID: "separated from the analysed slices by a gap of left-out slices" for k in (0, 1)},
    }


def test_an_unreadable_file_accounts_for_one_gap_only(tmp_path: Path) -> None:
    series = make_ct_series(6, 16, 16)
    paths = write_datasets(series, tmp_path)
    paths[3].write_bytes(b"not dicom at all")
    vol = load_series(paths)
    assert vol.slots.tolist() == [0, 1, 2, 4, 5]
    (left,) = vol.left_out
    assert left.path == paths[3] and left.sop_instance_uid is None and left.summary == "not a readable DICOM file"
    with pytest.raises(InconsistentSpacingError):  # a second gap, and no file that could have been that slice
        load_series([p for k, p in enumerate(paths) if k != 1])


def test_too_few_slices_left_is_a_series_error(tmp_path: Path) -> None:
    series = make_ct_series(4, 16, 16)
    make_undecodable(series[1])
    paths = write_datasets(series, tmp_path)
    assert len(load_series(paths, min_ct_slices=3).sop_instance_uids) == 3
    with pytest.raises(TooFewInstancesError) as info:
        load_series(paths, min_ct_slices=4)
    _assert_clear(info.value, series[1].SOPInstanceUID)
    assert "only 3 of the series' 4 instances" in str(info.value)
    assert "pixel data cannot be decoded" in str(info.value)
    for k in (0, 2, 3):
        make_undecodable(series[k])
    with pytest.raises(TooFewInstancesError, match="none of the series' 4 instances can be loaded"):
        load_series(write_datasets(series, tmp_path / "all"))


def test_an_undecodable_radiograph_is_left_out_of_its_series(tmp_path: Path) -> None:
    images = [make_dx(32, 32, seed=k) for k in range(3)]
    for k, ds in enumerate(images):
        ds.SeriesInstanceUID, ds.InstanceNumber = images[0].SeriesInstanceUID, k + 1
    make_undecodable(images[1])
    vol = load_series(write_datasets(images, tmp_path))
    assert vol.sop_instance_uids == [images[0].SOPInstanceUID, images[2].SOPInstanceUID] and vol.slots is None
    assert [left.sop_instance_uid for left in vol.left_out] == [images[1].SOPInstanceUID]


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "RLO", "LLD"])
def test_a_radiograph_that_is_no_frontal_view_is_refused_saying_so(tmp_path: Path, view: str) -> None:
    """Radiographs are analysed as PA/AP views only: a lateral (or oblique, decubitus) image is left out of its
    series with the reason, and alone it is a SeriesError naming its view."""
    images = [make_dx(32, 32, seed=k) for k in range(3)]
    for k, ds in enumerate(images):
        ds.SeriesInstanceUID, ds.InstanceNumber = images[0].SeriesInstanceUID, k + 1
    images[1].ViewPosition = view
    del images[2].ViewPosition  # no view named: taken as frontal (many CR images carry none)
    vol = load_series(write_datasets(images, tmp_path / "series"))
    assert vol.sop_instance_uids == [images[0].SOPInstanceUID, images[2].SOPInstanceUID]
    (left,) = vol.left_out
    assert left.sop_instance_uid == images[1].SOPInstanceUID and left.summary == UnsupportedViewError.summary
    with pytest.raises(UnsupportedViewError, match=f"{view} view; only frontal"):
        load_series(write_datasets([images[1]], tmp_path / "alone"))


def test_a_radiograph_without_view_position_is_judged_by_its_view_code(tmp_path: Path) -> None:
    ds = make_dx(32, 32)
    del ds.ViewPosition
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399173006", "SCT", "left lateral"
    ds.ViewCodeSequence = [code]
    with pytest.raises(UnsupportedViewError, match="left lateral view"):
        load_series(write_datasets([ds], tmp_path))
    code.CodeValue, code.CodeMeaning = "399348003", "postero-anterior"
    assert load_series(write_datasets([ds], tmp_path / "pa")).pixels.shape == (1, 32, 32)


def test_multi_frame_is_rejected(tmp_path: Path) -> None:
    ds = make_ct_series(1, 16, 16)[0]
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(MultiFrameError) as info:
        load_series(write_datasets([ds], tmp_path))
    _assert_clear(info.value, ds.SOPInstanceUID)


def test_non_image_sop_class_is_rejected(tmp_path: Path) -> None:
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID
    sr.PatientName = PATIENT_NAME
    sr.Modality = "SR"
    with pytest.raises(UnsupportedSOPClassError) as info:
        load_series(write_datasets([sr], tmp_path))
    _assert_clear(info.value, sr.SOPInstanceUID)
    assert "Basic Text SR" in str(info.value)


def test_mixed_series_size_and_non_dicom(tmp_path: Path) -> None:
    a = make_ct_series(2, 16, 16)
    b = make_ct_series(1, 16, 16)
    with pytest.raises(MixedSeriesError) as info:
        load_series(write_datasets(a + b, tmp_path / "mixed"))
    _assert_clear(info.value, b[0].SOPInstanceUID)
    c = make_ct_series(2, 16, 16)
    c[1].Rows = 8
    c[1].PixelData = c[1].PixelData[: 8 * 16 * 2]
    with pytest.raises(InconsistentGeometryError, match="Rows"):
        load_series(write_datasets(c, tmp_path / "size"))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(NotDicomError, match="junk.dcm"):
        load_series([junk])
    with pytest.raises(SeriesError):
        load_series([])


def test_normalisation() -> None:
    lo, hi = CT_WINDOW_HU
    hu = np.array([[[-2000, lo, (lo + hi) / 2, hi, 3000]]], np.float32)
    np.testing.assert_allclose(normalise(hu, "CT"), [[[-1, -1, 0, 1, 1]]])
    np.testing.assert_allclose(normalise(np.array([[[0.0, 0.25, 1.0]]], np.float32), "DX"), [[[-1, -0.5, 1]]])


def test_model_grid_round_trip_keeps_geometry(tmp_path: Path) -> None:
    """A marker keeps its place through pad/resize and back; smooth content survives the round trip."""
    mapping = GridMapping(rows=40, cols=24, size=32)
    yy, xx = np.mgrid[0:40, 0:24].astype(np.float32)
    smooth = np.sin(yy / 7.0) * np.cos(xx / 5.0)
    back = from_model_grid(resample_to_grid(smooth[None], mapping), mapping)
    assert back.shape == (1, 40, 24)
    assert np.abs(back - smooth).mean() < 0.05
    marker = np.zeros((1, 40, 24), np.float32)
    marker[0, 10:14, 16:20] = 1.0
    grid_mask = mask_to_grid(marker > 0, mapping)
    restored = mask_from_grid(grid_mask, mapping)
    ys, xs = np.nonzero(restored[0])
    assert abs(ys.mean() - 11.5) < 0.6 and abs(xs.mean() - 17.5) < 0.6

    vol = load_series(write_datasets(make_ct_series(3, 48, 48), tmp_path))
    grid, m = to_model_grid(vol, 32)
    assert grid.shape == (3, 32, 32) and grid.min() >= -1 and grid.max() <= 1
    assert m.rows == 48 and from_model_grid(grid, m).shape == vol.shape
    mask = vol.pixels < -300
    together, grid_mask, same = to_model_grid_with_mask(vol, mask, 32)
    assert same == m and np.array_equal(together, grid) and np.array_equal(grid_mask, mask_to_grid(mask, m))


def _reference_resample_to_grid(array: np.ndarray, mapping: GridMapping, fill: float) -> np.ndarray:
    """resample_to_grid as first written: always through a padded float32 copy."""
    import torch

    from inference.volume import _resize

    square = np.full((array.shape[0], mapping.side, mapping.side), fill, dtype=np.float32)
    square[:, mapping.pad_top : mapping.pad_top + mapping.rows, mapping.pad_left : mapping.pad_left + mapping.cols] = (
        array
    )
    return _resize(torch.from_numpy(square), (mapping.size, mapping.size), "bilinear").numpy().astype(np.float32)


def _reference_from_model_grid(array: np.ndarray, mapping: GridMapping) -> np.ndarray:
    import torch

    from inference.volume import _resize

    square = _resize(torch.as_tensor(np.asarray(array, dtype=np.float32)), (mapping.side, mapping.side), "bilinear")
    top, left = mapping.pad_top, mapping.pad_left
    return square[:, top : top + mapping.rows, left : left + mapping.cols].numpy().astype(np.float32)


@pytest.mark.parametrize(("rows", "cols", "size"), [(40, 40, 16), (40, 24, 16), (23, 37, 32), (30, 30, 64)])
def test_model_grid_mapping_equals_reference(rows: int, cols: int, size: int) -> None:
    """The copy-free paths (square sources, in-place normalisation, only segmented slices resized back) give the
    same bits as the plain expressions they replace."""
    rng = np.random.default_rng(rows * cols)
    mapping = GridMapping(rows=rows, cols=cols, size=size)
    hu = rng.uniform(-1500, 1500, (5, rows, cols)).astype(np.float32)
    lo, hi = CT_WINDOW_HU
    expected = np.clip((hu - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
    assert np.array_equal(normalise(hu, "CT"), expected)
    wide = hu.astype(np.float64)  # other precisions: computed in theirs, rounded once
    expected_wide = np.clip((wide - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
    assert np.array_equal(normalise(wide, "CT"), expected_wide)
    unit = rng.random((5, rows, cols), dtype=np.float32)
    assert np.array_equal(normalise(unit, "DX"), np.clip(unit * 2.0 - 1.0, -1.0, 1.0))
    assert np.array_equal(
        resample_to_grid(expected, mapping, fill=-1.0), _reference_resample_to_grid(expected, mapping, -1.0)
    )
    mask = ((hu > 300) | (np.arange(cols) > cols // 2)) & (np.arange(5) != 2)[:, None, None]
    assert np.array_equal(
        mask_to_grid(mask, mapping), _reference_resample_to_grid(mask.astype(np.float32), mapping, 0.0) >= 0.5
    )
    grid = rng.random((5, size, size), dtype=np.float32)
    back = from_model_grid(grid, mapping)
    assert back.dtype == np.float32 and back.flags.c_contiguous
    assert np.array_equal(back, _reference_from_model_grid(grid, mapping))
    segmentation = np.zeros((5, size, size), bool)
    segmentation[1, 2:6, 3:9] = True
    segmentation[4] = grid[4] > 0.7
    expected_mask = _reference_from_model_grid(segmentation.astype(np.float32), mapping) >= 0.5
    assert np.array_equal(mask_from_grid(segmentation, mapping), expected_mask)
    assert not mask_from_grid(np.zeros_like(segmentation), mapping).any()


def test_ct_values_equal_pydicoms_rescale_rounded_to_float32() -> None:
    """The float32 fast path gives pydicom's float64 apply_rescale values exactly, and other cases go through it."""
    from pydicom.pixels import apply_rescale

    from inference.volume import _modality_values_into

    rng = np.random.default_rng(0)
    cases = [
        (np.uint16, 1, -1024),
        (np.int16, 1, 0),
        (np.int16, 2, -1000),
        (np.uint8, 3, 7),
        (np.uint16, 0.5, -1024),  # not an integer slope: pydicom's path
        (np.uint16, 1, -1024.5),
        (np.uint16, 300, 0),  # could leave float32's exact integers: pydicom's path
        (np.int32, 1, -1024),
    ]
    for dtype, slope, intercept in cases:
        info = np.iinfo(dtype)
        raw = rng.integers(info.min, info.max, (7, 9), endpoint=True).astype(dtype)
        raw.flat[:2] = (info.min, info.max)
        ds = Dataset()
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        out = np.empty(raw.shape, np.float32)
        _modality_values_into(out, raw, ds)
        assert np.array_equal(out, apply_rescale(raw, ds).astype(np.float32)), (dtype, slope, intercept)
    ds = Dataset()  # no rescale at all: the stored values
    out = np.empty((2, 2), np.float32)
    _modality_values_into(out, np.array([[1, 2], [3, 4]], np.uint16), ds)
    assert out.tolist() == [[1, 2], [3, 4]]


def test_dcmtk_tools_exist() -> None:
    for name in ("dcmcjpeg", "dcmcrle", "dcmcjpls"):
        assert DCMTK[name].exists()


def test_a_slice_with_a_malformed_position_is_left_out_naming_the_instance(tmp_path: Path) -> None:
    series = make_ct_series(4, 32, 32)
    series[1].ImagePositionPatient = 5.0  # one value where three belong
    vol = load_series(write_datasets(series, tmp_path))
    assert vol.slots.tolist() == [0, 2, 3] and vol.slice_spacing == pytest.approx(2.5)
    (left,) = vol.left_out
    assert left.sop_instance_uid == series[1].SOPInstanceUID
    assert "ImagePositionPatient is missing or malformed" in left.reason
    with pytest.raises(InconsistentGeometryError, match="ImagePositionPatient is missing or malformed") as caught:
        load_series(write_datasets(series[1:2], tmp_path / "alone"))
    assert caught.value.sop_instance_uid == series[1].SOPInstanceUID
