"""The node's APScheduler: periodic jobs (stability scan, send, lease and worker checks, retention) and the
one-shot stability scans timed for the end of each study's quiet period.

One BackgroundScheduler per node, built from the settings and passed down (no global scheduler).
Every periodic job coalesces missed runs and never overlaps itself, so a slow scan cannot pile up.
"""

from __future__ import annotations

import logging
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

    Every committed source instance re-arms its study's one-shot (an APScheduler date job per study, replaced
    by the next instance; ~25 us). The periodic scan stays: it forces `max_wait_seconds` completions and covers
    studies received before a restart. The scan decides; a wake-up that finds nothing due does nothing.
    """

    def __init__(self, scheduler: BackgroundScheduler, settings: Settings, scan: Callable[[], Any]) -> None:
        self.scheduler = scheduler
        self.quiet = timedelta(seconds=settings.stability.stable_seconds + QUIET_END_MARGIN_SECONDS)
        self.scan = scan

    def _run(self) -> None:
        try:
            self.scan()
        except Exception:
            log.exception("stability scan at the end of a quiet period failed; the periodic scan will retry")

    def note_instance(self, study_instance_uid: str) -> None:
        """A source instance of the study was just committed: its quiet period ends `stable_seconds` from now."""
        self.scheduler.add_job(
            self._run,
            "date",
            run_date=datetime.now(UTC) + self.quiet,
            id=f"quiet-end:{study_instance_uid}",
            name="stability scan at quiet end",
            replace_existing=True,
        )


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
