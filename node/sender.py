"""The node's one result sender: a thread in the serve process, woken when results are queued.

Workers never open an association: they queue results and set `results_queued` (a multiprocessing Event
shared with every worker process). The sender then runs a pass at once, and every `send.interval_seconds`
regardless (retries whose backoff has run out, items revived by `edgenode outbound retry`). The event is
cleared before each pass, so results queued during a pass are sent by the next one, never slept through.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from db.session import Database
from node.config import Settings
from node.outbound import send_due
from node.spool import Spool

log = logging.getLogger(__name__)


class EventLike(Protocol):
    """A multiprocessing.Event (or threading.Event) as the sender and the workers use it."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class ResultSender:
    """Delivers queued results from the serve process: on `results_queued`, else every send interval."""

    name = "sender"

    def __init__(self, settings: Settings, db: Database, spool: Spool, results_queued: EventLike) -> None:
        self.settings, self.db, self.spool = settings, db, spool
        self.results_queued = results_queued
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def send_once(self) -> None:
        report = send_due(self.settings, self.db, self.spool)
        if report.attempted:
            log.info("sender: %d sent, %d to retry, %d dead", len(report.sent), len(report.retried), len(report.dead))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.results_queued.wait(self.settings.send.interval_seconds)
            if self._stopping.is_set():
                return
            self.results_queued.clear()
            try:
                self.send_once()
            except Exception:  # noqa: BLE001 - the next pass retries; the items stay pending
                log.exception("send pass failed; the next pass retries")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="result-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let a pass in progress finish (an interrupted send is safe, a finished one is quicker), then stop."""
        self._stopping.set()
        self.results_queued.set()  # wake the wait; the flag ends the loop
        if self._thread is not None:
            self._thread.join(timeout)
