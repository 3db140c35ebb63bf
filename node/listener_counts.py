"""What the DICOM listener holds, counted for its per-node limits: open associations (`node.max_associations`),
connections waiting at the gate per source address (`node.max_pending_per_address`), and each listener's load.

One listener (in the main process): `LocalCounts`, dictionaries under a lock. Several listener processes
(node/listeners.py): `SharedCounts`, one table in shared memory that all of them read and change under a file
lock (the kernel releases it if its holder dies), so the limits stay per node whichever process a connection
reaches. Each listener has a row of its own; the node clears a dead listener's row before starting it again, so the
connections the kernel closed with it stop counting. Waiting connections are counted in CELLS cells per row, chosen
by a keyed hash of the source address (a random key per node start): two addresses rarely share a cell, and if
they do they share the cap, which is stricter, never looser.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

CELLS = 4096  # waiting-connection cells per listener
ASSOCIATIONS, WAITING = 0, 1  # a row: open associations, connections waiting at the gate, then the cells
ROW = 2 + CELLS


class AdmissionCounts(Protocol):
    def take_waiting(self, address: str, limit: int) -> tuple[bool, int]:
        """Count a new connection from `address` as waiting, unless `limit` already wait: (taken, waiting before)."""
        ...

    def end_waiting(self, address: str) -> None: ...

    def take_association(self, limit: int) -> bool:
        """Count one more open association, unless `limit` are open."""
        ...

    def end_association(self) -> None: ...

    def busier_than_others(self) -> bool:
        """Whether another listener holds fewer connections than this one (it should take the next one)."""
        ...


class LocalCounts:
    """The counts of a node with one listener."""

    def __init__(self) -> None:
        self._waiting: dict[str, int] = {}
        self._associations = 0
        self._lock = threading.Lock()

    def take_waiting(self, address: str, limit: int) -> tuple[bool, int]:
        with self._lock:
            waiting = self._waiting.get(address, 0)
            if waiting >= limit:
                return False, waiting
            self._waiting[address] = waiting + 1
            return True, waiting

    def end_waiting(self, address: str) -> None:
        with self._lock:
            left = self._waiting.get(address, 1) - 1
            if left > 0:
                self._waiting[address] = left
            else:
                self._waiting.pop(address, None)

    def take_association(self, limit: int) -> bool:
        with self._lock:
            if self._associations >= limit:
                return False
            self._associations += 1
            return True

    def end_association(self) -> None:
        with self._lock:
            self._associations = max(0, self._associations - 1)

    def busier_than_others(self) -> bool:
        return False


class SharedCounts:
    """The counts of a node's listener processes, in shared memory. Made in the main process, handed to each
    listener when it is spawned, and bound there to its row with `bind(slot)`."""

    def __init__(self, listeners: int, lock_path: Path) -> None:
        self.listeners = listeners
        self.lock_path = lock_path
        self.key = os.urandom(16)
        self.table: Any = multiprocessing.get_context("spawn").RawArray(ctypes.c_int32, listeners * ROW)
        self.slot = -1  # the main process's copy counts nothing itself
        self._open_lock()

    def _open_lock(self) -> None:
        self._thread_lock = threading.Lock()  # flock excludes other processes, not this one's threads
        self._fd: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("listeners", "lock_path", "key", "table", "slot")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_lock()

    def bind(self, slot: int) -> SharedCounts:
        self.slot = slot
        return self

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        import fcntl  # POSIX only; node/listeners.py runs one listener (LocalCounts) where it is missing

        with self._thread_lock:
            if self._fd is None:
                self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield self.table
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _cell(self, address: str) -> int:
        digest = hashlib.blake2b(address.encode(), key=self.key, digest_size=8).digest()
        return 2 + int.from_bytes(digest, "little") % CELLS

    def _sum(self, table: Any, column: int) -> int:
        return sum(table[row * ROW + column] for row in range(self.listeners))

    def take_waiting(self, address: str, limit: int) -> tuple[bool, int]:
        cell, mine = self._cell(address), self.slot * ROW
        with self._locked() as table:
            waiting = self._sum(table, cell)
            if waiting >= limit:
                return False, waiting
            table[mine + cell] += 1
            table[mine + WAITING] += 1
            return True, waiting

    def end_waiting(self, address: str) -> None:
        cell, mine = self._cell(address), self.slot * ROW
        with self._locked() as table:
            table[mine + cell] = max(0, table[mine + cell] - 1)
            table[mine + WAITING] = max(0, table[mine + WAITING] - 1)

    def take_association(self, limit: int) -> bool:
        with self._locked() as table:
            if self._sum(table, ASSOCIATIONS) >= limit:
                return False
            table[self.slot * ROW + ASSOCIATIONS] += 1
            return True

    def end_association(self) -> None:
        mine = self.slot * ROW + ASSOCIATIONS
        with self._locked() as table:
            table[mine] = max(0, table[mine] - 1)

    def busier_than_others(self) -> bool:
        table = self.table  # a glance without the lock: a stale value only changes who accepts first

        def load(row: int) -> int:
            return int(table[row * ROW + ASSOCIATIONS] + table[row * ROW + WAITING])

        mine = load(self.slot)
        return any(load(row) < mine for row in range(self.listeners) if row != self.slot)

    def clear(self, slot: int) -> None:
        """Forget what listener `slot` held (it died; the kernel closed its connections)."""
        size = ctypes.sizeof(ctypes.c_int32)
        with self._locked() as table:
            ctypes.memset(ctypes.addressof(table) + slot * ROW * size, 0, ROW * size)

    def associations(self) -> int:
        with self._locked() as table:
            return self._sum(table, ASSOCIATIONS)
