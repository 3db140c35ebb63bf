"""Queries of the outbound queue: result rows, items due for sending, outcome bookkeeping and dead letters.

Pure database work (no networking): node/outbound.py decides what to send and calls these inside its
transactions. Every state change writes its audit event in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from db.audit import record_audit
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


def due_items(session: Session, now: datetime, limit: int = 1000) -> list[DueItem]:
    """Pending items whose next attempt is due, oldest first, grouped by destination by the caller."""
    rows = session.scalars(
        select(OutboundItem)
        .options(joinedload(OutboundItem.result))
        .where(OutboundItem.status == OutboundStatus.PENDING, OutboundItem.next_attempt_at <= now)
        .order_by(OutboundItem.next_attempt_at, OutboundItem.id)
        .limit(limit)
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


def mark_sent(session: Session, item_id: int, status: int, comment: str, now: datetime) -> OutboundItem:
    item = session.get_one(OutboundItem, item_id)
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
    status: int | None,
    error: str,
    now: datetime,
    backoff: Backoff,
    give_up: bool = False,
) -> OutboundItem:
    """Count a failed try: schedule the next with backoff, or dead-letter after the last attempt (or give_up)."""
    item = session.get_one(OutboundItem, item_id)
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
        item.next_attempt_at = now
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
