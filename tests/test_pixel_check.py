"""The listener's pixel data check on encoded data sets: native lengths and encapsulated frame counts.

Every case goes through `parse_index_fields`, the function the listener calls on the received bytes,
for the transfer syntaxes the node accepts. The end-to-end tests with real senders are in
tests/test_store_integrity.py.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from node.received import InvalidDataSet, parse_index_fields
from tests.dicomgen import make_ct_series
from tests.ingest_support import dataset_bytes


def encoded(ds: Dataset, tmp_path: Path, ts: str = ExplicitVRLittleEndian) -> bytes:
    """The data set bytes as a sender puts them on the wire in transfer syntax `ts`."""
    ds.file_meta.TransferSyntaxUID = ts
    path = tmp_path / "x.dcm"
    if ts == DeflatedExplicitVRLittleEndian:  # pydicom deflates on write; keep the plain bytes to deflate here
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
        body = dataset_bytes(path)
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return packer.compress(body) + packer.flush()
    ds.save_as(path, enforce_file_format=True, little_endian=UID(ts).is_little_endian)
    return dataset_bytes(path)


def refusal(stream: bytes, ts: str) -> str:
    with pytest.raises(InvalidDataSet) as caught:
        parse_index_fields(stream, ts)
    assert caught.value.status == 0xA900
    return caught.value.reason


def ct(rows: int = 16, cols: int = 16) -> Dataset:
    return make_ct_series(1, rows, cols)[0]


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_native_pixel_data_of_the_claimed_size_passes_and_a_short_one_is_refused(tmp_path: Path, ts: str) -> None:
    good = ct()
    assert parse_index_fields(encoded(good, tmp_path, ts), ts).sop_instance_uid == good.SOPInstanceUID
    short = ct()
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    reason = refusal(encoded(short, tmp_path, ts), ts)
    assert reason == (
        "Pixel Data is 256 bytes; 16 rows x 16 columns x 1 samples x 16 bits x 1 frame(s) (MONOCHROME2) need 512"
    )
    long = ct()
    long.PixelData = long.PixelData + b"\0\0"
    assert "is 514 bytes" in refusal(encoded(long, tmp_path, ts), ts)


def test_an_absurd_size_claim_with_a_few_bytes_is_refused(tmp_path: Path) -> None:
    ds = ct()
    ds.Rows = ds.Columns = 60000
    ds.PixelData = b"\0" * 16
    assert "need 7200000000" in refusal(encoded(ds, tmp_path), ExplicitVRLittleEndian)


def test_odd_lengths_allow_the_one_pad_byte(tmp_path: Path) -> None:
    ds = ct(3, 3)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(range(9)) + b"\0"  # 9 bytes of pixels, padded to even length
    parse_index_fields(encoded(ds, tmp_path), ExplicitVRLittleEndian)
    ds.PixelData = bytes(range(8))
    assert "is 8 bytes" in refusal(encoded(ds, tmp_path), ExplicitVRLittleEndian)


def test_bits_allocated_1_is_packed_across_frames(tmp_path: Path) -> None:
    ds = ct(5, 5)  # 3 frames of 25 one-bit pixels: 75 bits -> 10 bytes (not 3 x 4 = 12)
    ds.NumberOfFrames = 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = b"\xff" * 10
    parse_index_fields(encoded(ds, tmp_path), ExplicitVRLittleEndian)
    ds.PixelData = b"\xff" * 12
    assert "need 10" in refusal(encoded(ds, tmp_path), ExplicitVRLittleEndian)


def test_a_native_multiframe_missing_a_frame_is_refused(tmp_path: Path) -> None:
    ds = ct(8, 8)
    ds.NumberOfFrames = 4
    ds.PixelData = b"\1\0" * 64 * 3
    assert "x 4 frame(s)" in refusal(encoded(ds, tmp_path), ExplicitVRLittleEndian)


def test_ybr_full_422_native_is_two_thirds(tmp_path: Path) -> None:
    ds = ct(4, 4)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = b"\x80" * 32
    parse_index_fields(encoded(ds, tmp_path), ExplicitVRLittleEndian)


def test_pixel_data_without_image_attributes_or_bits_allocated_12_is_refused(tmp_path: Path) -> None:
    ds = ct()
    del ds.Rows
    assert "Rows missing" in refusal(encoded(ds, tmp_path), ExplicitVRLittleEndian)
    ds = ct()
    ds.BitsAllocated = 12
    assert "Bits Allocated 12" in refusal(encoded(ds, tmp_path), ExplicitVRLittleEndian)


def _frames(n: int, ts: str) -> tuple[Dataset, list[bytes]]:
    """A CT data set and `n` compressed frames of it in `ts` (the same image n times)."""
    ds = ct(64, 64)  # openjpeg's default resolutions need more than 16 x 16
    ds.compress(ts, encoding_plugin="pylibjpeg" if ts == JPEG2000Lossless else "")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.NumberOfFrames = n
    return ds, [frame] * n


@pytest.mark.parametrize("ts", [RLELossless, JPEG2000Lossless])
def test_encapsulated_frames_are_counted_against_number_of_frames(tmp_path: Path, ts: str) -> None:
    ds, frames = _frames(3, ts)
    ds.PixelData = encapsulate(frames, has_bot=False)
    parse_index_fields(encoded(ds, tmp_path, ts), ts)
    ds.PixelData = encapsulate(frames[:2], has_bot=False)
    assert "2 fragment(s) for 3 frame(s)" in refusal(encoded(ds, tmp_path, ts), ts)
    ds.PixelData = encapsulate(frames, has_bot=True)
    parse_index_fields(encoded(ds, tmp_path, ts), ts)
    ds.NumberOfFrames = 4  # the Basic Offset Table lists 3
    assert "Basic Offset Table lists 3 frame(s) but Number of Frames is 4" in refusal(encoded(ds, tmp_path, ts), ts)


def test_a_basic_offset_table_pointing_past_the_fragments_is_refused(tmp_path: Path) -> None:
    ds, frames = _frames(3, JPEG2000Lossless)
    full = encapsulate(frames, has_bot=True)
    # drop the last frame's fragment but keep the table (and the sequence delimiter)
    last = full.rfind(b"\xfe\xff\x00\xe0")
    ds.PixelData = full[:last]
    assert "points at data the fragments do not hold" in refusal(
        encoded(ds, tmp_path, JPEG2000Lossless), JPEG2000Lossless
    )


def test_frames_spanning_fragments_without_a_table_are_delimited_by_end_of_image(tmp_path: Path) -> None:
    ds, frames = _frames(3, JPEG2000Lossless)
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)  # 6 fragments, 3 frames
    parse_index_fields(encoded(ds, tmp_path, JPEG2000Lossless), JPEG2000Lossless)
    ds.PixelData = encapsulate(frames[:2] + [frames[2][:-200]], fragments_per_frame=2, has_bot=False)
    assert "holds 2 complete frame(s) of 3" in refusal(encoded(ds, tmp_path, JPEG2000Lossless), JPEG2000Lossless)


def test_extended_offset_table_counts_too(tmp_path: Path) -> None:
    ds, frames = _frames(3, JPEG2000Lossless)
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    parse_index_fields(encoded(ds, tmp_path, JPEG2000Lossless), JPEG2000Lossless)
    ds.NumberOfFrames = 2
    assert "Extended Offset Table lists 3" in refusal(encoded(ds, tmp_path, JPEG2000Lossless), JPEG2000Lossless)


def test_native_pixel_data_under_a_compressed_syntax_is_refused(tmp_path: Path) -> None:
    ds = ct()
    stream = encoded(ds, tmp_path, ExplicitVRLittleEndian)
    assert "not encapsulated" in refusal(stream, RLELossless)
    rle, frames = _frames(1, RLELossless)
    rle.PixelData = encapsulate(frames)
    assert "is encapsulated" in refusal(encoded(rle, tmp_path, RLELossless), ExplicitVRLittleEndian)


def test_no_pixel_data_needs_no_image_attributes(tmp_path: Path) -> None:
    ds = ct()
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        delattr(ds, keyword)
    assert parse_index_fields(encoded(ds, tmp_path), ExplicitVRLittleEndian).modality == "CT"


def test_the_nodes_own_results_pass(tmp_path: Path) -> None:
    """SEG (1-bit frames and fractional), SC heatmaps and SR come back to the node from the PACS: all pass."""
    from node.config import ResultsSettings
    from node.results import write_results
    from tests.test_results import MODEL, ct_result

    sources = make_ct_series(10, 48, 48)
    settings = ResultsSettings(heatmap_slices=3, fractional_anomaly_seg=True, fractional_uncertainty_seg=True)
    objects = write_results(ct_result(sources), sources, "job-1", settings, MODEL)
    assert {o.kind for o in objects} == {"seg", "seg-anomaly", "seg-uncertainty", "sc", "sr"}
    for obj in objects:
        ts = str(obj.dataset.file_meta.TransferSyntaxUID)
        assert parse_index_fields(encoded(obj.dataset, tmp_path, ts), ts).manufacturer == "edgenode", obj.kind
