"""Check and index a received C-STORE data set without decoding pixel data.

Two cheap steps decide whether the bytes are worth keeping:
1. `check_framing` walks the top-level elements (and undefined-length sequences/fragments) to prove
   the stream is complete: pydicom itself silently accepts a truncated last element.
2. `parse_index_fields` reads only the attributes the database indexes, stopping before pixel data,
   and checks the pixel data's length or frames against the image attributes (node/pixel_check.py).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.pixel_check import HEADER_TAGS, PixelDataMismatch, PixelElement, check_pixel_data

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # (float/double float) pixel data
ROWS_TAG = 0x00280010
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
OWN_MANUFACTURER = "edgenode"  # Manufacturer the node writes into its results

INDEX_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "Manufacturer",
    "RequestedProcedurePriority",
    "RequestAttributesSequence",
)


class InvalidDataSet(ValueError):
    """The data set cannot be stored. `status` is the C-STORE failure status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


STATUS_CANNOT_UNDERSTAND = 0xC210  # PS3.4 B.2.3 "Error: Cannot understand" (0xCxxx): undecodable stream
STATUS_DOES_NOT_MATCH = 0xA900  # PS3.4 B.2.3 "Error: Data Set does not match SOP Class": UIDs missing/mismatch


@dataclass(frozen=True)
class Framing:
    pixel_offset: int  # offset of the pixel data element, or the stream length when there is none
    has_pixels: bool
    has_rows: bool
    pixel: PixelElement | None = None  # the pixel data element's value position and length
    header: dict[int, tuple[int, int]] = field(default_factory=dict)  # HEADER_TAGS -> (value offset, length)


def inflate(stream: bytes) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set; a cut-off stream is an error."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(stream) + inflater.flush()
    except zlib.error as exc:
        raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, f"deflated data set does not inflate: {exc}") from exc
    if not inflater.eof:
        raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, "deflated data set is truncated")
    return data


def check_framing(stream: bytes, implicit: bool, little: bool) -> Framing:
    """Walk the data set's elements; raise InvalidDataSet unless every element is complete."""
    walker = _Walker(stream, implicit, little)
    try:
        walker.elements(0, len(stream), stop=None, top=True)
    except struct.error as exc:
        raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, f"data set is truncated: {exc}") from exc
    pixel_offset = walker.pixel_offset if walker.pixel_offset is not None else len(stream)
    return Framing(pixel_offset, walker.pixel_offset is not None, walker.has_rows, walker.pixel, walker.header)


