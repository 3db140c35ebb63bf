"""The listener's own C-STORE path (node/direct_store.py): its encodings are pynetdicom's, and real associations
that split, mix and break P-DATA PDUs get what pynetdicom's path gives them."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext
from sqlalchemy import select

from db.models import AuditEvent
from node.app import EdgeNode
from node.direct_store import (
    COMMAND,
    LAST_FRAGMENT,
    AcceptedTransferSyntaxes,
    DirectStore,
    InvalidCommandSet,
    StoreRequest,
    read_command_set,
    store_request,
    store_response_pdv,
)
from node.scp import StorageSCP
from tests.dicomgen import make_ct_series
from tests.ingest_support import SENDER_AE, dataset_bytes, node_settings, running_node

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"


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


def test_store_response_with_an_error_comment_is_pynetdicoms() -> None:
    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = 3
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.AffectedSOPClassUID = CT
    rsp.Status = 0xA900
    rsp.ErrorComment = "SOP Class UID differs from the C-STORE request"  # odd length: padded
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 1 << 20))
    (expected,) = pdata.presentation_data_value_list
    assert store_response_pdv(3, CT, "1.2.3.4", 0xA900, rsp.ErrorComment) == expected[1]


def _command_set(primitive: C_STORE | C_ECHO) -> bytes:
    """A request's command set as pynetdicom encodes it (the first PDV's fragment, without its control header)."""
    message = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    message.primitive_to_message(primitive)
    first = next(iter(message.encode_msg(1, 1 << 20)))
    return bytes(first.presentation_data_value_list[0][1][1:])


def _store_primitive(sop_class: str, sop_instance: str, message_id: int = 1) -> C_STORE:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 1
    request.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")  # any: only the command set is used
    return request


def test_a_c_store_command_set_is_read_as_pynetdicom_writes_it() -> None:
    elements = read_command_set(_command_set(_store_primitive(CT, "1.2.3.45", message_id=9)))
    request = store_request(elements, 5, {5: EXPLICIT})
    assert request == StoreRequest(9, CT, "1.2.3.45", 1, 5, EXPLICIT)
    assert store_request(elements, 7, {5: EXPLICIT}) is None  # a context not accepted: pynetdicom's to refuse
    assert store_request(elements, 5, {}) is None
    echo = C_ECHO()
    echo.MessageID = 2
    echo.AffectedSOPClassUID = VERIFICATION
    assert store_request(read_command_set(_command_set(echo)), 5, {5: EXPLICIT}) is None
    verification_store = read_command_set(_command_set(_store_primitive(VERIFICATION, "1.2.3")))
    assert store_request(verification_store, 5, {5: EXPLICIT}) is None  # not a storage SOP class
    with pytest.raises(InvalidCommandSet):
        read_command_set(_command_set(_store_primitive(CT, "1.2.3"))[:-3])


def test_accepted_transfer_syntaxes_read_pynetdicoms_accepted_contexts() -> None:
    accepted = {}
    for context_id, transfer in ((1, EXPLICIT), (3, "1.2.840.10008.1.2")):
        context = PresentationContext()
        context.context_id = context_id
        context.abstract_syntax = CT
        context.transfer_syntax = [transfer]
        accepted[context_id] = context
    syntaxes = AcceptedTransferSyntaxes(accepted)
    assert syntaxes.get(3) == "1.2.840.10008.1.2" and syntaxes.get(5) is None and 5 not in syntaxes
    assert dict(syntaxes) == {1: EXPLICIT, 3: "1.2.840.10008.1.2"} and len(syntaxes) == 2
    elements = read_command_set(_command_set(_store_primitive(CT, "1.2.3.45")))
    assert store_request(elements, 1, syntaxes) == StoreRequest(1, CT, "1.2.3.45", 1, 1, EXPLICIT)
    assert store_request(elements, 5, syntaxes) is None


# --- a raw DICOM client: PDUs split, mixed and broken as no library sends them -------------------------------


class RawAssociation:
    """An association over a plain socket; P-DATA PDUs written and read as bytes (PS3.8 9.3)."""

    def __init__(self, port: int, contexts: dict[int, tuple[str, str]]) -> None:
        request = A_ASSOCIATE()
        request.application_context_name = "1.2.840.10008.3.1.1.1"
        request.calling_ae_title = SENDER_AE
        request.called_ae_title = "EDGENODE"
        proposed = []
        for context_id, (abstract, transfer) in contexts.items():
            context = PresentationContext()
            context.context_id = context_id
            context.abstract_syntax = abstract
            context.transfer_syntax = [transfer]
            proposed.append(context)
        request.presentation_context_definition_list = proposed
        length = MaximumLengthNotification()
        length.maximum_length_received = 0
        request.user_information = [length]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(request)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(pdu.encode())
        kind, body = self.read_pdu()
        assert kind == 0x02, f"association not accepted (PDU type 0x{kind:02X})"
        accepted = A_ASSOCIATE_AC()
        accepted.decode(bytes((kind, 0)) + struct.pack(">L", len(body)) + body)
        assert all(item.result == 0 for item in accepted.to_primitive().presentation_context_definition_results_list)

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._read(6)
        return header[0], self._read(struct.unpack(">L", header[2:])[0])

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed by the node")
            data += chunk
        return data

    def send_pdu(self, *pdvs: tuple[int, int, bytes]) -> None:
        """One P-DATA-TF PDU of (context id, message control header, fragment) values."""
        items = b"".join(struct.pack(">LBB", len(value) + 2, cx, control) + value for cx, control, value in pdvs)
        self.sock.sendall(b"\x04\x00" + struct.pack(">L", len(items)) + items)

    def response(self) -> Dataset:
        """The next response's command set (one PDU holding it whole, as the node sends)."""
        kind, body = self.read_pdu()
        assert kind == 0x04, f"PDU type 0x{kind:02X} where a response was due"
        return decode(BytesIO(body[6:]), True, True)

    def release(self) -> None:
        self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        assert self.read_pdu()[0] == 0x06
        self.sock.close()


