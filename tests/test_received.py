"""The listener reads the indexed attributes straight from the received bytes (node/received.py `_read_directly`);
what it reads must be what pydicom reads (`_extract` of pydicom's data set), value for value, for the encodings,
character sets and odd values senders use; where it cannot (other character sets, a request attributes
sequence), pydicom reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO

import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.received import _extract, _read_directly, check_framing, inflate, parse_index_fields
from tests.dicomgen import make_ct_series, make_dx


@contextmanager
def lenient_writing() -> Iterator[None]:
    """Let pydicom write the odd values a sender might send (it would refuse some itself)."""
    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = before


def encode(ds: Dataset, syntax: str) -> bytes:
    """The data set as a sender puts it in its C-STORE (no File Meta Information)."""
    buffer = DicomBytesIO()
    uid = UID(syntax)
    buffer.is_little_endian = uid.is_little_endian
    buffer.is_implicit_VR = uid.is_implicit_VR
    with lenient_writing():
        write_dataset(buffer, ds)
    data = buffer.getvalue()
    if uid == DeflatedExplicitVRLittleEndian:
        import zlib

        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return data


def by_pydicom(stream: bytes, syntax: str):  # type: ignore[no-untyped-def]
    uid = UID(syntax)
    if uid == DeflatedExplicitVRLittleEndian:
        stream = inflate(stream)
    framing = check_framing(stream, uid.is_implicit_VR, uid.is_little_endian)
    return _extract(read_dataset(BytesIO(stream), uid.is_implicit_VR, uid.is_little_endian, framing.pixel_offset))


def directly(stream: bytes, syntax: str):  # type: ignore[no-untyped-def]
    uid = UID(syntax)
    if uid == DeflatedExplicitVRLittleEndian:
        stream = inflate(stream)
    framing = check_framing(stream, uid.is_implicit_VR, uid.is_little_endian)
    return _read_directly(stream, framing.index)


def ct() -> Dataset:
    return make_ct_series(1, 16, 16, patient_id="PAT-1", accession="ACC-1")[0]


def change(**values: object) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return apply


def raw(**values: bytes) -> Callable[[Dataset], None]:
    """Values as bytes, written as they are (pydicom would not take them as values)."""

    def apply(ds: Dataset) -> None:
        for keyword, value in values.items():
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)

    return apply


CASES: dict[str, Callable[[Dataset], None]] = {
    "as generated": change(),
    "utf-8 descriptions": change(
        SpecificCharacterSet="ISO_IR 192", StudyDescription="Thorax ünd Lunge 胸部", SeriesDescription="Ædema"
    ),
    "latin-1 descriptions": change(SpecificCharacterSet="ISO_IR 100", StudyDescription="Tête à l'épaule"),
    "no character set": change(SpecificCharacterSet=None, PatientID="P\xe9-9"),
    "ascii named": change(SpecificCharacterSet="ISO_IR 6"),
    "several values": change(PatientID=["ID-A", "ID-B"], StudyDescription=["first", "second"], Modality=["CT", "PT"]),
    "padded and lower case": change(Modality="ct", BodyPartExamined="chest ", Manufacturer=" edgenode  "),
    "decimal numbers": change(SeriesNumber="1.5", InstanceNumber=" 12 "),
    "empty and missing": change(SeriesNumber="", AccessionNumber="", StudyDate=None, InstanceNumber=None),
    "not a number": raw(SeriesNumber=b"abc ", InstanceNumber=b"3\\4 "),
    "padding in UIDs": raw(SOPClassUID=b"1.2.840.10008.5.1.4.1.1.2\0", StudyDate=b"20240101"),
    "stat": change(RequestedProcedurePriority="stat"),
    "radiograph": lambda ds: None,
}


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
@pytest.mark.parametrize("case", list(CASES))
def test_read_directly_as_pydicom_reads(case: str, syntax: str) -> None:
    ds = make_dx(16, 16) if case == "radiograph" else ct()
    CASES[case](ds)
    stream = encode(ds, syntax)
    fast = directly(stream, syntax)
    assert fast is not None, "read by pydicom, not directly"
    assert fast == by_pydicom(stream, syntax)
    assert parse_index_fields(stream, syntax) == fast


@pytest.mark.parametrize(
    "case",
    [
        change(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientID="P-1"),  # code extensions
        change(SpecificCharacterSet="ISO_IR 144", StudyDescription="Грудь"),  # another character set
    ],
)
def test_other_character_sets_are_read_by_pydicom(case: Callable[[Dataset], None]) -> None:
    ds = ct()
    case(ds)
    stream = encode(ds, ExplicitVRLittleEndian)
    assert directly(stream, ExplicitVRLittleEndian) is None
    assert parse_index_fields(stream, ExplicitVRLittleEndian) == by_pydicom(stream, ExplicitVRLittleEndian)


def test_a_request_attributes_sequence_is_read_by_pydicom_and_its_priority_counts() -> None:
    ds = ct()
    item = Dataset()
    item.RequestedProcedurePriority = "STAT"
    ds.RequestAttributesSequence = [item]
    stream = encode(ds, ExplicitVRLittleEndian)
    assert directly(stream, ExplicitVRLittleEndian) is None
    fields = parse_index_fields(stream, ExplicitVRLittleEndian)
    assert fields.stat and fields == by_pydicom(stream, ExplicitVRLittleEndian)