class _Walker:
    def __init__(self, buf: bytes, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        self.order = "<" if little else ">"
        self.pixel_offset: int | None = None
        self.pixel: PixelElement | None = None
        self.header: dict[int, tuple[int, int]] = {}
        self.has_rows = False

    def _tag_length(self, pos: int) -> tuple[int, int]:
        group, element, length = struct.unpack_from(self.order + "HHL", self.buf, pos)
        return (group << 16) | element, length

    def elements(self, pos: int, end: int, stop: int | None, top: bool = False, implicit: bool | None = None) -> int:
        """Parse elements from pos; return the position after `stop` (a delimiter) or at `end`."""
        implicit = self.implicit if implicit is None else implicit
        order = self.order
        buf = self.buf
        while pos < end:
            group, element = struct.unpack_from(order + "HH", buf, pos)
            tag = (group << 16) | element
            if group == 0xFFFE:
                if tag == stop:
                    return pos + 8
                raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, f"unexpected delimiter ({group:04X},{element:04X})")
            if implicit:
                vr = b""
                (length,) = struct.unpack_from(order + "L", buf, pos + 4)
                pos += 8
            else:
                vr = buf[pos + 4 : pos + 6]
                if len(vr) < 2 or not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise InvalidDataSet(
                        STATUS_CANNOT_UNDERSTAND, f"invalid VR {vr!r} in ({group:04X},{element:04X}) at byte {pos}"
                    )
                if vr in LONG_VRS:
                    (length,) = struct.unpack_from(order + "L", buf, pos + 8)
                    pos += 12
                else:
                    (length,) = struct.unpack_from(order + "H", buf, pos + 6)
                    pos += 8
            if top:
                if tag in PIXEL_DATA_TAGS and self.pixel_offset is None:
                    self.pixel_offset = pos - (8 if implicit or vr not in LONG_VRS else 12)
                    self.pixel = PixelElement(tag, pos, length)
                self.has_rows = self.has_rows or tag == ROWS_TAG
                if (group == 0x0028 or group == 0x7FE0) and tag in HEADER_TAGS:
                    self.header[tag] = (pos, length)
            if length == UNDEFINED:
                if vr and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, f"undefined length on VR {vr.decode()}")
                pos = self.items(pos, end, implicit=implicit or vr == b"UN")
            else:
                pos += length
                if pos > end:
                    raise InvalidDataSet(
                        STATUS_CANNOT_UNDERSTAND,
                        f"data set is truncated: ({group:04X},{element:04X}) needs {pos - end} more bytes",
                    )
        if stop is not None:
            raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, "data set is truncated: a sequence is not closed")
        return pos

    def items(self, pos: int, end: int, implicit: bool) -> int:
        """Skip the items of an undefined-length sequence or encapsulated pixel data."""
        while True:
            if pos + 8 > end:
                raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, "data set is truncated inside a sequence")
            tag, length = self._tag_length(pos)
            pos += 8
            if tag == SEQUENCE_END:
                return pos
            if tag != ITEM:
                raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, f"expected an item tag, found {tag:08X}")
            if length == UNDEFINED:
                pos = self.elements(pos, end, stop=ITEM_END, implicit=implicit)
            else:
                pos += length
                if pos > end:
                    raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, "data set is truncated inside an item")


@dataclass(frozen=True)
class IndexFields:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    accession_number: str
    study_date: str
    study_description: str
    modality: str
    body_part: str
    series_description: str
    series_number: int | None
    instance_number: int | None
    manufacturer: str
    stat: bool


def parse_index_fields(stream: bytes, transfer_syntax: str) -> IndexFields:
    """Check the stream is complete and read the indexed attributes (never the pixel data)."""
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        stream = inflate(stream)
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    try:
        framing = check_framing(stream, implicit, little)
    except RecursionError:  # sequences nested hundreds deep: no real data set, and no reason to dig further
        raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, "sequences are nested too deeply") from None
    if framing.has_rows and not framing.has_pixels:
        raise InvalidDataSet(STATUS_DOES_NOT_MATCH, "image attributes present but no Pixel Data (truncated?)")
    try:
        ds = read_dataset(BytesIO(stream), implicit, little, bytelength=framing.pixel_offset)
        fields = _extract(ds)
        if framing.pixel is not None:
            check_pixel_data(stream, framing.pixel, framing.header, little, ts)
    except PixelDataMismatch as exc:
        raise InvalidDataSet(STATUS_DOES_NOT_MATCH, str(exc)) from None
    except InvalidDataSet:
        raise
    except Exception as exc:  # pydicom raises many types on malformed values
        raise InvalidDataSet(STATUS_CANNOT_UNDERSTAND, f"cannot decode attributes: {exc}") from exc
    for name in ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        value = getattr(fields, name)
        if not value:
            raise InvalidDataSet(STATUS_DOES_NOT_MATCH, f"required attribute {name} is missing or empty")
        if len(value) > 64:
            raise InvalidDataSet(STATUS_DOES_NOT_MATCH, f"{name} is longer than 64 characters")
    return fields


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):  # multi-valued: first value
        value = next(iter(value), "")
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _extract(ds: Dataset) -> IndexFields:
    priorities = {_text(ds, "RequestedProcedurePriority").upper()}
    for item in ds.get("RequestAttributesSequence") or []:
        priorities.add(_text(item, "RequestedProcedurePriority").upper())
    return IndexFields(
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription"),
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        manufacturer=_text(ds, "Manufacturer"),
        stat="STAT" in priorities,
    )
