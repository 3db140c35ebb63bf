"""The listener's front door: a connection gets an association slot only after it has sent, within
`pending_timeout_seconds`, a complete A-ASSOCIATE-RQ that passes the AE title + source address check.

pynetdicom gives every accepted TCP connection an acceptor thread that counts against `maximum_associations`
while it waits (up to `acse_timeout`) for the request, and it performs the TLS handshake inside its accept loop;
so a few idle connections could hold every slot, and one idle connection stalled a TLS listener. Here each
accepted connection first passes the gate, in a thread of its own:

1. at most `max_pending_per_address` connections per source address may be waiting; more are closed at once;
2. the TLS handshake (when TLS is on) and the whole first PDU must arrive before the deadline, else the
   connection is dropped;
3. that PDU must be an A-ASSOCIATE-RQ; `screen` (the listener's AE title, address, disk and shutdown checks)
   may refuse it, answered here with an A-ASSOCIATE-RJ.

4. an admitted request takes one of `max_associations` places (counted per node, node/listener_counts.py, also
   when several listener processes share the port), or is rejected as "local limit exceeded".

Only then is the connection handed to pynetdicom, with the request already read (node/association_io.py), so its
association count only ever sees admitted associations. Refused, dropped and rejected connections are audited
through `RateLimitedAudit`. Once an association runs the gate is out of the data path: no per-store cost.

With several listener processes (node/listeners.py) each runs this server on the one listening socket the main
process opened: whichever process accepts a connection serves it, and a process holding more connections than
another lets that one accept first (ACCEPT_DEFERRAL_SECONDS), so associations spread evenly.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import decode_bytes

from db.models import AuditEventType
from node.association_io import unbind_logging, wire
from node.audit_limit import RateLimitedAudit
from node.direct_store import StoreHandler
from node.listener_counts import AdmissionCounts, LocalCounts
from node.negotiation_memo import NegotiationMemo, install

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128  # a burst of connections must not crowd out the PACS's SYN
PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length (PS3.8 9.3.1)
A_ASSOCIATE_RQ_TYPE = 0x01
A_ASSOCIATE_RJ_TYPE = 0x03
A_ASSOCIATE_RQ_FIXED = 6 + 68  # PDU header, then protocol version ... the 32 reserved bytes before the items
MAX_REQUEST_BYTES = 1 << 20  # an A-ASSOCIATE-RQ with all 128 presentation contexts is a few tens of KiB
GC_INTERVAL_SECONDS = 300.0  # the accept loop's garbage collection, when idle (see service_actions)
STOP_POLL_SECONDS = 0.1  # the accept loop notices a stop this soon (and closes the port)
ACCEPT_DEFERRAL_SECONDS = 0.002  # a busier listener process waits this long before it takes a new connection

RejectReason = tuple[int, int, int]  # A-ASSOCIATE-RJ (result, source, reason/diagnostic), PS3.8 9.3.4
Refusal = tuple[RejectReason, str]  # ... and why, for the log and the audit trail
Screen = Callable[[str, str, str], Refusal | None]  # (calling AE, called AE, source address) -> refusal or None
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit exceeded


def normalise_ip(address: str) -> str:
    """The address as the allow-list writes it: no IPv6 scope, IPv4-mapped IPv6 as plain IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _address_key(address: str) -> str:
    try:
        return normalise_ip(address)
    except ValueError:
        return address


class _NotAdmitted(Exception):
    """The connection ends here; `audit` is False when there is nothing to record (the peer left, node stopping)."""

    def __init__(self, why: str, audit: bool = True) -> None:
        super().__init__(why)
        self.audit = audit


