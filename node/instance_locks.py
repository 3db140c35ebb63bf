"""One store at a time per SOP Instance UID, across the listener's threads and the node's listener processes.

The listener looks the UID up, writes the file and commits its row as one step: a second copy arriving meanwhile
must find the first one indexed (a duplicate, answered from the kept copy), never write over its file. The UIDs
are spread over STRIPES locks; with several listener processes each stripe is also a byte of a lock file, locked
with POSIX record locks (fcntl) that the kernel drops if the holding process dies.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STRIPES = 64
DEADLOCK_RETRY_SECONDS = 0.001


class InstanceLocks:
    def __init__(self, shared_path: Path | None = None) -> None:
        """`shared_path`: the lock file the node's listener processes share (None: this process is the only one)."""
        self._threads = [threading.Lock() for _ in range(STRIPES)]
        self._path = shared_path
        self._fd: int | None = None
        self._open_lock = threading.Lock()

    def _file(self) -> int:
        with self._open_lock:
            if self._fd is None:
                assert self._path is not None
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            return self._fd

    @contextmanager
    def holding(self, sop_instance_uid: str) -> Iterator[None]:
        stripe = hashlib.blake2s(sop_instance_uid.encode(), digest_size=2).digest()[0] % STRIPES
        with self._threads[stripe]:  # first: record locks do not exclude the threads of one process
            if self._path is None:
                yield
                return
            import fcntl  # POSIX; the node runs one listener process where it is missing

            fd = self._file()
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX, 1, stripe)
                    break
                except OSError as exc:
                    # Record locks belong to the process: listener A holding stripe 3 waiting for 5 while listener
                    # B holds 5 and waits for 3 looks like a deadlock to the kernel, though the holders and the
                    # waiters are different threads and no holder waits for anything. Wait and try again.
                    if exc.errno != errno.EDEADLK:
                        raise
                    time.sleep(DEADLOCK_RETRY_SECONDS)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, stripe)
