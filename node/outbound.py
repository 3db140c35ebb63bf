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

Several senders may run at once (nodes sharing the database, `edgenode outbound send` beside the node, two
threads): each item is claimed by one sender (db/outbound.py: a lease on the database's clock, renewed after each
file, ended with the outcome), so each is sent by one sender at a time. A sender that dies leaves its claims to run
out; then any node that can read the files (the same spool: `Spool.id`) takes them over, and at start-up a node
releases the claims of its own senders that are gone at once. A sender whose claim ran out while it stalled records
nothing for that item (the new owner does). `send_due` holds no state between calls, so a restart only needs the
database and the spool.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session

from db.audit import record_audit
from db.jobs import LeaseLost, update_timings
from db.models import AuditEventType, Job, OutboundItem, OutboundStatus
from db.outbound import (
    Backoff,
    DueItem,
    add_outbound,
    claim_due_items,
    lease_owners,
    mark_failed,
    mark_sent,
    pending_items_of_job,
    release_items,
    release_owned_by,
    renew_leases,
    requeue,
    upsert_result,
)
from db.session import Database
from node.config import PeerSettings, Settings
from node.identity import node_identity, owner_is_gone, sender_owner
from node.scu import OutgoingFile, StoreOutcome, store_files
from node.spool import RESULTS_DIR, Spool, safe_component

if TYPE_CHECKING:  # results pulls in highdicom and matplotlib; the queue itself does not need them
    from node.results import ResultObject

log = logging.getLogger(__name__)

CLAIM_BATCH = 50  # items claimed at a time: several senders share a backlog instead of one taking it all
# Items one pass tries at most: the ids it tried are left out of its later claims (NOT IN), which must stay well
# below SQLite's bound-parameter limit (32766); a longer backlog is the next pass's.
PASS_ITEMS = 5000


@dataclass
class SendReport:
    """What one `send_due` pass did (ids of outbound items)."""

    sent: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    untried: list[int] = field(default_factory=list)  # due, but the association was lost before their turn
    taken_over: list[int] = field(default_factory=list)  # our claim ran out mid-pass; another sender has them

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
    source_series_uid: str = "",
    model_id: str = "",
) -> list[int]:
    """Store the objects in the spool and queue each for `destination`; returns the outbound item ids.

    Enqueuing the same job's objects again (same SOP Instance UIDs) refreshes the files and adds a new
    pending item only where none is pending, so a re-run resends each object once. `still_ours(session)` runs
    first in the queueing transaction (a worker's conditional lease renewal): if it says the job is no longer
    the caller's (superseded, re-queued), nothing is queued and `LeaseLost` is raised. `source_series_uid` and
    `model_id` record which series the objects were made from and by which model (the study page shows them).
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
                spool_id=spool.id,
                source_series_instance_uid=source_series_uid,
                model_id=model_id,
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


def send_due(settings: Settings, db: Database, spool: Spool, now: datetime | None = None) -> SendReport:
    """One pass: claim due items a batch at a time and send them, one association per destination per batch, each
    outcome committed at once, until nothing due is left that this pass has not tried (or it tried PASS_ITEMS).

    Claims are this process's (`sender_owner`), on the database's clock; with `now` (a caller's simulated time)
    they are set on that clock instead.
    """
    release_own_claims(settings, db)  # a killed sender of this node (e.g. `outbound send`) need not wait out its lease
    owner = sender_owner(node_identity(settings.data_dir))
    report = SendReport()
    clock = pass_clock(now) if now is not None else None
    seen: list[int] = []
    while len(seen) < PASS_ITEMS:
        with db.session() as session:
            batch = claim_due_items(
                session,
                owner,
                settings.send.lease_seconds,
                spool.id,
                limit=CLAIM_BATCH,
                exclude=seen,
                now=clock() if clock else None,
            )
        if not batch:
            break
        seen.extend(item.id for item in batch)
        _send_batch(settings, db, spool, batch, _Claims(db, owner, settings.send.lease_seconds, clock), report)
    if seen:
        log.info(
            "send pass: %d sent, %d to retry, %d dead, %d not tried, %d taken over by another sender",
            len(report.sent),
            len(report.retried),
            len(report.dead),
            len(report.untried),
            len(report.taken_over),
        )
    return report


def release_own_claims(settings: Settings, db: Database) -> int:
    """Before each pass (and at start-up): claims held by this node's senders that no longer run (an earlier run,
    a killed `outbound send`) are given back at once; other nodes' claims, and this node's live senders', stay."""
    identity = node_identity(settings.data_dir)
    with db.session() as session:
        gone = [o for o in lease_owners(session, identity + "/") if owner_is_gone(o, identity)]
        released = release_owned_by(session, gone)
    if released:
        log.warning("outbound: %d item(s) claimed by this node's stopped sender(s) are due again", released)
    return released


