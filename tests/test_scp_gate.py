"""The listener's front door against real sockets: idle and half-open connections cannot take the association
slots, are dropped after `pending_timeout_seconds`, are capped per source address, and are audited without
flooding the audit table; dcmtk's storescu (the allowed PACS) stores all the while."""

from __future__ import annotations

import re
import select as io_select
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import AuditEvent, AuditEventType, Instance
from node.audit_limit import DETAILED_PER_INTERVAL, RateLimitedAudit
from tests.conftest import DCMTK, peer_env
from tests.dicomgen import make_ct_series, write_datasets
from tests.ingest_support import node_settings, running_node, sender_ae
from tests.test_scp_tls import client_context, make_pki

ATTACKER = "127.0.0.2"  # loopback alias: the idle connections come from another address than the PACS
IDLE = 50


def idle_socket(port: int, source: str = ATTACKER) -> socket.socket:
    """A TCP connection to the node that never sends anything (the node decides when it ends)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))
    sock.settimeout(60)
    return sock


@contextmanager
def idle_sockets(port: int, count: int, source: str = ATTACKER) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        yield [stack.enter_context(idle_socket(port, source)) for _ in range(count)]


def closed_by_node(sock: socket.socket) -> bool:
    """Waits (up to the socket timeout) for the node to end the connection: EOF or reset, never data."""
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    assert data == b"", "the node sent data to a connection that sent no request"
    return True


def still_open(sock: socket.socket) -> bool:
    """Without waiting: True while the node keeps the connection (nothing to read, no EOF)."""
    readable, _, _ = io_select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except ConnectionResetError:
        return False


def audit(node, event_type: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with node.db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)).all())


def counted(events: list[AuditEvent]) -> int:
    """Connections an audit trail accounts for: one per detailed event, N per 'N more ...' summary."""
    total = 0
    for event in events:
        more = re.match(r"(\d+) more ", event.detail)
        total += int(more.group(1)) if more else 1
    return total


def storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK["storescu"]), "-aet", "STORESCU", "-aec", "EDGENODE", "127.0.0.1", str(port), *map(str, files)],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows_per_interval(listeners: int) -> int:
    """Audit rows one address and kind may get per interval: each listener process writes its share of the
    detailed rows (at least one) and its own summary."""
    return listeners * (max(1, DETAILED_PER_INTERVAL // listeners) + 1)


@pytest.mark.parametrize("listeners", [1, 2])
def test_idle_connections_cannot_lock_out_the_pacs(tmp_path: Path, dcmtk, listeners: int) -> None:
    files = write_datasets(make_ct_series(5, 32, 32), tmp_path / "ct")
    # Two slots only and a long deadline: without the gate, two idle connections would be enough to lock the door.
    # With two listener processes the caps are the node's: 8 waiting from the address in all, not 8 per process.
    gate = {"max_associations": 2, "pending_timeout_seconds": 300, "max_pending_per_address": 8, "listeners": listeners}
    with running_node(node_settings(tmp_path / "var", node=gate)) as node:
        port = node.port
        with idle_sockets(port, IDLE) as idle:
            done = storescu(port, files)
            assert done.returncode == 0, done.stdout + done.stderr
            with node.db.session() as s:
                assert s.scalar(select(func.count()).select_from(Instance)) == 5

            # Per-address cap: all but 8 were closed at once; those 8 are still waiting (the deadline is far away).
            open_now = [sock for sock in idle if still_open(sock)]
            assert len(open_now) == 8
            assert all(closed_by_node(sock) for sock in idle if sock not in open_now)
        assert not audit(node, "association.rejected")  # the PACS never saw "local limit exceeded"
        assert len(audit(node, "association.accepted")) == 1
    # After stop every summary is written: the refusals are all accounted for, in a handful of rows.
    refused = [e for e in audit(node, "connection.refused") if e.peer_address == ATTACKER]
    assert counted(refused) == IDLE - 8
    assert len(refused) <= rows_per_interval(listeners)
    assert all("max_pending_per_address" in e.detail for e in refused)


@pytest.mark.parametrize("listeners", [1, 2])
def test_connections_that_send_no_complete_request_are_dropped(tmp_path: Path, listeners: int) -> None:
    gate = {"pending_timeout_seconds": 1, "max_pending_per_address": 20, "listeners": listeners}
    with running_node(node_settings(tmp_path / "var", node=gate)) as node:
        port = node.port
        with idle_sockets(port, 8) as idle:
            partial_header = idle_socket(port)
            partial_header.sendall(b"\x01\x00\x00")  # an A-ASSOCIATE-RQ header, cut short
            partial_body = idle_socket(port)
            partial_body.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\x00\x01")  # promises 200 bytes, sends 2
            with partial_header, partial_body:
                assert all(closed_by_node(sock) for sock in [*idle, partial_header, partial_body])
        # The node still serves: an allowed peer associates afterwards.
        assoc = sender_ae().associate("127.0.0.1", port, ae_title="EDGENODE")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
    dropped = [e for e in audit(node, "connection.dropped") if e.peer_address == ATTACKER]
    assert counted(dropped) == 10
    assert len(dropped) <= rows_per_interval(listeners)
    assert any("no complete A-ASSOCIATE-RQ within 1 s" in e.detail for e in dropped)


def test_non_dicom_first_bytes_are_dropped_and_audited(tmp_path: Path) -> None:
    with running_node(node_settings(tmp_path / "var")) as node, idle_socket(node.scp.port, "127.0.0.1") as http:
        http.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_node(http)
    dropped = audit(node, "connection.dropped")
    assert len(dropped) == 1 and "not an A-ASSOCIATE-RQ" in dropped[0].detail


@pytest.mark.parametrize("listeners", [1, 2])
def test_idle_connections_do_not_stall_the_tls_listener(tmp_path: Path, listeners: int) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {
        "tls_cert": str(pki["server.pem"]),
        "tls_key": str(pki["server.key"]),
        "pending_timeout_seconds": 300,
        "listeners": listeners,
    }
    with running_node(node_settings(tmp_path / "var", node=tls)) as node:
        port = node.port
        with idle_sockets(port, 5):  # never start the TLS handshake
            assoc = sender_ae().associate(
                "127.0.0.1", port, ae_title="EDGENODE", tls_args=(client_context(pki, False), "localhost")
            )
            assert assoc.is_established
            assert int(assoc.send_c_echo().Status) == 0
            assoc.release()


def test_rate_limited_audit_accounts_for_every_event_in_a_few_rows_per_interval() -> None:
    rows: list[tuple[str, dict[str, str]]] = []
    now = [0.0]
    limiter = RateLimitedAudit(lambda kind, **fields: rows.append((kind, fields)), 60.0, clock=lambda: now[0])
    kind = AuditEventType.CONNECTION_DROPPED
    for i in range(1000):  # a flood from one address, another address now and then
        now[0] = i * 0.01
        limiter.record(kind, "10.0.0.9", detail=f"attempt {i}")
        if i % 100 == 0:
            limiter.record(kind, "10.0.0.7", detail="other")
    limiter.flush()  # 10 s in: no interval has ended yet
    assert len(rows) == 2 * DETAILED_PER_INTERVAL
    now[0] = 61.0
    limiter.flush()
    by_address = {a: [f for _, f in rows if f["peer_address"] == a] for a in ("10.0.0.9", "10.0.0.7")}
    assert len(by_address["10.0.0.9"]) == DETAILED_PER_INTERVAL + 1
    assert by_address["10.0.0.9"][-1]["detail"].startswith(f"{1000 - DETAILED_PER_INTERVAL} more from 10.0.0.9")
    assert "latest: attempt 999" in by_address["10.0.0.9"][-1]["detail"]
    assert len(by_address["10.0.0.7"]) == DETAILED_PER_INTERVAL + 1  # 10 events: 5 detailed, "5 more"
    limiter.record(kind, "10.0.0.9", detail="next interval")  # a new interval starts with detailed rows again
    assert rows[-1][1]["detail"] == "next interval"
