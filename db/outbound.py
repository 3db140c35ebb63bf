"""Queries of the outbound queue: result rows, items due for sending, outcome bookkeeping and dead letters.

Pure database work (no networking): node/outbound.py decides what to send and calls these inside its
transactions. Every state change writes its audit event in the same transaction.

Several senders (nodes sharing the database, or a node and `edgenode outbound send`) each send only items they
claimed: a claim sets the item's lease owner and expiry on the database's clock, each outcome is recorded only
while the claim is still the sender's, and an item whose lease ran out (its sender died or stalled) can be
claimed by any sender that can read its file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Update, func, or_, select, update
from sqlalchemy.orm import Session, joinedload

from db.audit import record_audit
from db.clock import db_utcnow
from db.models import AuditEventType, Job, OutboundItem, OutboundStatus, Result, ResultKind


@dataclass(frozen=True)
class DueItem:
    """What the sender needs about one due item, detached from the session."""

    id: int
    destination_ae: str
    host: str
    port: int
    path: str  # spool-relative
    sop_instance_uid: str
    attempts: int


@dataclass(frozen=True)
class Backoff:
    initial_seconds: float
    max_seconds: float
    max_attempts: int

    def delay(self, attempts: int) -> timedelta:
        """Delay before the next try after `attempts` failed tries: initial, doubling, capped."""
        exponent = min(max(attempts - 1, 0), 62)
        return timedelta(seconds=min(self.initial_seconds * (2.0**exponent), self.max_seconds))


def _audit_fields(item: OutboundItem) -> dict[str, object]:
    result = item.result
    study = result.job.study
    return {
        "called_ae": item.destination_ae,
        "peer_address": f"{item.host}:{item.port}",
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": result.series_instance_uid,
        "sop_instance_uid": result.sop_instance_uid,
        "job_id": result.job_id,
    }


def upsert_result(
    session: Session,
    job_id: int,
    kind: ResultKind,
    sop_instance_uid: str,
    sop_class_uid: str,
    series_instance_uid: str,
    path: str,
    size_bytes: int,
    spool_id: str | None = None,
    source_series_instance_uid: str = "",
    model_id: str = "",
) -> Result:
    """The Result row for a SOP instance: created, or refreshed when the same object is written again."""
    result = session.scalars(select(Result).where(Result.sop_instance_uid == sop_instance_uid)).one_or_none()
    if result is None:
        result = Result(job_id=job_id, sop_instance_uid=sop_instance_uid)
        session.add(result)
    result.job_id = job_id
    result.kind = kind
    result.sop_class_uid = sop_class_uid
    result.series_instance_uid = series_instance_uid
    result.path = path
    result.size_bytes = size_bytes
    result.spool_id = spool_id
    result.source_series_instance_uid = source_series_instance_uid
    result.model_id = model_id
    session.flush()
    return result


def add_outbound(session: Session, result: Result, ae_title: str, host: str, port: int, now: datetime) -> OutboundItem:
    """A pending item for `result` to the destination; an existing pending one is reused (no double send)."""
    existing = session.scalars(
        select(OutboundItem).where(
            OutboundItem.result_id == result.id,
            OutboundItem.destination_ae == ae_title,
            OutboundItem.status == OutboundStatus.PENDING,
        )
    ).first()
    if existing is not None:
        existing.host, existing.port = host, port
        return existing
    item = OutboundItem(
        result_id=result.id, destination_ae=ae_title, host=host, port=port, next_attempt_at=now, created_at=now
    )
    session.add(item)
    session.flush()
    return item


def _updated_rows(session: Session, statement: Update) -> int:
    result = session.execute(statement.execution_options(synchronize_session=False))
    assert isinstance(result, CursorResult)  # DML through a Session always returns one
    return result.rowcount


def _lease_times(lease_seconds: float, now: datetime | None) -> tuple[Any, Any]:
    """(now, expiry) on the database's clock, or from `now` (tests)."""
    if now is not None:
        return now, now + timedelta(seconds=lease_seconds)
    return db_utcnow(), db_utcnow(lease_seconds)


