"""The outbound queue: result files in the spool, one row per (result, destination), delivered with backoff.

Durability contract:
- `enqueue` writes every file durably (spool: temp, fsync, rename, dir fsync) before the rows that point
  at them are committed, so a committed item always has its file. A crash in between leaves an orphan
  file that the next enqueue of the same job overwrites.
- An item is marked sent only after the peer's C-STORE response, committed before the next file goes.
  If the process dies between the acknowledgement and that commit, the item is still pending and the
  same file (same SOP Instance UID) is sent again after restart; a PACS treats it as the same object
  (Orthanc keeps one copy), so the worst case is one duplicate transfer, never a lost or duplicated object.
- Files are never deleted here: removing delivered files is retention's job.

`send_due` runs one pass at a time per data directory: an flock on <data_dir>/outbound.lock makes a
concurrent pass (the CLI's `outbound send` beside the scheduler, or a second thread) return at once. It
holds no state between calls, so a restart only needs the database and the spool.
"""

from __future__ import annotations

import fcntl
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.audit import record_audit
from db.jobs import LeaseLost, update_timings
from db.models import AuditEventType, Job, OutboundItem, OutboundStatus, Result
from db.outbound import Backoff, DueItem, add_outbound, due_items, mark_failed, mark_sent, requeue, upsert_result
from db.session import Database
from node.config import PeerSettings, Settings
from node.scu import OutgoingFile, StoreOutcome, store_files
from node.spool import RESULTS_DIR, Spool, safe_component

if TYPE_CHECKING:  # results pulls in highdicom and matplotlib; the queue itself does not need them
    from node.results import ResultObject

log = logging.getLogger(__name__)

LOCK_NAME = "outbound.lock"


@dataclass
class SendReport:
    """What one `send_due` pass did (ids of outbound items)."""

    sent: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    untried: list[int] = field(default_factory=list)  # due, but the association was lost before their turn
    busy: bool = False  # another sender held the lock: nothing was attempted

    @property
    def attempted(self) -> int:
        return len(self.sent) + len(self.retried) + len(self.dead)


def result_relpath(ds: Dataset) -> str:
    return "/".join(
        (
            RESULTS_DIR,
            safe_component(str(ds.StudyInstanceUID)),
            safe_component(str(ds.SeriesInstanceUID)),
            safe_component(str(ds.SOPInstanceUID)) + ".dcm",
        )
    )


