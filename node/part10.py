"""The Part 10 header the listener writes before each received data set: the preamble, "DICM" and the File Meta
Information (PS3.10 7.1), encoded directly.

The same bytes as pynetdicom's `Event.file_meta` encoded with `encode_file_meta` (tests/test_part10.py compares
them), without building, validating and writing a pydicom data set for every image (a quarter of a millisecond
each, on the path every C-STORE waits on).
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\0" * 128 + b"DICM"
LONG_VRS = frozenset({b"OB"})  # of the File Meta Information's VRs, the one with a 4-byte length


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian."""
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("latin-1")  # pydicom's default for these VRs; a UID or version name is ASCII anyway
    return raw + pad if len(raw) % 2 else raw


_IMPLEMENTATION = _element(0x0012, b"UI", _padded(str(PYNETDICOM_IMPLEMENTATION_UID), b"\0")) + _element(
    0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")
)


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, prefix and File Meta Information for a data set received with these UIDs."""
    body = (
        _element(0x0001, b"OB", b"\x00\x01")
        + _element(0x0002, b"UI", _padded(sop_class_uid, b"\0"))
        + _element(0x0003, b"UI", _padded(sop_instance_uid, b"\0"))
        + _element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\0"))
        + _IMPLEMENTATION
    )
    return PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body
