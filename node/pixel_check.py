"""Does the Pixel Data hold what the image header claims? Checked before a C-STORE is acknowledged.

An instance whose pixel data is shorter than Rows x Columns x ... (or encapsulated with fewer frames
than Number of Frames) cannot be analysed, and once acknowledged it would block its SOP Instance UID:
a later good copy is a duplicate. So it is refused at the door. The check reads only the Image Pixel
attributes and the pixel data element's length (for encapsulated data: the item headers, through
pydicom's encaps helpers); no pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from struct import unpack, unpack_from
from types import SimpleNamespace

from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, RLELossless

PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
EOI_MARKER = b"\xff\xd9"  # end of a JPEG / JPEG-LS / JPEG 2000 codestream: the last bytes of each frame
US_ATTRIBUTES = {0x00280010: "Rows", 0x00280011: "Columns", 0x00280002: "SamplesPerPixel", 0x00280100: "BitsAllocated"}
NUMBER_OF_FRAMES, PHOTOMETRIC, EXTENDED_OFFSET_TABLE = 0x00280008, 0x00280004, 0x7FE00001
# The top-level elements the framing walk notes the position of (group 0028 and 7FE0 only: the walk stays cheap)
HEADER_TAGS = frozenset({*US_ATTRIBUTES, NUMBER_OF_FRAMES, PHOTOMETRIC, EXTENDED_OFFSET_TABLE})


class PixelDataMismatch(ValueError):
    """The pixel data does not match the image attributes; the message says how (no patient data)."""


@dataclass(frozen=True)
class PixelElement:
    """Where the top-level pixel data element's value lies in the received stream."""

    tag: int  # (7FE0,0010), or (7FE0,0008)/(7FE0,0009) float pixel data
    value_offset: int  # first byte of the value (for encapsulated data: the Basic Offset Table item)
    length: int  # value length; UNDEFINED_LENGTH for encapsulated data


def check_pixel_data(
    stream: bytes, element: PixelElement, header: dict[int, tuple[int, int]], little: bool, transfer_syntax: UID
) -> None:
    """Raise PixelDataMismatch unless the pixel data has the size (native) or frames (encapsulated) claimed.

    `header` maps the HEADER_TAGS present at the top level to (value offset, value length) in `stream`:
    their values are read straight from the bytes, which costs microseconds where a pydicom Dataset
    lookup per attribute costs tens.
    """
    image = _image_pixel(stream, header, "<" if little else ">")
    encapsulated = element.length == UNDEFINED_LENGTH
    if transfer_syntax.is_encapsulated and element.tag == PIXEL_DATA:
        if not encapsulated:
            raise PixelDataMismatch(f"Pixel Data is not encapsulated but the transfer syntax is {transfer_syntax.name}")
        _check_frames(stream, element.value_offset, header, image.NumberOfFrames, transfer_syntax)
    elif encapsulated:
        raise PixelDataMismatch(f"Pixel Data is encapsulated but the transfer syntax is {transfer_syntax.name}")
    else:
        _check_native_length(element.length, image)


def _image_pixel(stream: bytes, header: dict[int, tuple[int, int]], order: str) -> SimpleNamespace:
    """The Image Pixel attributes the size depends on, named as pydicom names them."""
    values: dict[str, object] = {}
    missing = []
    for tag, name in US_ATTRIBUTES.items():
        where = header.get(tag)
        if where is None or where[1] == 0:
            missing.append(name)
        elif where[1] != 2:
            raise PixelDataMismatch(f"{name} is {where[1]} bytes long, not one US value")
        else:
            (values[name],) = unpack_from(order + "H", stream, where[0])
    photometric = _text(stream, header.get(PHOTOMETRIC))
    if not photometric:
        missing.append("PhotometricInterpretation")
    if missing:
        raise PixelDataMismatch(f"Pixel Data present but {', '.join(missing)} missing (Image Pixel module)")
    frames_text = _text(stream, header.get(NUMBER_OF_FRAMES))
    try:
        frames = int(frames_text) if frames_text else 1
    except ValueError:
        raise PixelDataMismatch(f"Number of Frames {frames_text[:16]!r} is not a number") from None
    if frames < 1:
        raise PixelDataMismatch(f"Number of Frames is {frames}")
    return SimpleNamespace(**values, PhotometricInterpretation=photometric, NumberOfFrames=frames)


