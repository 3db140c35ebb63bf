"""The listener's own encoding of a plain C-STORE-RSP (node/association_io.py) is byte for byte pynetdicom's."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from node.association_io import store_response_pdv


@pytest.mark.parametrize(
    ("message_id", "sop_class", "sop_instance", "status"),
    [
        (1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0x0000),  # even and odd UID lengths
        (65535, "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", 0xB000),
        (7, "1.2.840.10008.5.1.4.1.1.88.34", "1." + "2" * 62, 0x0000),
    ],
)
def test_store_response_is_pynetdicoms(message_id: int, sop_class: str, sop_instance: str, status: int) -> None:
    rsp = C_STORE()  # as pynetdicom's StorageServiceClass.SCP builds it
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 1 << 20))
    (expected,) = pdata.presentation_data_value_list
    assert store_response_pdv(message_id, sop_class, sop_instance, status) == expected[1]
