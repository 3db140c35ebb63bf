"""pynetdicom's association threads woken by events instead of 1 ms polls, and PDUs read in large chunks.

pynetdicom runs two threads per association and both poll: the DUL thread sleeps 1 ms whenever a loop found
nothing (then looks at the socket with a zero-timeout select, and at its queue of PDUs to send), and the
association reactor sleeps 1 ms before every look at its queue of decoded DIMSE messages. Over one association
each C-STORE waits on three such sleeps in turn (the request noticed, the message handed to the handler, the
response picked up to be sent): about 1.5 ms per image, on top of reading every PDU 4 KiB per `recv` call.

`wire()` changes one acceptor association before it starts, through its documented parts only where they exist
and through three attributes where not (`DULServiceProvider._run_loop_delay`, `Association._reactor_checkpoint`
and the queues' `put`): the DUL thread blocks in `select` on its socket and on a wake-up socket that is written
whenever another thread hands it something (a response to send, a closed connection), the reactor blocks on an
event set whenever a DIMSE message or an ACSE primitive arrives, and `recv` fills one buffer with as few calls
as the kernel allows. Both threads still look around every IDLE_SECONDS (timers, kill flags), as before.
Given a store handler, `wire()` also has the DUL thread serve C-STOREs itself (node/direct_store.py), and given a
negotiation memo, a request seen before is negotiated from what the first one made (node/negotiation_memo.py).
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from node.direct_store import DirectStore, StoreHandler
from node.negotiation_memo import NegotiationMemo

IDLE_SECONDS = 0.02  # longest sleep of either thread with nothing to do (they then check timers and kill flags)


class _Bell:
    """A wake-up for the DUL thread's `select`: a socket pair, the write end rung without blocking."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def ring(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (the association ended)
            self._writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()


class _RingingQueue(queue.Queue[Any]):
    """A queue that rings `ring` after each `put` made by another thread than `owner` (which is awake anyway)."""

    def __init__(self, ring: Callable[[], None], owner: threading.Thread | None = None) -> None:
        super().__init__()
        self._ring = ring
        self._owner = owner

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if self._owner is None or threading.current_thread() is not self._owner:
            self._ring()


class _ReactorCheckpoint:
    """Stands in for `Association._reactor_checkpoint`, the event the reactor waits on at every loop (cleared to
    pause it). Its `wait` returns at once while there is work, else when rung or after IDLE_SECONDS.

    The bell is a lock used as a binary semaphore (held: not rung; `ring` releases it, `wait` takes it): ringing
    costs no Python-level condition variable, and a ring that comes while the reactor is busy is kept."""

    def __init__(self, has_work: Callable[[], bool]) -> None:
        self._open = threading.Event()
        self._open.set()
        self._bell = threading.Lock()
        self._bell.acquire()
        self._has_work = has_work

    def set(self) -> None:
        self._open.set()
        self.ring()

    def clear(self) -> None:
        self._open.clear()

    def is_set(self) -> bool:
        return self._open.is_set()

    def ring(self) -> None:
        with contextlib.suppress(RuntimeError):  # rung already
            self._bell.release()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._open.wait(timeout):
            return False
        if not self._has_work():
            self._bell.acquire(timeout=IDLE_SECONDS)  # a ring before the look is kept in the lock: not lost
        return True


class EventSocket(AssociationSocket):
    """pynetdicom's connection wrapper with a blocking `ready` (socket or bell) and a large-chunk `recv`; it first
    returns `primed`, the bytes of the A-ASSOCIATE-RQ the listener's gate already read (node/gate.py)."""

    primed: bytearray
    bell: _Bell

    @property
    def ready(self) -> bool:
        if self.primed:
            return True
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes select cannot see
            return True
        try:
            readable, _, _ = select.select([sock, self.bell.reader], [], [], IDLE_SECONDS)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom: the transport connection is closed
            return False
        if self.bell.reader in readable:
            self.bell.drain()
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """`nr_bytes` bytes (fewer only if the peer closed the connection), read straight into one buffer."""
        data = bytearray(nr_bytes)
        got = min(len(self.primed), nr_bytes)
        if got:
            data[:got] = self.primed[:got]
            del self.primed[:got]
        sock = self.socket
        assert sock is not None  # pynetdicom only reads from a connected socket
        with memoryview(data) as view:
            while got < nr_bytes:
                count = sock.recv_into(view[got:], nr_bytes - got)
                if not count:
                    break
                got += count
        if got < nr_bytes:
            del data[got:]
        return data


