"""Several listener processes on one DICOM port: ingest over several associations is not bound to one interpreter.

pynetdicom is pure Python, so one process receives at most one core's worth of images whatever the number of
associations. With `[node] listeners` > 1 the main process opens the port's listening socket once and starts that
many listener processes (spawn), each serving the same socket with the whole listener of node/scp.py: the gate
(AE title and address check, TLS), the pixel and disk checks, the durable store (file and folder fsync) and the
index commit before Success, exactly as a single listener does. Whichever process accepts a connection serves its
association; a process that holds more connections than another lets that one accept first (node/gate.py), so
associations spread evenly. The main process keeps the rest: scheduler and stability scan, sender, workers, web.

One listening socket shared by the processes, not one socket each with SO_REUSEPORT: the kernel spreads
connections over SO_REUSEPORT sockets by a hash of their addresses and ports, a coin toss per connection, so four
associations over two listeners land two and two only 3 times in 8 (one process then serves three or all four on
one core); and connections waiting in the queue of a listener that dies are reset. The shared socket stays open
in the main process, so a listener's death loses no waiting connection, and the port's number (also port 0) and
a bind error are known before any listener starts. It needs POSIX (file locks for the shared counts); elsewhere
the node runs one listener and logs why.

Per node, as with one listener: `max_associations`, `max_pending_per_address` (node/listener_counts.py) and the
SQLite write lock (db/host_lock.py) are shared by the processes. The refusal audit limit is divided: each
listener writes up to DETAILED_PER_INTERVAL // listeners detailed rows per address, kind and interval (at least
one) and its own "N more" summary. Each listener tells the main process about committed source instances (their study's
quiet-period wake-up, node/scheduler.py) through a datagram socket, at most one note per study every
NOTE_INTERVAL_SECONDS; a note that does not fit is dropped rather than waited for (the periodic stability scan
completes the study all the same).

A listener that dies is started again (1 s, doubling while it keeps dying: node/supervisor.py's RestartSchedule);
the associations it was serving end (their senders retry what was not acknowledged; what was acknowledged is
committed), and its counts are cleared. Listeners end when the main process dies (node/parent_watch.py) and on a
graceful stop finish their open associations within `shutdown_grace_seconds`, like a single listener.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import AddressInformation

from node.config import Settings
from node.gate import LISTEN_BACKLOG
from node.listener_counts import SharedCounts
from node.supervisor import SPAWN, RestartSchedule

log = logging.getLogger(__name__)

READY = b"R"  # a listener's first message: set up, waiting for GO
GO = b"G"  # the main process's answer: the socket listens now, serve it
SOURCE_INSTANCE = b"S"  # followed by a Study Instance UID: a source instance of that study was committed
START_TIMEOUT_SECONDS = 120.0  # a listener process must be up within this (imports on a busy machine take seconds)
STOP_MARGIN_SECONDS = 10.0  # beyond shutdown_grace_seconds, for a listener to finish its last store and exit
COUNTS_LOCK_FILE = "listeners.lock"
WATCH_SECONDS = 0.5  # the main process looks for listeners to restart at least this often
# A listener notes a study's newest instance to the main process at most this often (one note per image cost the
# main process a wake-up per image); the quiet-end waker waits this much longer to make up for it.
NOTE_INTERVAL_SECONDS = 0.2


def shared_listeners_supported() -> bool:
    """Whether several listener processes can share the port here (they need POSIX file locks)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return False
    return True


def bind_port(host: str, port: int) -> socket.socket:
    """The DICOM port's socket, bound (not listening yet), non-blocking (another process may take a connection
    first)."""
    family = AddressInformation.from_tuple((host, port)).address_family
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Listener:
    """One listener process as the main process sees it."""

    def __init__(self, slot: int, proc: multiprocessing.process.BaseProcess, inbox: socket.socket) -> None:
        self.slot = slot
        self.proc = proc
        self.inbox = inbox  # datagrams from the process: READY, SOURCE_INSTANCE + study UID
        self.started_at = time.monotonic()
        self.ready = False


