"""The listener's Part 10 header (node/part10.py) is byte for byte what pynetdicom and pydicom would write."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from node.part10 import part10_header


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", ExplicitVRLittleEndian),  # even and odd lengths
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", ImplicitVRLittleEndian),
        (
            "1.2.840.10008.5.1.4.1.1.66.4",
            "1.2.826.0.1.3680043.8.498.58435788208496103570932843075096646687",
            JPEG2000Lossless,
        ),
        ("1.2.840.10008.5.1.4.1.1.88.34", "1." + "2" * 62, ExplicitVRLittleEndian),  # 64 characters
    ],
)
def test_header_equals_pynetdicoms_file_meta(sop_class: str, sop_instance: str, syntax: str) -> None:
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    assert part10_header(sop_class, sop_instance, syntax) == expected
    read = dcmread(DicomBytesIO(expected + b""), force=True).file_meta
    assert (read.MediaStorageSOPInstanceUID, read.TransferSyntaxUID) == (sop_instance, syntax)