def _text(stream: bytes, where: tuple[int, int] | None) -> str:
    if where is None:
        return ""
    return stream[where[0] : where[0] + min(where[1], 64)].decode("ascii", "replace").strip(" \0")


def _check_native_length(length: int, image: SimpleNamespace) -> None:
    bits = image.BitsAllocated
    if bits != 1 and (bits <= 0 or bits % 8):
        raise PixelDataMismatch(f"Bits Allocated {bits} is neither 1 nor a multiple of 8")
    # pydicom's own rule (it reads only these attributes): 1-bit pixels packed across frames and rounded up
    # to whole bytes; YBR_FULL_422 two thirds of the full size
    expected = get_expected_length(image, unit="bytes")  # type: ignore[arg-type]
    if length == expected or (expected % 2 and length == expected + 1):  # one pad byte to even length
        return
    raise PixelDataMismatch(
        f"Pixel Data is {length} bytes; {image.Rows} rows x {image.Columns} columns x {image.SamplesPerPixel}"
        f" samples x {bits} bits x {image.NumberOfFrames} frame(s) ({image.PhotometricInterpretation}) need {expected}"
    )


def _check_frames(
    stream: bytes, value_offset: int, header: dict[int, tuple[int, int]], frames: int, transfer_syntax: UID
) -> None:
    """Count the frames the fragments hold the way PS3.5 A.4 (and pydicom's frame generator) delimit them."""
    buffer = BytesIO(stream)  # shares the bytes; the helpers read item headers at the given positions
    buffer.seek(value_offset)
    try:
        basic_offsets = parse_basic_offsets(buffer)
        nr_fragments, positions = parse_fragments(buffer)
    except ValueError as exc:
        raise PixelDataMismatch(f"encapsulated Pixel Data is malformed: {exc}") from exc
    if nr_fragments == 0:
        raise PixelDataMismatch("encapsulated Pixel Data has no fragments")
    first = positions[0]
    starts = {p - first for p in positions}  # offsets tables count from the first fragment's item tag
    extended = header.get(EXTENDED_OFFSET_TABLE)
    if extended is not None:
        raw = stream[extended[0] : extended[0] + extended[1]]
        offsets = list(unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))
        _same_count("Extended Offset Table", len(offsets), frames)
        _all_fragment_starts("Extended Offset Table", offsets, starts)
    elif basic_offsets:
        _same_count("Basic Offset Table", len(basic_offsets), frames)
        _all_fragment_starts("Basic Offset Table", basic_offsets, starts)
    elif transfer_syntax == RLELossless:  # PS3.5 A.4.2: each RLE frame is exactly one fragment
        if nr_fragments != frames:
            raise PixelDataMismatch(f"RLE Pixel Data has {nr_fragments} fragment(s) for {frames} frame(s)")
    elif nr_fragments < frames:  # a frame is at least one fragment
        raise PixelDataMismatch(f"encapsulated Pixel Data has {nr_fragments} fragment(s) for {frames} frame(s)")
    elif nr_fragments > frames > 1:  # frames spanning fragments, no offset table: each frame ends in EOI/EOC
        ends = sum(1 for p in positions if EOI_MARKER in _fragment_tail(stream, p))
        if ends < frames:
            raise PixelDataMismatch(f"encapsulated Pixel Data holds {ends} complete frame(s) of {frames}")


def _same_count(table: str, entries: int, frames: int) -> None:
    if entries != frames:
        raise PixelDataMismatch(f"{table} lists {entries} frame(s) but Number of Frames is {frames}")


def _all_fragment_starts(table: str, offsets: list[int], starts: set[int]) -> None:
    if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)) or not all(o in starts for o in offsets):
        raise PixelDataMismatch(f"{table} points at data the fragments do not hold (frames missing?)")


def _fragment_tail(stream: bytes, item_position: int) -> bytes:
    """The last bytes of one fragment (where pydicom looks for the end-of-image marker)."""
    (length,) = unpack_from("<L", stream, item_position + 4)
    end = item_position + 8 + length
    return stream[max(item_position + 8, end - 10) : end]