@dataclass
class _Claims:
    """One batch's claims: who holds them, how long, on which clock (None: the database's)."""

    db: Database
    owner: str
    lease_seconds: float
    clock: Callable[[], datetime] | None
    open: set[int] = field(default_factory=set)

    def now(self) -> datetime:
        return self.clock() if self.clock else datetime.now(UTC)


def pass_clock(start: datetime) -> Callable[[], datetime]:
    """The time of each attempt in a pass that began at `start`: `start` plus the time since.

    A pass can take minutes (a slow PACS, timeouts); each outcome's time (sent_at, the next attempt's backoff)
    counts from when that attempt ended, not from when the pass began. `start` may be a caller's simulated time.
    """
    began = time.monotonic()
    return lambda: start + timedelta(seconds=time.monotonic() - began)


def _send_batch(
    settings: Settings, db: Database, spool: Spool, due: list[DueItem], claims: _Claims, report: SendReport
) -> None:
    backoff = backoff_of(settings)
    claims.open = {item.id for item in due}
    # Only to peers still in [[peers]] (their current address and TLS setting): a peer removed from the
    # configuration is no longer trusted with results, so its items wait (backoff, then dead, retryable).
    listed: list[DueItem] = []
    unlisted: list[DueItem] = []
    for item in due:
        (listed if settings.peer(item.destination_ae) is not None else unlisted).append(item)
    for item in unlisted:
        why = f"destination {item.destination_ae} is no longer in [[peers]]; not sent (add it back, then retry)"
        _record(db, StoreOutcome(item.id, None, why), claims, backoff, report)
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
            _record(db, outcome, claims, backoff, report, give_up=True)
        peer = settings.peer(ae_title)
        assert peer is not None
        for outcome in store_files(settings.node, peer, files):
            _record(db, outcome, claims, backoff, report)
    if claims.open:  # never reached (an outcome per item is the rule; this is the guard)
        with db.session() as session:
            release_items(session, sorted(claims.open), claims.owner)


def _record(
    db: Database, outcome: StoreOutcome, claims: _Claims, backoff: Backoff, report: SendReport, give_up: bool = False
) -> None:
    """Commit one outcome before the next file is sent (the acknowledgement is durable as soon as possible), and
    renew the batch's other claims in the same transaction.

    An item that was never sent (its association was lost before its turn) keeps its attempt count and is given
    back unclaimed: the next pass tries it, and only a real try counts towards dead. An outcome for an item whose
    claim ran out and was taken over by another sender is not recorded (that sender records its own).
    """
    now = claims.now()
    claims.open.discard(outcome.key)
    with db.session() as session:
        renew_leases(
            session, sorted(claims.open), claims.owner, claims.lease_seconds, claims.clock() if claims.clock else None
        )
        if not outcome.tried:
            release_items(session, [outcome.key], claims.owner)
            report.untried.append(outcome.key)
            log.info("outbound item %s not tried in this pass: %s", outcome.key, outcome.error)
            return
        if outcome.stored:
            assert outcome.status is not None
            sent = mark_sent(session, outcome.key, claims.owner, outcome.status, outcome.error, now)
            if sent is None:
                _note_taken_over(outcome, report)
                return
            _note_delivery_time(session, sent)
            report.sent.append(outcome.key)
            return
        item = mark_failed(
            session, outcome.key, claims.owner, outcome.status, outcome.error, now, backoff, give_up=give_up
        )
        if item is None:
            _note_taken_over(outcome, report)
            return
        (report.dead if item.status == OutboundStatus.DEAD else report.retried).append(outcome.key)
        log.warning(
            "send of outbound item %s failed (attempt %d, status %s): %s",
            outcome.key,
            item.attempts,
            "none" if outcome.status is None else f"0x{outcome.status:04X}",
            outcome.error,
        )


def _note_taken_over(outcome: StoreOutcome, report: SendReport) -> None:
    report.taken_over.append(outcome.key)
    log.warning(
        "outbound item %s: this sender's claim ran out before its outcome was recorded; another sender has it",
        outcome.key,
    )


def _note_delivery_time(session: Session, item: OutboundItem) -> None:
    """Once a job's last pending item is acknowledged, store the delivery time (job done -> last ack) as the
    job's `send` timing, beside its queue_wait/load/infer/encode."""
    job = item.result.job
    if job.finished_at is None:
        return
    if not pending_items_of_job(session, job.id):
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
