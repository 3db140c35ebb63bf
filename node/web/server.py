"""Runs the dashboard with uvicorn in a background thread of the node process.

`edgenode serve` owns the process; the web server is one more thread in it, bound to
web.host:web.port (127.0.0.1 unless the operator configures otherwise).
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from db.session import Database
from node.config import Settings
from node.web.app import create_app
from node.web.token import resolve_token

log = logging.getLogger(__name__)


class WebServer:
    """The dashboard, REST API and /metrics on a uvicorn server in a daemon thread."""

    def __init__(self, settings: Settings, db: Database, startup_timeout: float = 30.0) -> None:
        self.settings = settings
        self.db = db
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
        app = create_app(self.settings, self.db, token=token)
        config = uvicorn.Config(
            app,
            host=self.settings.web.host,
            port=self.settings.web.port,
            log_config=None,  # keep the node's logging setup
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="edgenode-web", daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self._server = self._thread = None
                raise RuntimeError(
                    f"web dashboard could not listen on {self.settings.web.host}:{self.settings.web.port} "
                    "(port in use or address not available? set [web] host/port)"
                )
            time.sleep(0.02)
        sockets = [s for srv in server.servers for s in srv.sockets]
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.settings.web.port
        log.info("web dashboard listening on %s", self.url)

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
