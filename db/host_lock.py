"""A write lock for the processes of one host that share a SQLite database file.

SQLite lets one writer in at a time and makes the others poll: a writer that finds the database locked sleeps
1, 2, 5, 10 ... ms (its busy handler) before it looks again. Within one process `IngestIndex` avoids that with a
thread lock; a node with several listener processes (node/listeners.py) would still poll between them, each
time a commit of one overlaps a commit of another. `HostWriteLock` adds a file lock (`flock` on
`<database>.write-lock`) that waiting processes block on and that the kernel hands to the next one the moment it
is released (or its holder dies). On a server database (PostgreSQL) the rows lock themselves: the thread lock
alone, as before.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # not POSIX: one listener process only (node/listeners.py), the thread lock is enough
    fcntl = None  # type: ignore[assignment]


class HostWriteLock:
    """A thread lock, plus (with `path`) a file lock that the same host's other processes take too."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if fcntl is not None else None
        self._thread_lock = threading.Lock()  # flock does not exclude this process's own threads
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (False: `blocking` is off and another thread or process holds it)."""
        if not self._thread_lock.acquire(blocking):
            return False
        if self.path is not None:
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._thread_lock.release()
                return False
            except BaseException:
                self._thread_lock.release()
                raise
        return True

    def release(self) -> None:
        try:
            if self.path is not None and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def __enter__(self) -> HostWriteLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def sqlite_write_lock_path(url: str) -> Path | None:
    """`<database file>.write-lock` for a SQLite file URL; None for other databases and in-memory SQLite."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).with_name(Path(parsed.database).name + ".write-lock")