def _fragments(data: bytes, size: int) -> list[bytes]:
    return [data[k : k + size] for k in range(0, len(data), size)]


def _send_whole_store(raw: RawAssociation, ds: Dataset) -> None:
    """A CT C-STORE-RQ and its whole data set in one P-DATA-TF PDU on context 1."""
    command = _command_set(_store_primitive(CT, ds.SOPInstanceUID))
    raw.send_pdu((1, COMMAND | LAST_FRAGMENT, command), (1, LAST_FRAGMENT, _encoded(ds)))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[EdgeNode]:
    with running_node(node_settings(tmp_path / "var")) as running:
        yield running


@pytest.fixture
def slices() -> list[Dataset]:
    return make_ct_series(3, 32, 32)


def _stored(node: EdgeNode, sop: str) -> bytes | None:
    copy = node.scp.index.stored_copy(sop)
    return None if copy is None else dataset_bytes(node.spool.path(copy.path))


def _encoded(ds: Dataset) -> bytes:
    return encode(ds, False, True)  # Explicit VR Little Endian, as the context below


def test_stores_whose_pdus_split_and_join_messages_as_no_library_does(node: EdgeNode, slices: list[Dataset]) -> None:
    raw = RawAssociation(node.port, {1: (CT, EXPLICIT), 3: (VERIFICATION, EXPLICIT)})
    first, second, third = slices
    # Command and whole data set in one PDU.
    command = _command_set(_store_primitive(CT, first.SOPInstanceUID, 1))
    raw.send_pdu((1, COMMAND | LAST_FRAGMENT, command), (1, LAST_FRAGMENT, _encoded(first)))
    response = raw.response()
    assert (response.MessageIDBeingRespondedTo, response.Status) == (1, 0)
    # The command in three fragments over two PDUs, the last with the data set's first fragment; the data set in
    # 100-byte fragments, a few per PDU.
    command = _command_set(_store_primitive(CT, second.SOPInstanceUID, 2))
    parts, data = _fragments(command, 40), _fragments(_encoded(second), 100)
    raw.send_pdu((1, COMMAND, parts[0]))
    raw.send_pdu(
        *[(1, COMMAND, part) for part in parts[1:-1]], (1, COMMAND | LAST_FRAGMENT, parts[-1]), (1, 0, data[0])
    )
    for k in range(1, len(data), 5):
        raw.send_pdu(
            *[(1, LAST_FRAGMENT if n == len(data) - 1 else 0, data[n]) for n in range(k, min(k + 5, len(data)))]
        )
    response = raw.response()
    assert (response.MessageIDBeingRespondedTo, response.Status) == (2, 0)
    # A C-ECHO (pynetdicom's path) between stores, then a store that is answered with a failure and its comment.
    echo = C_ECHO()
    echo.MessageID = 3
    echo.AffectedSOPClassUID = VERIFICATION
    raw.send_pdu((3, COMMAND | LAST_FRAGMENT, _command_set(echo)))
    assert raw.response().Status == 0
    command = _command_set(_store_primitive("1.2.840.10008.5.1.4.1.1.4", third.SOPInstanceUID, 4))  # MR, not CT
    raw.send_pdu((1, COMMAND | LAST_FRAGMENT, command), (1, LAST_FRAGMENT, _encoded(third)))
    refused = raw.response()
    assert (refused.Status, refused.ErrorComment) == (0xA900, "SOP Class UID differs from the C-STORE request")
    raw.release()
    assert _stored(node, first.SOPInstanceUID) == _encoded(first)
    assert _stored(node, second.SOPInstanceUID) == _encoded(second)
    assert _stored(node, third.SOPInstanceUID) is None