LOGGING_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


def unbind_logging(target: Any) -> None:
    """Unbind pynetdicom's logging handlers from a server or an association (both bind them). They format every
    PDU and DIMSE message for pynetdicom's INFO and DEBUG log, which node.cli keeps at WARNING (data sets hold
    patient data): work per image for nothing."""
    for event in LOGGING_EVENTS:
        for handler, _ in list(target.get_handlers(event)):
            target.unbind(event, handler)


def wire(
    assoc: Association,
    first_pdu: bytes = b"",
    store: StoreHandler | None = None,
    negotiations: NegotiationMemo | None = None,
) -> Callable[[], None]:
    """Make an acceptor association (created, not started) event-driven, its C-STOREs served by `store` in the DUL
    thread (node/direct_store.py) and its request negotiated through `negotiations` (node/negotiation_memo.py) when
    given; returns what to call once it ended."""
    sock = assoc.dul.socket
    assert sock is not None  # the accepted connection, already wrapped by pynetdicom
    bell = _Bell()
    sock.__class__ = EventSocket  # same object and state (pynetdicom already queued its "connection open" event)
    assert isinstance(sock, EventSocket)
    sock.primed = bytearray(first_pdu)
    sock.bell = bell

    dul = assoc.dul
    dul._run_loop_delay = 0  # its idle wait is now the select in `ready`
    _swap_queue(dul, "to_provider_queue", _RingingQueue(bell.ring, owner=dul))
    _swap_queue(dul, "event_queue", _RingingQueue(bell.ring, owner=dul))  # holds the "connection open" event

    def has_work() -> bool:
        return bool(assoc.dimse.msg_queue.qsize() or dul.to_user_queue.qsize()) or not dul.is_alive()

    checkpoint = _ReactorCheckpoint(has_work)
    assoc._reactor_checkpoint = checkpoint  # type: ignore[assignment]
    _swap_queue(assoc.dimse, "msg_queue", _RingingQueue(checkpoint.ring))
    _swap_queue(dul, "to_user_queue", _RingingQueue(checkpoint.ring))

    # Told to stop, the DUL thread must not finish a select first (pynetdicom spins on sleep(0) meanwhile).
    stop_dul, kill_dul = dul.stop_dul, dul.kill_dul

    def stop_now() -> bool:
        if dul.state_machine.current_state == "Sta1":  # when pynetdicom's stop_dul stops the thread
            dul._kill_thread = True
            bell.ring()
        return stop_dul()

    def kill_now() -> None:
        kill_dul()
        bell.ring()

    dul.stop_dul = stop_now  # type: ignore[method-assign]
    dul.kill_dul = kill_now  # type: ignore[method-assign]
    if store is not None:
        dul._read_pdu_data = DirectStore(assoc, store).read_pdu  # type: ignore[method-assign]
    if negotiations is not None:
        dul._decode_pdu = negotiations.decode_pdu(dul)  # type: ignore[method-assign,assignment]
    unbind_logging(assoc)

    def ended() -> None:
        """Close the bell once the DUL thread is gone (never while it may still select on it)."""
        if dul.ident is not None:  # started
            dul.join(IDLE_SECONDS * 10)
        if not dul.is_alive():
            bell.close()

    return ended


def _swap_queue(owner: object, name: str, replacement: queue.Queue[Any]) -> None:
    """Put `replacement` in place of the queue `owner.<name>`, with whatever that queue already held."""
    current: queue.Queue[Any] = getattr(owner, name)
    while True:
        try:
            replacement.put(current.get_nowait())
        except queue.Empty:
            break
    setattr(owner, name, replacement)
