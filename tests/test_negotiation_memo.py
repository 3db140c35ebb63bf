"""Requests negotiated from memory (node/negotiation_memo.py) get what pynetdicom's own negotiation gives them:
the same request primitive, the same presentation context results and the same A-ASSOCIATE-AC bytes; real
senders are answered from memory from their second association on."""

from __future__ import annotations

import copy
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext
from pynetdicom.presentation import negotiate_as_acceptor as pynetdicom_negotiate

from node.app import EdgeNode
from node.negotiation_memo import (
    MAX_REMEMBERED_BYTES,
    MAX_VARIANTS,
    NegotiationMemo,
    Proposal,
    RememberedRequest,
    install,
    negotiate_as_acceptor,
)
from node.scp import build_ae
from tests.dicomgen import make_ct_series, write_datasets
from tests.ingest_support import SENDER_AE, node_settings, running_node

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def storescu_request(dcmtk: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The A-ASSOCIATE-RQ dcmtk's storescu sends (its 128 default presentation contexts), read off a socket."""
    folder = tmp_path_factory.mktemp("request")
    (image,) = write_datasets(make_ct_series(1, 16, 16), folder)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        sender = subprocess.Popen(
            [str(dcmtk["storescu"]), "-aet", SENDER_AE, "-aec", "EDGENODE", "127.0.0.1", str(port), str(image)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            server.settimeout(30)
            conn, _ = server.accept()
            with conn:
                data = b""
                while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
                    chunk = conn.recv(65536)
                    assert chunk, "storescu closed before its request was complete"
                    data += chunk
        finally:
            sender.kill()
            sender.wait()
    assert data[0] == 0x01
    return data


@pytest.fixture(scope="module")
def supported() -> list[PresentationContext]:
    return build_ae(node_settings(Path("/nonexistent"))).supported_contexts


def _primitive(encoded: bytes) -> A_ASSOCIATE:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(encoded)
    return pdu.to_primitive()


def _contexts(contexts: list[PresentationContext]) -> list[tuple[Any, ...]]:
    return [
        (cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax), cx.result, cx.as_scu, cx.as_scp)
        for cx in contexts
    ]


def _user_information(items: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(type(item).__name__, vars(item)) for item in items]


def test_a_remembered_request_is_decoded_once_and_gives_each_association_its_own_primitive(
    storescu_request: bytes,
) -> None:
    memo = NegotiationMemo()
    request = memo.request(storescu_request)
    assert memo.request(storescu_request) is request and memo.hits == 1
    first, second = request.to_primitive(), request.to_primitive()
    assert first is not second
    fresh = _primitive(storescu_request)
    for primitive in (first, second):
        assert (primitive.calling_ae_title, primitive.called_ae_title) == (SENDER_AE, "EDGENODE")
        assert primitive.application_context_name == fresh.application_context_name
        assert _contexts(primitive.presentation_context_definition_list) == _contexts(
            fresh.presentation_context_definition_list
        )
        assert len(primitive.presentation_context_definition_list) == 128
        assert _user_information(primitive.user_information) == _user_information(fresh.user_information)
    first.result = 0x01  # what pynetdicom does to a rejected request's primitive: the next one is untouched
    assert request.to_primitive().result is None
    assert memo.request(storescu_request[:-1] + b"9") is not request  # other bytes, another request


def test_the_memo_keeps_the_most_recently_used_requests(storescu_request: bytes) -> None:
    memo = NegotiationMemo(capacity=2)
    variants = [storescu_request[:-1] + bytes([value]) for value in (0x31, 0x32, 0x33)]  # implementation version
    first = memo.request(variants[0])
    memo.request(variants[1])
    assert memo.request(variants[0]) is first  # used again: the second is now the oldest
    memo.request(variants[2])
    assert memo.request(variants[0]) is first
    assert memo.hits == 2
    memo.request(variants[1])  # dropped when the third came in: decoded again, not a hit
    assert memo.hits == 2


def test_negotiation_from_memory_equals_pynetdicoms(
    storescu_request: bytes, supported: list[PresentationContext]
) -> None:
    request = RememberedRequest(storescu_request)
    proposal = request.to_primitive().presentation_context_definition_list
    assert isinstance(proposal, Proposal)
    expected, expected_roles = pynetdicom_negotiate(
        _primitive(storescu_request).presentation_context_definition_list, supported, {}
    )
    contexts, roles = negotiate_as_acceptor(proposal, supported, {})
    assert _contexts(contexts) == _contexts(expected) and roles == expected_roles == []
    assert sum(cx.result == 0 for cx in contexts) == 128  # every storescu default is a storage class the node takes
    again, _ = negotiate_as_acceptor(request.to_primitive().presentation_context_definition_list, supported, {})
    assert [id(cx) for cx in again] == [id(cx) for cx in contexts]  # the first negotiation's contexts

    fewer = [cx for cx in supported if cx.abstract_syntax == CT]  # other supported contexts: negotiated anew
    narrowed, _ = negotiate_as_acceptor(proposal, fewer, {})
    assert _contexts(narrowed) == _contexts(pynetdicom_negotiate(list(proposal), fewer, {})[0])
    assert {cx.abstract_syntax for cx in narrowed if cx.result == 0} == {CT}

    roles_ae = AE()  # supported contexts with roles: an SCP/SCU role selection changes the result
    roles_ae.add_supported_context(CT, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
    with_roles = roles_ae.supported_contexts
    for asked in ({CT: (True, False)}, {}):
        contexts_, items = negotiate_as_acceptor(proposal, with_roles, asked)
        expected_contexts, expected_items = pynetdicom_negotiate(list(proposal), with_roles, asked)
        assert _contexts(contexts_) == _contexts(expected_contexts)
        assert [(i.sop_class_uid, i.scu_role, i.scp_role) for i in items] == [
            (i.sop_class_uid, i.scu_role, i.scp_role) for i in expected_items
        ]
    assert len(negotiate_as_acceptor(proposal, with_roles, {CT: (True, False)})[1]) == 1

    plain = list(proposal)  # not a remembered request's: pynetdicom's function, every time
    assert [id(cx) for cx in negotiate_as_acceptor(plain, supported, {})[0]] != [id(cx) for cx in contexts]


def _accept_primitive(request: A_ASSOCIATE, contexts: list[PresentationContext], max_pdu: int) -> A_ASSOCIATE:
    """The accept primitive pynetdicom's ACSE.send_accept builds."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = request.calling_ae_title
    primitive.called_ae_title = request.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    primitive.user_information = [length]
    return primitive


def test_the_accept_from_memory_is_pynetdicoms_encoding(
    storescu_request: bytes, supported: list[PresentationContext]
) -> None:
    request = RememberedRequest(storescu_request)
    primitive = request.to_primitive()
    contexts, _ = negotiate_as_acceptor(primitive.presentation_context_definition_list, supported, {})
    accept = _accept_primitive(primitive, contexts, 65536)
    encoded = request.accept(accept)
    assert encoded == A_ASSOCIATE_AC(accept).encode()
    assert request.accept(_accept_primitive(primitive, contexts, 65536)) is encoded  # the same fields: remembered
    other = _accept_primitive(primitive, contexts, 16384)  # another value: encoded anew
    assert request.accept(other) == A_ASSOCIATE_AC(other).encode() != encoded
    fewer = _accept_primitive(primitive, contexts[:5], 65536)  # other contexts
    assert request.accept(fewer) == A_ASSOCIATE_AC(fewer).encode() != encoded


@pytest.fixture
def node(tmp_path: Path) -> Iterator[EdgeNode]:
    with running_node(node_settings(tmp_path / "var")) as running:
        yield running


def _storescu(dcmtk: dict[str, Path], port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(dcmtk["storescu"]), "-aet", SENDER_AE, "-aec", "EDGENODE", *args[:-1], "127.0.0.1", str(port), args[-1]],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=60,
    )


def test_a_sender_is_answered_from_memory_from_its_second_association_on(
    node: EdgeNode, dcmtk: dict[str, Path], tmp_path: Path
) -> None:
    images = write_datasets(make_ct_series(4, 16, 16), tmp_path / "images")
    memo = node.scp._server.negotiations
    for image in images[:3]:
        done = _storescu(dcmtk, node.port, str(image))
        assert done.returncode == 0, done.stderr.decode()
    assert memo.hits == 2
    done = _storescu(dcmtk, node.port, "--max-pdu", "32768", str(images[3]))  # another request: negotiated anew
    assert done.returncode == 0, done.stderr.decode()
    assert memo.hits == 2
    echo = subprocess.run(
        [str(dcmtk["echoscu"]), "-aet", SENDER_AE, "-aec", "EDGENODE", "127.0.0.1", str(node.port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=60,
    )
    assert echo.returncode == 0, echo.stderr.decode()
    for image in images:
        assert node.scp.index.stored_copy(str(_sop_instance(image))) is not None


def _sop_instance(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_remembered_request_is_accepted_with_the_bytes_pynetdicom_sends(
    node: EdgeNode, storescu_request: bytes
) -> None:
    """The node's A-ASSOCIATE-AC for dcmtk's request, first decoded and then from memory, equals the one an
    unwired pynetdicom acceptor with the node's contexts sends for it."""

    def accept_from(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(storescu_request)
            header = _read(sock, 6)
            body = _read(sock, struct.unpack(">L", header[2:])[0])
            sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT
            return header + body

    first, second = accept_from(node.port), accept_from(node.port)
    reference_ae = build_ae(node.settings)
    reference = reference_ae.start_server(("127.0.0.1", 0), block=False)
    try:
        expected = accept_from(reference.server_address[1])
    finally:
        reference.shutdown()
    assert first[0] == 0x02 and first == second == expected


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "closed before the PDU was complete"
        data += chunk
    return data


def test_install_leaves_other_negotiations_to_pynetdicom(supported: list[PresentationContext]) -> None:
    install()
    install()  # idempotent
    ae = AE()
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    rq = ae.requested_contexts
    for context_id, context in enumerate(rq, start=1):
        context.context_id = context_id
    assert _contexts(negotiate_as_acceptor(rq, supported, {})[0]) == _contexts(
        pynetdicom_negotiate(rq, supported, {})[0]
    )


def test_what_a_request_remembers_is_bounded(storescu_request: bytes, supported: list[PresentationContext]) -> None:
    """Supported contexts made anew for every association (not the listener's way) must not pile up."""
    request = RememberedRequest(storescu_request)
    proposal = request.to_primitive().presentation_context_definition_list
    for _ in range(MAX_VARIANTS * 3):
        copies = [copy.copy(cx) for cx in supported[:3]]
        negotiate_as_acceptor(proposal, copies, {})
        assert len(request._negotiations) <= MAX_VARIANTS


def test_a_request_too_large_to_keep_is_negotiated_but_not_kept(storescu_request: bytes) -> None:
    memo = NegotiationMemo()
    padding = b"\x55\x00" + struct.pack(">H", 16) + b"A" * 16  # implementation version items, repeated
    items = storescu_request[6:] + padding * (MAX_REMEMBERED_BYTES // len(padding))
    large = storescu_request[:2] + struct.pack(">L", len(items)) + items
    assert len(large) > MAX_REMEMBERED_BYTES
    first = memo.request(large)
    assert len(first.to_primitive().presentation_context_definition_list) == 128
    assert memo.request(large) is not first and memo.hits == 0
