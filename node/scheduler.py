"""The node's APScheduler: periodic jobs (stability scan now; dispatch, send and retention later).

One BackgroundScheduler per node, built from the settings and passed down (no global scheduler).
Every periodic job coalesces missed runs and never overlaps itself, so a slow scan cannot pile up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from node.config import Settings

log = logging.getLogger(__name__)


def build_scheduler(settings: Settings) -> BackgroundScheduler:
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
