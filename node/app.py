"""The running node: database, spool, listener and scheduler wired together as components.

`EdgeNode.start()` first recovers the spool after an unclean stop (temp files removed; files that were
renamed into place but never committed to the database are deleted: the sender never got Success for
them and still holds them), then starts the components in order. `stop()` stops the listener first
(stop accepting, finish in-flight stores), then the others in reverse order, and leaves a clean-stop marker
when every component stopped cleanly, so the next start can skip the full spool scan.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Protocol

from db.ingest import IngestIndex
from db.jobs import requeue_expired, requeue_owned_by
from db.models import AuditEventType
from db.session import Database
from node.config import Settings
from node.identity import node_identity
from node.listeners import NOTE_INTERVAL_SECONDS, ListenerPool, shared_listeners_supported
from node.outbound import release_own_claims
from node.retention import run_retention
from node.scheduler import (
    QuietEndWaker,
    SchedulerComponent,
    build_scheduler,
    register_periodic,
    register_stability_scan,
)
from node.scp import StorageSCP
from node.sender import ResultSender
from node.spool import Spool
from node.stability import StabilityScanner
from node.supervisor import WorkerSupervisor, shared_event

log = logging.getLogger(__name__)

CLEAN_STOP_MARKER = "clean-stop"
# On a spool other nodes may share, a file younger than this that no row names may be another node's store in
# flight (renamed into place, its row not committed yet): start-up recovery leaves it alone.
SHARED_ORPHAN_AGE_SECONDS = 3600.0


class Component(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ListenerComponent:
    name = "listener"

    def __init__(self, scp: StorageSCP, grace_seconds: float) -> None:
        self.scp = scp
        self.grace_seconds = grace_seconds

    def start(self) -> None:
        self.scp.start()

    def stop(self) -> None:
        self.scp.stop(self.grace_seconds)


class EdgeNode:
    """One node process: listener (or listener processes), scheduler (stability scan, lease check, retention), the
    result sender, inference worker processes and the web dashboard. Stopped listener first (its drain is what a
    short stop grace must cover), then the others in reverse start order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.database_url)
        self.identity = node_identity(settings.data_dir)
        self.spool = Spool(settings.spool_dir, writer=self.identity)
        self.index = IngestIndex(self.db, spool_id=self.spool.id)
        self.scheduler = build_scheduler()
        self.stability = StabilityScanner(settings, self.db, self.index)
        # The node's only sender: woken by the workers (through this event) when they queued results.
        self.sender = ResultSender(settings, self.db, self.spool, shared_event())
        self.workers: WorkerSupervisor | None = None
        if settings.inference.workers > 0:
            self.workers = WorkerSupervisor(settings, results_queued=self.sender.results_queued)
        register_stability_scan(self.scheduler, settings, self.scan_studies)
        # One listener in this process, or several listener processes on the port (node/listeners.py).
        self.scp: StorageSCP | None = None
        self.listeners: ListenerPool | None = None
        listener: Component
        count = settings.node.listener_count()
        if count > 1 and not shared_listeners_supported():
            log.warning(
                "node.listeners = %s: several listener processes need POSIX file locks, which this platform lacks; "
                "running one listener",
                settings.node.listeners,
            )
            count = 1
        on_source_instance = None
        if settings.stability.scan_at_quiet_end:
            lag = NOTE_INTERVAL_SECONDS if count > 1 else 0.0
            on_source_instance = QuietEndWaker(
                self.scheduler, settings, self.scan_studies, lag_seconds=lag
            ).note_instance
        if count > 1:
            self.listeners = listener = ListenerPool(settings, self.identity, on_source_instance=on_source_instance)
        else:
            self.scp = StorageSCP(settings, self.spool, self.index, on_source_instance=on_source_instance)
            listener = ListenerComponent(self.scp, settings.node.shutdown_grace_seconds)
        self.components: list[Component] = [
            SchedulerComponent(self.scheduler),
            listener,
            self.sender,  # stopped after the workers (reverse order): results they queued while stopping still go
        ]
        if self.workers is not None:
            self.components.append(self.workers)
            register_periodic(self.scheduler, "worker-check", self.workers.check, 2.0)
        register_periodic(
            self.scheduler, "lease-check", self.requeue_expired_jobs, max(1.0, settings.jobs.lease_seconds / 4)
        )
        if settings.retention.enabled:
            register_periodic(
                self.scheduler, "retention", self.apply_retention, settings.retention.interval_minutes * 60
            )
        if settings.web.enabled:
            from node.web.server import WebServer

            self.web: WebServer | None = WebServer(
                settings, self.db, workers_alive=self.workers.alive_count if self.workers else None
            )
            self.components.append(self.web)
        else:
            self.web = None
        self._started: list[Component] = []
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The DICOM port the node listens on (the bound one when the configured port is 0)."""
        if self.listeners is not None:
            return self.listeners.port
        assert self.scp is not None
        return self.scp.port

    @property
    def marker(self) -> Path:
        return self.settings.data_dir / CLEAN_STOP_MARKER

    def add_component(self, component: Component) -> None:
        if self._started:
            raise RuntimeError("add components before start()")
        self.components.append(component)

    def scan_studies(self) -> list[int]:
        """The stability scan; workers are woken when it created jobs (they need not wait for their next poll)."""
        created = self.stability.scan()
        if created and self.workers is not None:
            self.workers.wake()
        return created

    def requeue_expired_jobs(self) -> None:
        with self.db.session() as session:
            requeued = requeue_expired(
                session,
                max_attempts=self.settings.jobs.max_attempts,
                backoff_seconds=self.settings.jobs.retry_backoff_seconds,
            )
        if requeued:
            log.warning("jobs %s: their workers stopped heart-beating; back in the queue", requeued)

    def apply_retention(self) -> None:
        run_retention(self.settings, self.db, self.settings.spool_dir)

    def start(self) -> None:
        self.recover_spool()
        # No worker of ours is alive yet: the jobs our earlier workers held go back to the queue; other nodes' stay.
        with self.db.session() as session:
            requeued = requeue_owned_by(session, prefix=self.identity + "/")
        if requeued:
            log.warning("jobs %s were running when the node stopped; back in the queue", requeued)
        release_own_claims(self.settings, self.db)  # this node's dead senders' claims due at once; other nodes' stay
        try:
            for component in self.components:
                component.start()
                self._started.append(component)
        except BaseException:
            self.stop()
            raise
        self.index.record_event(
            AuditEventType.NODE_STARTED, called_ae=self.settings.node.ae_title, detail=f"port {self.port}"
        )

    def recover_spool(self) -> tuple[list[str], list[str]]:
        """After an unclean stop: remove temp files and spool files the database does not know."""
        if self.marker.exists():
            self.marker.unlink()
            return [], []
        temps = self.spool.cleanup_temp()  # only this node's (their names carry its identity)
        known = set(self.index.iter_instance_paths())
        orphans = [rel for rel in self.spool.iter_instance_files() if rel not in known]
        if self.settings.node.spool_dir is not None:  # a spool of its own (<data_dir>/spool) has no other writer
            oldest = time.time() - SHARED_ORPHAN_AGE_SECONDS
            orphans = [rel for rel in orphans if _modified_before(self.spool.path(rel), oldest)]
        for rel in orphans:
            self.spool.delete(rel)
        if temps or orphans:
            log.warning(
                "spool recovery: removed %d temp file(s) and %d unacknowledged file(s)", len(temps), len(orphans)
            )
            self.index.record_event(
                AuditEventType.INSTANCE_REJECTED,
                outcome="warning",
                detail=f"recovery after unclean stop: removed {len(temps)} temp and {len(orphans)} unindexed "
                "file(s) that were never acknowledged",
            )
        return temps, orphans

    def stop(self) -> None:
        with self._stop_lock:
            if self._stopped.is_set():
                return
            # The listener first, so its drain (stores in flight finish) fits a short grace such as `docker stop`'s;
            # then the rest in reverse start order.
            ordered = sorted(reversed(self._started), key=lambda c: c.name != ListenerComponent.name)
            clean = len(self._started) == len(self.components)
            for component in ordered:
                try:
                    component.stop()
                except Exception:
                    clean = False  # start-up recovery must then check the spool again
                    log.exception("stopping %s failed", component.name)
            self._started.clear()
            if self.listeners is not None and self.listeners.crashed:
                clean = False  # a listener process died: it may have left files renamed into place but never indexed
            try:
                self.index.record_event(AuditEventType.NODE_STOPPED, called_ae=self.settings.node.ae_title)
            except Exception:
                log.exception("could not record node.stopped")
            self.db.dispose()
            if clean:
                fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
                os.fsync(fd)
                os.close(fd)
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() has finished; True if it has."""
        return self._stopped.wait(timeout)


def _modified_before(path: Path, when: float) -> bool:
    try:
        return path.stat().st_mtime < when
    except FileNotFoundError:
        return False