def encode(ds: Dataset) -> bytes:
    """DICOM Part 10 bytes (preamble + file meta), as the object will travel."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def enqueue(
    db: Database,
    spool: Spool,
    job_id: int,
    objects: Sequence[ResultObject],
    destination: PeerSettings,
    now: datetime | None = None,
    still_ours: Callable[[Session], bool] | None = None,
) -> list[int]:
    """Store the objects in the spool and queue each for `destination`; returns the outbound item ids.

    Enqueuing the same job's objects again (same SOP Instance UIDs) refreshes the files and adds a new
    pending item only where none is pending, so a re-run resends each object once. `still_ours(session)` runs
    first in the queueing transaction (a worker's conditional lease renewal): if it says the job is no longer
    the caller's (superseded, re-queued), nothing is queued and `LeaseLost` is raised.
    """
    now = now or datetime.now(UTC)
    stored = [(obj, spool.write_atomic(result_relpath(obj.dataset), encode(obj.dataset))) for obj in objects]
    item_ids = []
    with db.session() as session:
        if still_ours is not None and not still_ours(session):
            raise LeaseLost(f"job {job_id} is no longer this worker's; its results were not queued")
        job = session.get_one(Job, job_id)
        study = job.study
        for obj, file in stored:
            ds = obj.dataset
            result = upsert_result(
                session,
                job_id=job_id,
                kind=obj.kind,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                path=file.relpath,
                size_bytes=file.size,
            )
            item = add_outbound(session, result, destination.ae_title, destination.host, destination.port, now)
            record_audit(
                session,
                AuditEventType.RESULT_CREATED,
                called_ae=destination.ae_title,
                patient_id=study.patient_id,
                accession_number=study.accession_number,
                study_instance_uid=study.study_instance_uid,
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                job_id=job_id,
                detail=f"{obj.kind} {file.size} bytes sha256 {file.sha256}",
            )
            item_ids.append(item.id)
    log.info("job %s: queued %d result object(s) for %s", job_id, len(item_ids), destination.ae_title)
    return item_ids


def backoff_of(settings: Settings) -> Backoff:
    return Backoff(
        initial_seconds=settings.send.initial_backoff_seconds,
        max_seconds=settings.send.max_backoff_seconds,
        max_attempts=settings.send.max_attempts,
    )


@contextmanager
def sender_lock(data_dir: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on <data_dir>/outbound.lock; yields whether it was obtained.

    It keeps `edgenode outbound send` and the running node's scheduler (or two threads) from sending the
    same items at once; the kernel drops it when the holder dies, so a killed sender never blocks the next.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / LOCK_NAME).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def send_due(settings: Settings, db: Database, spool: Spool, now: datetime | None = None) -> SendReport:
    """One pass: every due pending item, one association per destination, each outcome committed at once.

    Returns at once with `busy` set when another sender (thread or process) holds the lock.
    """
    with sender_lock(settings.data_dir) as held:
        if not held:
            log.info("another sender is running; this pass is skipped")
            return SendReport(busy=True)
        return _send_pass(settings, db, spool, now or datetime.now(UTC))


def pass_clock(start: datetime) -> Callable[[], datetime]:
    """The time of each attempt in a pass that began at `start`: `start` plus the time since.

    A pass can take minutes (a slow PACS, timeouts); each outcome's time (sent_at, the next attempt's backoff)
    counts from when that attempt ended, not from when the pass began. `start` may be a caller's simulated time.
    """
    began = time.monotonic()
    return lambda: start + timedelta(seconds=time.monotonic() - began)


def _send_pass(settings: Settings, db: Database, spool: Spool, now: datetime) -> SendReport:
    backoff = backoff_of(settings)
    report = SendReport()
    clock = pass_clock(now)
    with db.session() as session:
        due = due_items(session, now)
    if not due:
        return report

    # Only to peers still in [[peers]] (their current address and TLS setting): a peer removed from the
    # configuration is no longer trusted with results, so its items wait (backoff, then dead, retryable).
    listed: list[DueItem] = []
    unlisted: list[DueItem] = []
    for item in due:
        (listed if settings.peer(item.destination_ae) is not None else unlisted).append(item)
    for item in unlisted:
        why = f"destination {item.destination_ae} is no longer in [[peers]]; not sent (add it back, then retry)"
        _record(db, StoreOutcome(item.id, None, why), clock(), backoff, report)
    for ae_title, group in groupby(sorted(listed, key=lambda i: i.destination_ae), key=lambda i: i.destination_ae):
        items = list(group)
        files, missing = [], []
        for item in items:
            path = spool.path(item.path)
            try:
                files.append(OutgoingFile.from_path(item.id, path))
            except (OSError, InvalidDicomError, AttributeError) as exc:  # gone or damaged: no retry can fix that
                missing.append(StoreOutcome(item.id, None, f"result file {item.path} unreadable: {exc}"))
        for outcome in missing:
            _record(db, outcome, clock(), backoff, report, give_up=True)
        peer = settings.peer(ae_title)
        assert peer is not None
        for outcome in store_files(settings.node, peer, files):
            _record(db, outcome, clock(), backoff, report)
    log.info(
        "send pass: %d sent, %d to retry, %d dead, %d not tried",
        len(report.sent),
        len(report.retried),
        len(report.dead),
        len(report.untried),
    )
    return report


def _record(
    db: Database, outcome: StoreOutcome, now: datetime, backoff: Backoff, report: SendReport, give_up: bool = False
) -> None:
    """Commit one outcome before the next file is sent (the acknowledgement is durable as soon as possible).

    `now` is when this attempt ended. An item that was never sent (its association was lost before its turn)
    keeps its attempt count and stays due: the next pass tries it, and only a real try counts towards dead.
    """
    if not outcome.tried:
        report.untried.append(outcome.key)
        log.info("outbound item %s not tried in this pass: %s", outcome.key, outcome.error)
        return
    with db.session() as session:
        if outcome.stored:
            assert outcome.status is not None
            item = mark_sent(session, outcome.key, outcome.status, outcome.error, now)
            _note_delivery_time(session, item)
            report.sent.append(outcome.key)
            return
        item = mark_failed(session, outcome.key, outcome.status, outcome.error, now, backoff, give_up=give_up)
        (report.dead if item.status == OutboundStatus.DEAD else report.retried).append(outcome.key)
        log.warning(
            "send of outbound item %s failed (attempt %d, status %s): %s",
            outcome.key,
            item.attempts,
            "none" if outcome.status is None else f"0x{outcome.status:04X}",
            outcome.error,
        )


def _note_delivery_time(session: Session, item: OutboundItem) -> None:
    """Once a job's last pending item is acknowledged, store the delivery time (job done -> last ack) as the
    job's `send` timing, beside its queue_wait/load/infer/encode."""
    job = item.result.job
    if job.finished_at is None:
        return
    pending = session.scalar(
        select(func.count(OutboundItem.id))
        .join(Result, Result.id == OutboundItem.result_id)
        .where(Result.job_id == job.id, OutboundItem.status == OutboundStatus.PENDING)
    )
    if not pending:
        seconds = (datetime.now(UTC) - job.finished_at).total_seconds()
        update_timings(session, job.id, {"send": round(max(seconds, 0.0), 4)})


def retry_dead(db: Database, ids: Sequence[int] | None = None, now: datetime | None = None) -> list[int]:
    """Put dead-lettered items back in the queue (all of them when ids is None); returns the revived ids."""
    with db.session() as session:
        return requeue(session, ids, now or datetime.now(UTC))


def retry_now(db: Database, ids: Sequence[int] | None = None, now: datetime | None = None) -> list[int]:
    """Make items due now (all unsent ones when ids is None): dead ones revived, pending ones in backoff no
    longer waiting, attempts counted afresh. For the operator who has just mended the PACS."""
    with db.session() as session:
        return requeue(session, ids, now or datetime.now(UTC), pending_too=True)
