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


# The indexed attributes by tag, with their dictionary VR (what an implicit VR stream leaves unsaid).
INDEX_TAGS: dict[int, tuple[str, bytes]] = {
    0x00080005: ("SpecificCharacterSet", b"CS"),
    0x00080016: ("SOPClassUID", b"UI"),
    0x00080018: ("SOPInstanceUID", b"UI"),
    0x00080020: ("StudyDate", b"DA"),
    0x00080050: ("AccessionNumber", b"SH"),
    0x00080060: ("Modality", b"CS"),
    0x00080070: ("Manufacturer", b"LO"),
    0x00081030: ("StudyDescription", b"LO"),
    0x0008103E: ("SeriesDescription", b"LO"),
    0x00100020: ("PatientID", b"LO"),
    0x00180015: ("BodyPartExamined", b"CS"),
    0x0020000D: ("StudyInstanceUID", b"UI"),
    0x0020000E: ("SeriesInstanceUID", b"UI"),
    0x00200011: ("SeriesNumber", b"IS"),
    0x00200013: ("InstanceNumber", b"IS"),
    0x00400275: ("RequestAttributesSequence", b"SQ"),
    0x00401003: ("RequestedProcedurePriority", b"SH"),
}
TEXT_VRS = frozenset({b"SH", b"LO"})  # of INDEX_TAGS' VRs, those in the Specific Character Set
# Character sets read directly (pydicom's codec for each); any other goes through pydicom's decoding.
DIRECT_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


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
    # INDEX_TAGS before the pixel data -> (VR as encoded, b"" when implicit; value offset; value length)
    index: dict[int, tuple[bytes, int, int]] = field(default_factory=dict)


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
    return Framing(
        pixel_offset, walker.pixel_offset is not None, walker.has_rows, walker.pixel, walker.header, walker.index
    )


class _Walker:
    def __init__(self, buf: bytes, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        self.order = "<" if little else ">"
        self.pixel_offset: int | None = None
        self.pixel: PixelElement | None = None
        self.header: dict[int, tuple[int, int]] = {}
        self.index: dict[int, tuple[bytes, int, int]] = {}
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
                elif tag in INDEX_TAGS and self.pixel_offset is None:
                    self.index[tag] = (bytes(vr), pos, length)
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
        fields = _read_directly(stream, framing.index)
        if fields is None:  # another character set, a request attributes sequence, an unusual VR: pydicom reads
            fields = _extract(read_dataset(BytesIO(stream), implicit, little, bytelength=framing.pixel_offset))
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


def _read_directly(stream: bytes, found: dict[int, tuple[bytes, int, int]]) -> IndexFields | None:
    """The indexed attributes read straight from the bytes the walker located, as pydicom (`_extract`) reads
    them (tests/test_received.py compares the two); None where that takes more than this does: a Specific
    Character Set other than DIRECT_CHARSETS, a Request Attributes Sequence, a VR other than the dictionary's.

    pydicom, per element, builds a data element, converts and validates its value: a third of a millisecond for
    these attributes of an image, on the path every C-STORE waits on."""
    if any(vr and vr != INDEX_TAGS[tag][1] for tag, (vr, _, _) in found.items()) or 0x00400275 in found:
        return None
    charset = ""
    if 0x00080005 in found:
        _, position, length = found[0x00080005]
        charset = stream[position : position + length].decode("latin-1").strip("\0 ")
    codec = DIRECT_CHARSETS.get(charset)  # several values (code extensions) are not among them either
    if codec is None:
        return None
    text: dict[str, str] = {}
    for tag, (_, position, length) in found.items():
        keyword, vr = INDEX_TAGS[tag]
        raw = stream[position : position + length]
        if vr in TEXT_VRS:  # as pydicom: split, decode in the character set, strip the padding; then the first
            text[keyword] = raw.split(b"\\", 1)[0].decode(codec, "replace").rstrip("\0 ").strip()
        else:
            text[keyword] = _first_value(raw.decode("latin-1"), vr)

    def get(keyword: str) -> str:
        return text.get(keyword, "")

    return IndexFields(
        sop_class_uid=get("SOPClassUID"),
        sop_instance_uid=get("SOPInstanceUID"),
        study_instance_uid=get("StudyInstanceUID"),
        series_instance_uid=get("SeriesInstanceUID"),
        patient_id=get("PatientID"),
        accession_number=get("AccessionNumber"),
        study_date=get("StudyDate"),
        study_description=get("StudyDescription"),
        modality=get("Modality").upper(),
        body_part=get("BodyPartExamined").upper(),
        series_description=get("SeriesDescription"),
        series_number=_integer(text.get("SeriesNumber")),
        instance_number=_integer(text.get("InstanceNumber")),
        manufacturer=get("Manufacturer"),
        stat=get("RequestedProcedurePriority").upper() == "STAT",
    )


MULTIPLE = "\\"  # marks a multi-valued IS, which has no single number


def _first_value(value: str, vr: bytes) -> str:
    """A non-text value as pydicom reads it, then the first of several and stripped (as `_text`); for IS, the
    whole value (MULTIPLE-marked when there are several), as `_int` needs it."""
    if vr == b"UI" and value.endswith("\0"):
        value = value[:-1]
    if value.endswith(("\0", " ")):  # pydicom's MultiString drops one padding character
        value = value[:-1]
    first, *more = value.split("\\")
    if vr == b"IS":
        return MULTIPLE if more else first
    return first.strip()


def _integer(value: str | None) -> int | None:
    """An IS value as `_int` gets it from pydicom: an integer, a decimal truncated, else None."""
    if value is None or value == MULTIPLE or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        return None


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