def claim_due_items(
    session: Session,
    owner: str,
    lease_seconds: float,
    spool_id: str,
    *,
    limit: int = 50,
    exclude: Sequence[int] = (),
    now: datetime | None = None,
) -> list[DueItem]:
    """Claim up to `limit` due pending items for `owner` (oldest due first) and return them.

    Only items not claimed by a live sender (no lease, or its lease ran out: a dead sender's items are taken
    over) and whose file is in this spool (`spool_id`; rows from before spool ids are anyone's). `exclude`: ids
    this pass already tried. PostgreSQL: the rows are locked with FOR UPDATE SKIP LOCKED, so concurrent claimers
    take different items; SQLite: the conditional UPDATE runs under the database's one write lock, and only
    rows it changed are returned.
    """
    at, expires = _lease_times(lease_seconds, now)
    claimable = (
        OutboundItem.status == OutboundStatus.PENDING,
        OutboundItem.next_attempt_at <= at,
        or_(OutboundItem.lease_owner.is_(None), OutboundItem.lease_expires_at < at),
    )
    query = (
        select(OutboundItem.id)
        .join(Result, Result.id == OutboundItem.result_id)
        .where(*claimable, or_(Result.spool_id == spool_id, Result.spool_id.is_(None)))
        .order_by(OutboundItem.next_attempt_at, OutboundItem.id)
        .limit(limit)
    )
    if exclude:
        query = query.where(OutboundItem.id.not_in(list(exclude)))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=OutboundItem)
    ids = list(session.scalars(query))
    if not ids:
        return []
    _updated_rows(
        session,
        update(OutboundItem)
        .where(OutboundItem.id.in_(ids), *claimable)
        .values(lease_owner=owner, lease_expires_at=expires),
    )
    rows = session.scalars(
        select(OutboundItem)
        .options(joinedload(OutboundItem.result))
        .where(OutboundItem.id.in_(ids), OutboundItem.lease_owner == owner)
        .order_by(OutboundItem.next_attempt_at, OutboundItem.id)
        .execution_options(populate_existing=True)
    ).all()
    return [
        DueItem(
            id=row.id,
            destination_ae=row.destination_ae,
            host=row.host,
            port=row.port,
            path=row.result.path,
            sop_instance_uid=row.result.sop_instance_uid,
            attempts=row.attempts,
        )
        for row in rows
    ]


def renew_leases(
    session: Session, ids: Sequence[int], owner: str, lease_seconds: float, now: datetime | None = None
) -> int:
    """Extend `owner`'s claims on the items still pending; how many it still holds."""
    if not ids:
        return 0
    _, expires = _lease_times(lease_seconds, now)
    return _updated_rows(
        session,
        update(OutboundItem)
        .where(
            OutboundItem.id.in_(list(ids)),
            OutboundItem.status == OutboundStatus.PENDING,
            OutboundItem.lease_owner == owner,
        )
        .values(lease_expires_at=expires),
    )


def release_items(session: Session, ids: Sequence[int], owner: str) -> int:
    """Give `owner`'s claims back unsent (never tried in this pass): due again for any sender at once."""
    if not ids:
        return 0
    return _updated_rows(
        session,
        update(OutboundItem)
        .where(OutboundItem.id.in_(list(ids)), OutboundItem.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None),
    )


def lease_owners(session: Session, prefix: str) -> list[str]:
    """The distinct owners whose id starts with `prefix` (one node's senders) holding claims on pending items."""
    return list(
        session.scalars(
            select(OutboundItem.lease_owner)
            .where(
                OutboundItem.status == OutboundStatus.PENDING,
                OutboundItem.lease_owner.startswith(prefix, autoescape=True),
            )
            .distinct()
        )
    )


def release_owned_by(session: Session, owners: Sequence[str]) -> int:
    """At start-up: the claims of this node's senders that are gone go back at once (no wait for the lease)."""
    if not owners:
        return 0
    return _updated_rows(
        session,
        update(OutboundItem)
        .where(OutboundItem.lease_owner.in_(list(owners)))
        .values(lease_owner=None, lease_expires_at=None),
    )


def _end_claim(session: Session, item_id: int, owner: str) -> OutboundItem | None:
    """End `owner`'s claim on a pending item (one conditional UPDATE); the fresh row, or None when the claim is no
    longer the owner's (its lease ran out and another sender took the item over)."""
    ended = _updated_rows(
        session,
        update(OutboundItem)
        .where(
            OutboundItem.id == item_id,
            OutboundItem.status == OutboundStatus.PENDING,
            OutboundItem.lease_owner == owner,
        )
        .values(lease_owner=None, lease_expires_at=None),
    )
    if ended != 1:
        return None
    return session.get(OutboundItem, item_id, populate_existing=True)


