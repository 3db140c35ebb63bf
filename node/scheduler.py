"""The node's APScheduler: periodic jobs (stability scan, send, lease and worker checks, retention) and the
one-shot stability scans timed for the end of each study's quiet period.

One BackgroundScheduler per node, built from the settings and passed down (no global scheduler).
Every periodic job coalesces missed runs and never overlaps itself, so a slow scan cannot pile up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from node.config import Settings

log = logging.getLogger(__name__)


def build_scheduler() -> BackgroundScheduler:
    """One background scheduler for the node's periodic work, in UTC; a late run is coalesced, never doubled."""
    return BackgroundScheduler(
        timezone="UTC",
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
    )


def register_periodic(scheduler: BackgroundScheduler, job_id: str, func: Callable[[], Any], seconds: float) -> None:
    """Run `func` every `seconds` (replacing a job with the same id); exceptions are logged, not fatal."""

    def guarded() -> None:
        try:
            func()
        except Exception:
            log.exception("periodic job %s failed", job_id)

    scheduler.add_job(guarded, "interval", seconds=seconds, id=job_id, name=job_id, replace_existing=True)


def register_stability_scan(scheduler: BackgroundScheduler, settings: Settings, scan: Callable[[], Any]) -> None:
    register_periodic(scheduler, "stability-scan", scan, settings.stability.scan_interval_seconds)


QUIET_END_MARGIN_SECONDS = 0.01  # after the quiet period: the scan must find the study due, not a hair early


class QuietEndWaker:
    """Runs the stability scan once the moment a study's quiet period ends, instead of leaving the study to the
    next periodic scan (which adds up to `scan_interval_seconds` to every study's latency).

    Every committed source instance notes its study's time (a dictionary entry: it comes for every image, from
    the listener or its processes). The first arms a one-shot APScheduler job for `stable_seconds` later; when it
    fires and the study has had an instance since, it is armed again for the rest of the quiet period, else it
    scans. (Re-arming the job for every image cost the scheduler a job object and a wake-up per image.) The
    periodic scan stays: it forces `max_wait_seconds` completions and covers studies received before a restart.
    The scan decides; a wake-up that finds nothing due does nothing.
    """

    def __init__(
        self,
        scheduler: BackgroundScheduler,
        settings: Settings,
        scan: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
        lag_seconds: float = 0.0,
    ) -> None:
        """`lag_seconds`: how much later than noted a study's newest instance may be (listener processes note a
        study at most every so often): the scan waits that much longer, so it never comes early."""
        self.scheduler = scheduler
        self.quiet = settings.stability.stable_seconds + QUIET_END_MARGIN_SECONDS + lag_seconds
        self.scan = scan
        self._clock = clock
        self._latest: dict[str, float] = {}  # study -> clock time of its latest instance, while a job is armed
        self._lock = threading.Lock()

    def note_instance(self, study_instance_uid: str) -> None:
        """A source instance of the study was just committed: its quiet period ends `stable_seconds` from now."""
        with self._lock:
            armed = study_instance_uid in self._latest
            self._latest[study_instance_uid] = self._clock()
        if not armed:
            self._arm(study_instance_uid, self.quiet)

    def _arm(self, study_instance_uid: str, seconds: float) -> None:
        self.scheduler.add_job(
            self._quiet_end,
            "date",
            run_date=datetime.now(UTC) + timedelta(seconds=seconds),
            args=(study_instance_uid,),
            id=f"quiet-end:{study_instance_uid}",
            name="stability scan at quiet end",
            replace_existing=True,
        )

    def _quiet_end(self, study_instance_uid: str) -> None:
        with self._lock:
            latest = self._latest.get(study_instance_uid, float("-inf"))
            remaining = latest + self.quiet - self._clock()
            if remaining <= 0:
                self._latest.pop(study_instance_uid, None)
        if remaining > 0:  # instances came meanwhile: the quiet period ends later
            self._arm(study_instance_uid, remaining)
            return
        try:
            self.scan()
        except Exception:
            log.exception("stability scan at the end of a quiet period failed; the periodic scan will retry")


class SchedulerComponent:
    """Start/stop adapter so the scheduler sits in the node's component list."""

    name = "scheduler"

    def __init__(self, scheduler: BackgroundScheduler) -> None:
        self.scheduler = scheduler

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