class ListenerPool:
    """`[node] listeners` listener processes on one listening socket: started, restarted when they die, stopped
    with the node. The node's "listener" component when it runs more than one."""

    name = "listener"

    def __init__(
        self, settings: Settings, identity: str, on_source_instance: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.count = settings.node.listener_count()
        self.on_source_instance = on_source_instance
        self.crashed = False  # a listener died: files it renamed but never indexed are left for start-up recovery
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._counts: SharedCounts | None = None
        self._listeners: dict[int, _Listener] = {}
        self._restarts = RestartSchedule()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("listeners not started")
        return self._port

    def pids(self) -> list[int]:
        with self._lock:
            return [lst.proc.pid for lst in self._listeners.values() if lst.proc.pid and lst.proc.is_alive()]

    def alive_count(self) -> int:
        return len(self.pids())

    def start(self) -> None:
        node = self.settings.node
        self._socket = bind_port(node.host, node.port)  # a port in use fails here, before any listener starts
        self._port = int(self._socket.getsockname()[1])
        self._counts = SharedCounts(self.count, self.settings.data_dir / COUNTS_LOCK_FILE)
        try:
            with self._lock:
                for slot in range(self.count):
                    self._spawn(slot)
            self._wait_until_ready()
            # Listening only now: a sender that connects finds listeners that serve it at once (their start-up,
            # seconds of imports on a busy machine, is over).
            self._socket.listen(LISTEN_BACKLOG)
            with self._lock:
                for lst in self._listeners.values():
                    self._go(lst)
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="listener-pool", daemon=True)
        self._monitor.start()
        log.info(
            "listening as %s on %s:%d with %d listener processes (pids %s)",
            node.ae_title,
            node.host,
            self.port,
            self.count,
            ", ".join(map(str, self.pids())),
        )

    def _spawn(self, slot: int) -> None:
        assert self._socket is not None and self._counts is not None
        inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.setblocking(False)
        args = (self.settings.model_dump_json(), self.identity, slot, self.count, self._socket, self._counts, outbox)
        proc = SPAWN.Process(target=listener_main, args=args, name=f"listener-{slot}")
        try:
            proc.start()
        finally:
            outbox.close()  # the process has its own copy
        self._listeners[slot] = _Listener(slot, proc, inbox)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            with self._lock:
                waiting = [lst for lst in self._listeners.values() if not lst.ready]
            if not waiting:
                return
            for lst in waiting:
                if not lst.proc.is_alive():
                    raise RuntimeError(f"listener process {lst.slot} exited with code {lst.proc.exitcode} at start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"listener processes not ready within {START_TIMEOUT_SECONDS:g} s")
            multiprocessing.connection.wait([lst.inbox for lst in waiting], timeout=0.2)
            for lst in waiting:
                self._read_inbox(lst)

    def _go(self, lst: _Listener) -> None:
        try:
            lst.inbox.send(GO)
        except OSError as exc:  # it died meanwhile: the watch restarts it
            log.warning("listener process %d: cannot tell it to serve: %s", lst.slot, exc)

    def _read_inbox(self, lst: _Listener) -> None:
        while True:
            try:
                message = lst.inbox.recv(512)
            except (BlockingIOError, OSError):
                return
            if message == READY:
                lst.ready = True
                if self._listening():  # a restarted listener: the socket listens already
                    self._go(lst)
            elif message.startswith(SOURCE_INSTANCE) and self.on_source_instance is not None:
                try:
                    self.on_source_instance(message[1:].decode(errors="replace"))
                except Exception:  # the periodic scan still completes the study
                    log.exception("listener %d: notifying the stability scan failed", lst.slot)

    def _listening(self) -> bool:
        return self._monitor is not None  # started once every listener of the start was ready

    def _watch(self) -> None:
        """Reads the listeners' notes, notices a listener's death at once, restarts it when due."""
        checked = 0.0
        while not self._stopping.is_set():
            with self._lock:
                listeners = list(self._listeners.values())
            inboxes: list[Any] = [lst.inbox for lst in listeners]
            sentinels: list[Any] = [lst.proc.sentinel for lst in listeners if lst.proc.is_alive()]
            try:
                ready = multiprocessing.connection.wait(inboxes + sentinels, timeout=WATCH_SECONDS)
                for lst in listeners:
                    self._read_inbox(lst)
                # Not after every note (one per image): when a listener ended, or every WATCH_SECONDS.
                if any(item in sentinels for item in ready) or time.monotonic() - checked >= WATCH_SECONDS:
                    checked = time.monotonic()
                    self.check()
            except Exception:  # keep watching: a restart that failed is tried again at the next look
                log.exception("listener processes: check failed")
                self._stopping.wait(1.0)

    def check(self) -> None:
        """Restart listeners that died (when their wait is over)."""
        with self._lock:
            if self._stopping.is_set():
                return
            now = time.monotonic()
            for slot, lst in list(self._listeners.items()):
                if lst.proc.is_alive():
                    continue
                delay = self._restarts.note_exit(slot, lst.started_at, now)
                if delay is not None:
                    self.crashed = True
                    assert self._counts is not None
                    self._counts.clear(slot)  # the kernel closed its connections: they no longer count
                    log.error(
                        "listener process %d (pid %s) exited with code %s; restarting in %.0f s",
                        slot,
                        lst.proc.pid,
                        lst.proc.exitcode,
                        delay,
                    )
                if self._restarts.due(slot, now):
                    lst.inbox.close()
                    self._spawn(slot)

    def stop(self) -> None:
        """Listeners stop accepting, finish their open associations within shutdown_grace_seconds, and exit."""
        self._stopping.set()
        grace = self.settings.node.shutdown_grace_seconds
        with self._lock:
            listeners = list(self._listeners.values())
        for lst in listeners:
            if lst.proc.is_alive() and lst.proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(lst.proc.pid, signal.SIGTERM)
        if self._socket is not None:  # the listeners close theirs first thing: then the port is closed
            self._socket.close()
            self._socket = None
        if self._monitor is not None:  # before the inboxes close under it (it ends within its 0.5 s wait)
            self._monitor.join(5)
            self._monitor = None
        with self._lock:
            self._listeners.clear()
        deadline = time.monotonic() + grace + STOP_MARGIN_SECONDS
        for lst in listeners:
            lst.proc.join(max(0.1, deadline - time.monotonic()))
            if lst.proc.is_alive():
                log.error("listener process %d did not stop within %.0f s: killed", lst.slot, grace)
                lst.proc.kill()
                lst.proc.join(5)
                self.crashed = True
            self._read_inbox(lst)  # its last notes
            lst.inbox.close()
        log.info("listener processes stopped")


def listener_main(
    settings_json: str,
    identity: str,
    slot: int,
    listeners: int,
    listen_socket: socket.socket,
    counts: SharedCounts,
    outbox: socket.socket,
) -> None:
    """Entry point of a listener process: serve the shared socket until SIGTERM or the main process's death."""
    from pydicom import config as pydicom_config

    from db.ingest import IngestIndex
    from db.session import Database
    from node.cli import configure_logging
    from node.parent_watch import ParentWatch
    from node.scp import StorageSCP
    from node.spool import Spool

    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.logging.level)
    # pydicom validates every UID it makes (a regular expression each): pynetdicom makes tens of them per
    # association and several per image. This process writes received bytes as they came and checks what it
    # relies on itself (node/received.py: UIDs present, at most 64 characters, the request's): no validation here.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    grace = settings.node.shutdown_grace_seconds
    stop = threading.Event()
    # Orphaned (the main process was killed): stop accepting, finish what is open, exit.
    ParentWatch(stop.set, grace_seconds=grace + STOP_MARGIN_SECONDS).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when listeners stop

    noted: dict[str, float] = {}  # study -> when it was last noted to the main process

    def note_source_instance(study_uid: str) -> None:
        """At most one note per study per NOTE_INTERVAL_SECONDS (the main process's waker allows for that lag)."""
        now = time.monotonic()
        if now - noted.get(study_uid, -NOTE_INTERVAL_SECONDS) < NOTE_INTERVAL_SECONDS:
            return
        if len(noted) > 1000:  # studies that stopped arriving long ago
            noted.clear()
        noted[study_uid] = now
        with contextlib.suppress(OSError):  # full (the main process is busy) or gone: the periodic scan covers it
            outbox.send(SOURCE_INSTANCE + study_uid.encode())

    listen_socket.setblocking(False)  # as the main process made it: another listener may take a connection first
    db = Database(settings.database_url)  # the schema is at head: the main process migrated before starting us
    spool = Spool(settings.spool_dir, writer=identity)
    scp = StorageSCP(
        settings,
        spool,
        IngestIndex(db, spool_id=spool.id),
        on_source_instance=note_source_instance if settings.stability.scan_at_quiet_end else None,
        listen_socket=listen_socket,
        counts=counts.bind(slot),
        listeners=listeners,
        slot=slot,
    )
    outbox.send(READY)
    if _told_to_serve(outbox, stop):
        scp.start()
        gc.freeze()  # what start-up made lives as long as the process: later collections need not walk it
        log.info("listener process %d serving (pid %d)", slot, os.getpid())
        outbox.setblocking(False)
        stop.wait()
    scp.stop(grace)
    db.dispose()
    outbox.close()
    logging.shutdown()
    os._exit(0)  # every store is committed or refused; pynetdicom's non-daemon threads must not hold up the exit


def _told_to_serve(outbox: socket.socket, stop: threading.Event) -> bool:
    """Wait for the main process's GO (True), or for a stop (False)."""
    outbox.settimeout(0.2)
    while not stop.is_set():
        try:
            if outbox.recv(16) == GO:
                return True
        except TimeoutError:
            continue
    return False
