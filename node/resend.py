"""A SOP Instance UID arriving again: the same bytes (an idempotent resend) or different content (a conflict)?

Only resends pay for this: the first copy's data set is read back from its spool file and hashed
beside the new one, so the store path for new instances hashes nothing extra. Hashes are SHA-256 of
the data set as received (without the File Meta Information the node adds), so they do not depend on
the node's own meta or on who sent the copy.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

META_GROUP_LENGTH = struct.pack("<HH2sH", 0x0002, 0x0000, b"UL", 4)  # (0002,0000) UL, first after 'DICM'
PREAMBLE_AND_PREFIX = 132  # 128-byte preamble + b"DICM"


@dataclass(frozen=True)
class Resend:
    """How a resend compares with the stored first copy."""

    identical: bool | None  # None: not comparable (other transfer syntax, or the first copy unreadable)
    first_sha256: str  # "" when the first copy could not be read
    this_sha256: str
    note: str  # why not comparable, for the audit detail


def data_set_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 file the spool wrote (preamble, 'DICM', meta with its group length)."""
    head = part10[PREAMBLE_AND_PREFIX : PREAMBLE_AND_PREFIX + 12]
    if part10[128:132] != b"DICM" or head[:8] != META_GROUP_LENGTH:
        raise ValueError("not a Part 10 file with a File Meta group length")
    (group_length,) = struct.unpack_from("<L", head, 8)
    return part10[PREAMBLE_AND_PREFIX + 12 + group_length :]


def compare_resend(first_path: Path, first_syntax: str, stream: bytes, syntax: str) -> Resend:
    """Compare a received data set (`stream` in `syntax`) with the stored first copy of the same instance."""
    this = hashlib.sha256(stream).hexdigest()
    try:
        first = hashlib.sha256(data_set_bytes(first_path.read_bytes())).hexdigest()
    except (OSError, ValueError) as exc:
        return Resend(None, "", this, f"first copy unreadable ({type(exc).__name__}); not compared")
    if first_syntax != syntax:  # the same image re-encoded is different bytes: a hash cannot tell
        return Resend(None, first, this, f"first copy in transfer syntax {first_syntax}, this one in {syntax}")
    return Resend(first == this, first, this, "")
