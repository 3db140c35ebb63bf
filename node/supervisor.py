"""The worker processes of `edgenode serve`: started, restarted when they die (backing off if they keep
dying), stopped with the node. A worker's own life (claim, run, exit when orphaned) is in node.worker."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

from node.config import Settings
from node.identity import node_identity, worker_owner
from node.sender import EventLike
from node.worker import worker_main

log = logging.getLogger(__name__)

RESTART_BACKOFF_SECONDS = (1.0, 300.0)  # first and longest wait before restarting a process that keeps dying
STABLE_RUN_SECONDS = 60.0  # a process that ran this long before it died is not crash-looping: back to the first wait

SPAWN = multiprocessing.get_context("spawn")  # workers never fork the serve process's threads and sockets


def shared_event() -> EventLike:
    """An event the serve process and its worker processes share (made in the context workers start in)."""
    return SPAWN.Event()


class RestartSchedule:
    """When a child process that died may start again, per slot: after 1 s, doubling up to 5 min while it keeps
    dying within a minute of its start (the inference workers below, and node/listeners.py's listeners)."""

    def __init__(self) -> None:
        self._failures: dict[int, int] = {}  # slot -> consecutive early exits
        self._not_before: dict[int, float] = {}  # slot -> monotonic time of the next allowed start

    def note_exit(self, slot: int, started_at: float, now: float) -> float | None:
        """The child in `slot` is found dead: the wait before its restart, or None if already scheduled."""
        if slot in self._not_before:
            return None
        if now - started_at > STABLE_RUN_SECONDS:
            self._failures[slot] = 0
        failures = self._failures.get(slot, 0) + 1
        self._failures[slot] = failures
        first, longest = RESTART_BACKOFF_SECONDS
        delay = min(first * 2 ** (failures - 1), longest)
        self._not_before[slot] = now + delay
        return delay

    def due(self, slot: int, now: float) -> bool:
        """Whether the restart of `slot` is due now (it is then no longer scheduled)."""
        if now < self._not_before.get(slot, now):
            return False
        self._not_before.pop(slot, None)
        return True


class WorkerSupervisor:
    """Keeps `inference.workers` worker processes alive; restarts any that die, backing off if they keep dying."""

    name = "workers"

    def __init__(self, settings: Settings, results_queued: EventLike | None = None) -> None:
        self.settings = settings
        self._procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self._slots: dict[str, int] = {}  # owner -> slot
        self._restarts = RestartSchedule()
        self._lock = threading.Lock()
        self._stopping = False
        self._generation = 0
        self._started_at: dict[str, float] = {}
        self._wake = shared_event()  # set by wake(): new jobs; every worker process shares it
        self._results_queued = results_queued  # set by workers when they queued results: the sender's wake-up
        self.identity = node_identity(settings.data_dir)  # prefixes its workers' lease owner ids

    def _spawn(self, slot: int) -> None:
        self._generation += 1
        owner = worker_owner(self.identity, slot, self._generation)
        proc = SPAWN.Process(
            target=worker_main,
            args=(self.settings.model_dump_json(), owner, slot, self._wake, self._results_queued),
            name=owner,
        )
        proc.start()
        self._procs[owner] = proc
        self._slots[owner] = slot
        self._started_at[owner] = time.monotonic()

    def start(self) -> None:
        with self._lock:
            for slot in range(self.settings.inference.workers):
                self._spawn(slot)

    def check(self) -> None:
        """Restart dead workers (called periodically by the scheduler).

        While start() or stop() holds the lock (a stop joins workers for up to its timeout) this check returns at
        once: blocking would overlap its own next run, which APScheduler skips with a warning every interval.
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._stopping:
                return
            now = time.monotonic()
            for owner, proc in list(self._procs.items()):
                if proc.is_alive():
                    continue
                slot = self._slots[owner]
                delay = self._restarts.note_exit(slot, self._started_at.get(owner, now), now)
                if delay is not None:
                    log.error("worker %s exited with code %s; restarting in %.0f s", owner, proc.exitcode, delay)
                if self._restarts.due(slot, now):
                    del self._procs[owner], self._slots[owner]
                    self._started_at.pop(owner, None)
                    self._spawn(slot)
        finally:
            self._lock.release()

    def wake(self) -> None:
        """New jobs are queued: idle workers claim now instead of at their next poll (IDLE_POLL_SECONDS)."""
        self._wake.set()

    def alive_count(self) -> int:
        """Worker processes running now (for /healthz: a crash-looping worker is mostly not)."""
        return len(self.pids())

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.pid is not None and p.is_alive()]

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True  # set before taking the lock: a check() that is waiting must not restart anyone
        with self._lock:
            for proc in self._procs.values():
                if proc.is_alive() and proc.pid:
                    os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in self._procs.values():
                proc.join(max(0.1, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            self._procs.clear()
            self._slots.clear()
