"""Liveness facts shared by /healthz, the queue page and /metrics: database reachable, disk free, workers alive."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from db.session import Database
from node.config import Settings
from node.spool import free_disk_bytes

if TYPE_CHECKING:
    from node.inference_server import TritonMonitor


def database_ok(db: Database) -> tuple[bool, str]:
    try:
        db.ping()
    except Exception as exc:  # any driver error means "not reachable"
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


@dataclass(frozen=True)
class Health:
    database_ok: bool
    database_error: str
    disk_free_bytes: int
    min_free_disk_bytes: int
    workers_expected: int = 0
    workers_alive: int | None = None  # None: this process cannot see the workers (web served without them)
    # [inference] backend = "triton": the server's state ("ok", "unreachable", "not ready", "mismatch"); None: local
    inference_server: str | None = None
    inference_server_detail: str = ""

    @property
    def disk_ok(self) -> bool:
        return self.disk_free_bytes >= self.min_free_disk_bytes

    @property
    def workers_ok(self) -> bool:
        return self.workers_alive is None or self.workers_alive >= self.workers_expected

    @property
    def inference_server_ok(self) -> bool:
        return self.inference_server in (None, "ok")

    @property
    def ok(self) -> bool:
        return self.database_ok and self.disk_ok and self.workers_ok and self.inference_server_ok

    def as_dict(self, detail: bool = True) -> dict[str, object]:
        """`detail=False` for the unauthenticated /healthz: a driver's error text can name hosts and users."""
        unreachable = f"unreachable: {self.database_error}" if detail else "unreachable (details: /api/queue, log)"
        server: dict[str, object] = {}
        if self.inference_server is not None:  # jobs wait (and are retried) while it is not "ok"
            server["inference_server"] = self.inference_server
            if detail and self.inference_server_detail:
                server["inference_server_detail"] = self.inference_server_detail
        return {
            "status": "ok" if self.ok else "unhealthy",
            "database": "ok" if self.database_ok else unreachable,
            "disk": "ok" if self.disk_ok else "low",
            "disk_free_bytes": self.disk_free_bytes,
            "min_free_disk_bytes": self.min_free_disk_bytes,
            "workers": "not visible here"
            if self.workers_alive is None
            else ("ok" if self.workers_ok else f"{self.workers_alive} of {self.workers_expected} alive"),
            **server,
        }


def check_health(
    settings: Settings,
    db: Database,
    workers_alive: Callable[[], int] | None = None,
    triton: TritonMonitor | None = None,
) -> Health:
    """`workers_alive` counts the inference worker processes running now (a crash-looping worker is not);
    `triton` asks the inference server whether it serves the node's model (backend "triton")."""
    ok, error = database_ok(db)
    server = triton.state() if triton is not None else None
    return Health(
        inference_server=None if server is None else server.state,
        inference_server_detail="" if server is None else server.detail,
        database_ok=ok,
        database_error=error,
        disk_free_bytes=free_disk_bytes(settings.data_dir),
        min_free_disk_bytes=settings.node.min_free_disk_mb * 1024 * 1024,
        workers_expected=settings.inference.workers,
        workers_alive=None if workers_alive is None else workers_alive(),
    )