def mark_sent(
    session: Session, item_id: int, owner: str, status: int, comment: str, now: datetime
) -> OutboundItem | None:
    """Record the peer's acknowledgement; None (nothing recorded) when `owner` no longer holds the claim."""
    item = _end_claim(session, item_id, owner)
    if item is None:
        return None
    item.status = OutboundStatus.SENT
    item.attempts += 1
    item.last_status = status
    item.last_error = comment
    item.sent_at = now
    fields = _audit_fields(item)
    record_audit(
        session,
        AuditEventType.SEND_OK,
        outcome="success" if status == 0 else "warning",
        dimse_status=status,
        detail=f"attempt {item.attempts}" + (f"; {comment}" if comment else ""),
        **fields,
    )
    return item


def mark_failed(
    session: Session,
    item_id: int,
    owner: str,
    status: int | None,
    error: str,
    now: datetime,
    backoff: Backoff,
    give_up: bool = False,
) -> OutboundItem | None:
    """Count a failed try: schedule the next with backoff, or dead-letter after the last attempt (or give_up).
    None (nothing recorded) when `owner` no longer holds the claim."""
    item = _end_claim(session, item_id, owner)
    if item is None:
        return None
    item.attempts += 1
    item.last_status = status
    item.last_error = error
    fields = _audit_fields(item)
    if give_up or item.attempts >= backoff.max_attempts:
        item.status = OutboundStatus.DEAD
        record_audit(
            session,
            AuditEventType.SEND_DEAD,
            outcome="failure",
            dimse_status=status,
            detail=f"gave up after {item.attempts} attempt(s): {error}",
            **fields,
        )
    else:
        item.next_attempt_at = now + backoff.delay(item.attempts)
        record_audit(
            session,
            AuditEventType.SEND_RETRY,
            outcome="failure",
            dimse_status=status,
            detail=f"attempt {item.attempts} failed, next at {item.next_attempt_at.isoformat()}: {error}",
            **fields,
        )
    return item


def pending_items_of_job(session: Session, job_id: int) -> int:
    """How many of a job's results still wait for the peer's acknowledgement."""
    return int(
        session.scalar(
            select(func.count(OutboundItem.id))
            .join(Result, Result.id == OutboundItem.result_id)
            .where(Result.job_id == job_id, OutboundItem.status == OutboundStatus.PENDING)
        )
        or 0
    )


def requeue(session: Session, ids: Sequence[int] | None, now: datetime, pending_too: bool = False) -> list[int]:
    """Revive dead items (all when ids is None): pending again, attempts reset, due now. With `pending_too`,
    pending items waiting out a backoff are made due now the same way (attempts reset)."""
    wanted = [OutboundStatus.DEAD, OutboundStatus.PENDING] if pending_too else [OutboundStatus.DEAD]
    query = select(OutboundItem).where(OutboundItem.status.in_(wanted))
    if ids is not None:
        query = query.where(OutboundItem.id.in_(list(ids)))
    revived = []
    for item in session.scalars(query.order_by(OutboundItem.id)).all():
        was = f"was {item.status} after {item.attempts} attempt(s): {item.last_error}"
        item.status = OutboundStatus.PENDING
        item.attempts = 0
        item.next_attempt_at = now  # a claim a live sender holds stays: it is sending the item now
        record_audit(session, AuditEventType.SEND_REQUEUED, detail=was, **_audit_fields(item))
        revived.append(item.id)
    return revived


def list_items(session: Session, status: str | None = None, limit: int = 500) -> list[dict[str, object]]:
    """Queue rows for `edgenode outbound list`, newest first, with stable field names."""
    query = (
        select(OutboundItem, Result, Job)
        .join(Result, OutboundItem.result_id == Result.id)
        .join(Job, Result.job_id == Job.id)
        .order_by(OutboundItem.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(OutboundItem.status == status)
    return [
        {
            "id": item.id,
            "status": item.status,
            "destination": item.destination_ae,
            "address": f"{item.host}:{item.port}",
            "kind": result.kind,
            "sop_instance_uid": result.sop_instance_uid,
            "job_id": job.id,
            "attempts": item.attempts,
            "next_attempt_at": item.next_attempt_at.isoformat() if item.status == OutboundStatus.PENDING else "",
            "last_status": "" if item.last_status is None else f"0x{item.last_status:04X}",
            "last_error": item.last_error,
            "sent_at": item.sent_at.isoformat() if item.sent_at else "",
        }
        for item, result, job in session.execute(query).all()
    ]
