"""The running job's lease, renewed in the background while the worker computes.

A worker that stops beating (crashed, hung, partitioned from the database) loses the job when its lease
expires; `lost` tells the worker itself, so it stops queueing results for a job that is no longer its.
"""

from __future__ import annotations

import logging
import threading
import time

from db.jobs import heartbeat
from db.session import Database
from node.config import Settings

log = logging.getLogger(__name__)


class JobAborted(Exception):
    """The worker lost the job's lease (superseded by a newer job, or stalled past its lease)."""


class Heartbeat:
    """Extends the job's lease in the background; flags `lost` when the lease is no longer ours."""

    def __init__(self, db: Database, job_id: int, owner: str, settings: Settings) -> None:
        self._db, self._job_id, self._owner, self._settings = db, job_id, owner, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        jobs = self._settings.jobs
        last_renewed = time.monotonic()
        while not self._stop.wait(jobs.heartbeat_seconds):
            try:
                with self._db.session() as session:
                    if not heartbeat(session, self._job_id, self._owner, jobs.lease_seconds):
                        self.lost.set()
                        return
                last_renewed = time.monotonic()
            except Exception:  # noqa: BLE001 - a database hiccup: keep beating, the lease has time left
                log.exception("job %s: could not renew the lease; trying again", self._job_id)
                if time.monotonic() - last_renewed >= jobs.lease_seconds:  # others may have taken the job by now
                    self.lost.set()
                    return

    def check(self) -> None:
        if self.lost.is_set():
            raise JobAborted(f"job {self._job_id} is no longer ours (superseded or lease expired)")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
