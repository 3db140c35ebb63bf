"""Runs the dashboard with uvicorn in a background thread of the node process.

`edgenode serve` owns the process; the web server is one more thread in it, bound to
web.host:web.port (127.0.0.1 unless the operator configures otherwise).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from db.session import Database
from node.config import Settings
from node.web.app import create_app
from node.web.token import resolve_token

log = logging.getLogger(__name__)


class WebPortUnavailable(OSError):
    """The dashboard's address cannot be bound; the message names it and the setting to change."""


class WebServer:
    """The dashboard, REST API and /metrics on a uvicorn server in a daemon thread.

    Has `name`, `start()` and `stop()`, so `EdgeNode.add_component(WebServer(settings, node.db))` runs it.
    """

    name = "web"

    def __init__(
        self,
        settings: Settings,
        db: Database,
        startup_timeout: float = 30.0,
        workers_alive: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.workers_alive = workers_alive
        self.startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None  # the bound port (differs from web.port when that is 0)

    @property
    def url(self) -> str:
        host = self.settings.web.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def start(self) -> None:
        """Start serving; returns once the socket listens, raises RuntimeError if it cannot."""
        if self._thread is not None:
            raise RuntimeError("web server already started")
        token = resolve_token(self.settings)
        app = create_app(self.settings, self.db, token=token, workers_alive=self.workers_alive)
        config = uvicorn.Config(
            app,
            host=self.settings.web.host,
            port=self.settings.web.port,
            log_config=None,  # keep the node's logging setup
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        listener = self._bind()
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="edgenode-web", daemon=True)
        self._server, self._thread = server, thread
        self.port = int(listener.getsockname()[1])
        thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                listener.close()
                self._server = self._thread = None
                raise RuntimeError(f"web dashboard did not start on {self.url}")
            time.sleep(0.02)
        log.info("web dashboard listening on %s", self.url)

    def _bind(self) -> socket.socket:
        """Bind here, not in the server thread, so a busy port is a clear error at start()."""
        host, port = self.settings.web.host, self.settings.web.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            listener.close()
            raise WebPortUnavailable(
                exc.errno, f"web dashboard could not listen on {host}:{port}: {exc.strerror} (set [web] host/port)"
            ) from exc
        listener.listen(128)
        return listener

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the thread (idempotent)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._server = self._thread = None
        log.info("web dashboard stopped")
