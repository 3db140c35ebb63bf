"""A slow network between a node and its PACS: a TCP relay on a loopback port that passes every chunk on after a
delay, in both directions, to the real peer behind it.

Nothing is simulated but the wire: the node's real association reaches the real PACS, byte for byte; it only takes
longer, as over a busy WAN link. The chaos tests use it so that a node's sending lasts long enough to be killed in
the middle of it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Self

CHUNK = 65536


class SlowLink:
    """Listens on 127.0.0.1:`port` and relays each connection to 127.0.0.1:`target_port`, each chunk `delay` s late."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0

    def start(self) -> Self:
        threading.Thread(target=self._accept, name="slow-link", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()  # the peer is down: the caller sees a refused/closed association, as it would
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            both_done = threading.Barrier(2, action=lambda c=client, u=upstream: self._close(c, u))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, both_done), daemon=True).start()

    def _close(self, *sockets: socket.socket) -> None:
        with self._lock:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.close()
                with contextlib.suppress(ValueError):
                    self._sockets.remove(sock)

    def _pump(self, source: socket.socket, sink: socket.socket, both_done: threading.Barrier) -> None:
        """Pass chunks from `source` to `sink`, each after the delay; at end of stream, pass that on too (the
        connection is closed once both directions ended)."""
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass  # the other side went away (a killed node): the connection ends
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_done.wait(timeout=120)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