@pytest.mark.parametrize("fault", ["data on another context", "a command inside the data set", "an item too long"])
def test_a_broken_c_store_aborts_the_association_and_stores_nothing(
    node: EdgeNode, slices: list[Dataset], fault: str
) -> None:
    raw = RawAssociation(node.port, {1: (CT, EXPLICIT), 3: (VERIFICATION, EXPLICIT)})
    ds = slices[0]
    data = _fragments(_encoded(ds), 1000)
    raw.send_pdu((1, COMMAND | LAST_FRAGMENT, _command_set(_store_primitive(CT, ds.SOPInstanceUID))), (1, 0, data[0]))
    if fault == "an item too long":
        items = struct.pack(">LBB", len(data[1]) + 20, 1, LAST_FRAGMENT) + data[1]
        raw.sock.sendall(b"\x04\x00" + struct.pack(">L", len(items)) + items)
    else:
        control = COMMAND if fault == "a command inside the data set" else 0
        raw.send_pdu((3 if fault == "data on another context" else 1, control, data[1]))
    assert raw.read_pdu()[0] == 0x07  # A-ABORT
    raw.sock.close()
    assert _stored(node, ds.SOPInstanceUID) is None


def test_a_first_request_that_comes_before_the_accept_is_done_waits_for_it(
    tmp_path: Path, slices: list[Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom finishes accepting (EVT_ACCEPTED handlers: the node's audit event) after the A-ASSOCIATE-AC went
    out; a sender's first store can arrive before. It is answered, and recorded after the accept."""
    accept = StorageSCP._on_accepted

    def slow_accept(scp: StorageSCP, event: object) -> None:
        time.sleep(0.5)  # an audit write waiting on a busy database
        accept(scp, event)  # type: ignore[arg-type]

    monkeypatch.setattr(StorageSCP, "_on_accepted", slow_accept)
    with running_node(node_settings(tmp_path / "var")) as node:
        raw = RawAssociation(node.port, {1: (CT, EXPLICIT)})
        ds = slices[0]
        _send_whole_store(raw, ds)
        assert raw.response().Status == 0
        raw.release()
        with node.db.session() as session:
            kinds = session.scalars(select(AuditEvent.event_type).order_by(AuditEvent.id)).all()
        assert kinds.index("association.accepted") < kinds.index("instance.stored")


def test_a_store_completing_while_the_node_aborts_its_association_does_not_hold_the_abort(
    tmp_path: Path, slices: list[Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's stop aborts the associations still open: pynetdicom's `kill` marks an association not established,
    then waits for its DUL thread to take the A-ABORT. A data set whose last fragment that thread read just before
    must not be waited on (for an establishment that never comes): the abort returns, the sender is cut off
    and nothing of the unanswered store is kept. Seen under load as a stop that never returned; made certain here by
    holding the store until the abort has begun."""
    store = DirectStore._store
    arrived, aborting = threading.Event(), threading.Event()

    def store_after_the_abort_began(direct: DirectStore, request: StoreRequest) -> None:
        arrived.set()
        assert aborting.wait(10)
        deadline = time.monotonic() + 10
        while direct.assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.001)
        store(direct, request)

    monkeypatch.setattr(DirectStore, "_store", store_after_the_abort_began)
    with running_node(node_settings(tmp_path / "var")) as node:
        raw = RawAssociation(node.port, {1: (CT, EXPLICIT)})
        ds = slices[0]
        _send_whole_store(raw, ds)
        assert arrived.wait(10)
        (assoc,) = [a for a in node.scp.ae.active_associations if a.is_acceptor]
        abort = threading.Thread(target=assoc.abort, daemon=True)
        abort.start()
        aborting.set()
        abort.join(15)
        assert not abort.is_alive(), "the abort waits on the DUL thread, which waits on the association"
        try:
            ended_by = raw.read_pdu()[0]
        except ConnectionError:  # pynetdicom's reactor may close the transport before its A-ABORT goes out
            ended_by = None
        assert ended_by in (0x07, None)  # an A-ABORT, or the connection closed: no answer to the store
        raw.sock.close()
        assert _stored(node, ds.SOPInstanceUID) is None