class ConnectionGate:
    """Admission of new connections: the per-address cap, the deadline, the first PDU, the screen and the
    association places."""

    def __init__(
        self,
        screen: Screen,
        audit: RateLimitedAudit,
        *,
        pending_timeout: float,
        max_pending_per_address: int,
        max_associations: int,
        counts: AdmissionCounts | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.screen = screen
        self.audit = audit
        self.pending_timeout = pending_timeout
        self.max_pending_per_address = max_pending_per_address
        self.max_associations = max_associations
        self.counts: AdmissionCounts = counts if counts is not None else LocalCounts()
        self.ssl_context = ssl_context
        self._sockets: dict[int, socket.socket] = {}  # file descriptor -> the waiting connection's socket
        self._lock = threading.Lock()
        self._closed = False

    def reserve(self, address: str) -> bool:
        """Called in the accept loop: take a pending place for `address`, or refuse (the caller closes)."""
        if self._closed:
            return False
        taken, waiting = self.counts.take_waiting(_address_key(address), self.max_pending_per_address)
        if taken:
            return True
        if not self._closed:
            why = f"{waiting} connection(s) from {address} already waiting (node.max_pending_per_address)"
            if self.audit.record(AuditEventType.CONNECTION_REFUSED, address, outcome="failure", detail=why):
                log.warning("refused a connection from %s: %s", address, why)
        return False

    def admit(self, sock: socket.socket, address: str) -> tuple[socket.socket, bytes] | None:
        """Run the gate for a reserved connection: (socket, its A-ASSOCIATE-RQ) to hand on, or None (closed).
        A connection handed on holds an association place until `release_association()`."""
        deadline = time.monotonic() + self.pending_timeout
        fd = sock.fileno()
        with self._lock:
            self._sockets[fd] = sock
        admitted = False
        try:
            if self.ssl_context is not None:
                sock = self._handshake(sock, fd, deadline)
            request = self._read_request(sock, deadline)
            calling, called = _ae_titles(request)
            refusal = self.screen(calling, called, address)
            if self._closed:
                raise _NotAdmitted("the node is stopping", audit=False)
            if refusal is not None:
                self._reject(sock, address, calling, called, refusal)
                return None
            sock.settimeout(None)  # pynetdicom expects the blocking socket accept() returned
            if not self.counts.take_association(self.max_associations):  # the last step: nothing can fail after it
                why = f"local limit exceeded: {self.max_associations} associations open (node.max_associations)"
                self._reject(sock, address, calling, called, (REJECT_LOCAL_LIMIT, why))
                return None
            admitted = True
            return sock, request
        except _NotAdmitted as exc:
            if exc.audit and self.audit.record(
                AuditEventType.CONNECTION_DROPPED, address, outcome="failure", detail=str(exc)
            ):
                log.warning("dropped a connection from %s: %s", address, exc)
            return None
        finally:
            with self._lock:
                self._sockets.pop(fd, None)
            self.counts.end_waiting(_address_key(address))
            if not admitted:
                _close(sock)

    def release_association(self) -> None:
        """An admitted connection's association has ended: its place is free."""
        self.counts.end_association()

    def close(self) -> None:
        """Admit nobody any more and end the connections still waiting (they have nothing to finish)."""
        with self._lock:
            self._closed = True
            waiting = list(self._sockets.values())
        for sock in waiting:  # the plain socket's shutdown, also for TLS: its thread still owns the TLS state
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    # --- the steps ---------------------------------------------------------------------------------

    def _handshake(self, sock: socket.socket, fd: int, deadline: float) -> ssl.SSLSocket:
        assert self.ssl_context is not None
        try:
            tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            raise _NotAdmitted(f"TLS setup failed: {exc}") from exc
        with self._lock:
            self._sockets[fd] = tls  # the same connection; the plain socket object is detached now
        try:
            tls.settimeout(max(deadline - time.monotonic(), 0.001))  # for the handshake as a whole
            tls.do_handshake()
            return tls
        except TimeoutError:
            failure = _NotAdmitted(f"TLS handshake not completed within {self.pending_timeout:g} s")
        except ssl.SSLError as exc:
            failure = _NotAdmitted(f"TLS handshake failed: {exc.reason or exc}")
        except OSError as exc:
            failure = _NotAdmitted(f"connection lost during the TLS handshake: {exc}", audit=False)
        _close(tls)
        raise failure

    def _read_request(self, sock: socket.socket, deadline: float) -> bytes:
        header = self._read(sock, PDU_HEADER.size, deadline, b"")
        pdu_type, _, length = PDU_HEADER.unpack(header)
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise _NotAdmitted(f"not an A-ASSOCIATE-RQ (first byte 0x{pdu_type:02X})")
        if length > MAX_REQUEST_BYTES:
            raise _NotAdmitted(f"A-ASSOCIATE-RQ of {length} bytes (more than {MAX_REQUEST_BYTES})")
        return self._read(sock, length, deadline, header)

    def _read(self, sock: socket.socket, count: int, deadline: float, before: bytes) -> bytes:
        data = bytearray(before)
        wanted = len(before) + count
        while len(data) < wanted:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(min(wanted - len(data), 65536))
            except TimeoutError as exc:
                raise _NotAdmitted(
                    f"no complete A-ASSOCIATE-RQ within {self.pending_timeout:g} s ({len(data)} bytes received)"
                ) from exc
            except OSError as exc:
                raise _NotAdmitted(f"connection lost before the A-ASSOCIATE-RQ: {exc}", audit=False) from exc
            if not chunk:
                raise _NotAdmitted("closed by the peer before sending an A-ASSOCIATE-RQ", audit=False)
            data += chunk
        return bytes(data)

    def _reject(self, sock: socket.socket, address: str, calling: str, called: str, refusal: Refusal) -> None:
        (result, source, reason), why = refusal
        detail = f"{why} (A-ASSOCIATE-RJ result {result}, source {source}, reason {reason})"
        if self.audit.record(
            AuditEventType.ASSOCIATION_REJECTED,
            address,
            outcome="failure",
            calling_ae=calling,
            called_ae=called,
            detail=detail,
        ):
            log.warning("rejecting association from %s@%s: %s", calling, address, why)
        with contextlib.suppress(OSError):  # after the audit: the sender sees the rejection last
            sock.settimeout(5.0)
            sock.sendall(PDU_HEADER.pack(A_ASSOCIATE_RJ_TYPE, 0, 4) + bytes([0, result, source, reason]))


def _ae_titles(request: bytes) -> tuple[str, str]:
    """(calling, called) AE title from the A-ASSOCIATE-RQ's fixed part (PS3.8 9.3.2: called at bytes 10-25,
    calling at 26-41). Read there, not by decoding the whole request: pynetdicom decodes it once more anyway, and
    its presentation contexts (tens of UIDs, each validated) cost milliseconds per association."""
    if len(request) < A_ASSOCIATE_RQ_FIXED:
        raise _NotAdmitted(f"malformed A-ASSOCIATE-RQ: {len(request)} bytes, shorter than its fixed part")
    return decode_bytes(request[26:42]).strip(), decode_bytes(request[10:26]).strip()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    sock.close()


class _PrimedRequestHandler(RequestHandler):
    """pynetdicom's request handler for a connection whose A-ASSOCIATE-RQ the gate has read; its association is
    event-driven (node/association_io.py) and reads the gate's bytes first."""

    assoc: Association | None = None
    ended: Callable[[], None] | None = None

    def __init__(
        self, request: socket.socket, client_address: Any, server: GatedAssociationServer, first_pdu: bytes
    ) -> None:
        self.first_pdu = first_pdu
        self.store = server.store
        self.negotiations = server.negotiations
        super().__init__(request, client_address, server)  # handles the request: starts the association

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        self.ended = wire(assoc, self.first_pdu, self.store, self.negotiations)
        self.assoc = assoc
        return assoc


class _SharedContexts(list[Any]):
    """The server's supported presentation contexts, handed to each association as they are, not deep-copied."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the gate in front (and TLS moved out of the accept loop).

    With `listen_socket` it serves a socket the main process opened and shares with other listener processes
    (non-blocking: another process may take a connection this one was woken for); closing it then only closes
    this process's descriptor, never the socket the others still accept on."""

    daemon_threads = True  # a connection waiting at the gate must not hold up the process's exit
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        *args: Any,
        gate: ConnectionGate,
        listen_socket: socket.socket | None = None,
        store: StoreHandler | None = None,
        **kwargs: Any,
    ) -> None:
        self.gate = gate
        self.store = store
        self.negotiations = NegotiationMemo()  # requests seen before, answered from their first negotiation
        self._shared_socket = listen_socket
        self._collected_at = time.monotonic()
        super().__init__(*args, **kwargs)
        # Each association gets its own deep copy of the ~130 supported contexts from pynetdicom (tens of ms of
        # CPU per association); negotiation only reads them (pynetdicom.presentation.negotiate_as_acceptor).
        self.contexts = _SharedContexts(self.contexts)
        unbind_logging(self)  # (and each association's, in wire())

    def server_bind(self) -> None:
        if self._shared_socket is None:
            super().server_bind()
            return
        made = self.socket
        assert made is not None  # socketserver's __init__ made it just before calling this
        made.close()  # the shared socket is bound and listening already
        self.socket = self._shared_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._shared_socket is None:
            super().server_activate()

    def server_close(self) -> None:
        if self._shared_socket is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()  # no shutdown(): that would stop the socket listening for every process

    def get_request(self) -> tuple[socket.socket, Any]:
        listener = self.socket
        assert listener is not None  # bound in __init__, closed only by server_close()
        if self.gate.counts.busier_than_others():
            time.sleep(ACCEPT_DEFERRAL_SECONDS)  # a less busy listener process takes it, if it is free to
        return listener.accept()  # TLS, if on, is the gate's first step, in the connection's own thread

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.gate.reserve(str(client_address[0]))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        sock = request
        admitted = None
        handler = None
        try:
            admitted = self.gate.admit(request, str(client_address[0]))
            if admitted is not None:
                sock, first_pdu = admitted
                handler = _PrimedRequestHandler(sock, client_address, self, first_pdu)
                if handler.assoc is not None:
                    handler.assoc.join()  # the association has ended: its place is free again
        except Exception:
            self.handle_error(sock, client_address)
            _close(sock)
        finally:
            if handler is not None and handler.ended is not None:
                handler.ended()
            if admitted is not None:
                self.gate.release_association()

    def service_actions(self) -> None:
        """Called at every turn of the accept loop. Not pynetdicom's: it runs a full garbage collection every 60
        turns (for association objects it found left over), tens of milliseconds with the GIL held, every few
        seconds, in the middle of the stores of open associations. Here at most every GC_INTERVAL_SECONDS, and only
        while no association is open."""
        self.gate.audit.flush()  # summaries of ended intervals, at most one per address and kind
        now = time.monotonic()
        if now - self._collected_at >= GC_INTERVAL_SECONDS and not self.active_associations:
            self._collected_at = now
            gc.collect()

    def shutdown(self) -> None:
        """Stop accepting and end the connections waiting at the gate. (pynetdicom's own shutdown also
        unregisters from `AE._servers`, where this server, started by `start_gated_server`, never was.)"""
        self.gate.close()
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        self.gate.audit.flush(everything=True)


def start_gated_server(
    ae: AE,
    address: tuple[str, int],
    gate: ConnectionGate,
    evt_handlers: list[evt.EventHandlerType],
    listen_socket: socket.socket | None = None,
    store: StoreHandler | None = None,
) -> GatedAssociationServer:
    """Bind and serve in a daemon thread, like `AE.start_server(block=False)`, with the gate in front; or serve
    `listen_socket`, bound and listening already (several listener processes, node/listeners.py). `store` serves
    C-STOREs in each association's DUL thread (node/direct_store.py)."""
    if listen_socket is not None:
        address = listen_socket.getsockname()[:2]
    install()  # pynetdicom negotiates remembered requests through the server's memo (node/negotiation_memo.py)
    server = ae.make_server(
        address,
        evt_handlers=evt_handlers,
        server_class=GatedAssociationServer,
        gate=gate,
        listen_socket=listen_socket,
        store=store,
    )  # no ssl_context here: the gate does TLS
    threading.Thread(target=server.serve_forever, args=(STOP_POLL_SECONDS,), name="dicom-listener", daemon=True).start()
    return server  # type: ignore[return-value]
