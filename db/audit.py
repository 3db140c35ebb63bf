"""Append an audit event. There is deliberately no update or delete helper: the trail is append-only."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert
from sqlalchemy.orm import Session

from db.driver_statements import DriverStatement
from db.models import AuditEvent, AuditEventType, Job


def record_audit(session: Session, event_type: AuditEventType | str, **fields: Any) -> AuditEvent:
    """Add an audit event to the session (committed with the caller's transaction)."""
    event = AuditEvent(event_type=str(event_type), **{k: v for k, v in fields.items() if v is not None})
    session.add(event)
    return event


_INSERT_AUDIT = DriverStatement(insert(AuditEvent.__table__))


def insert_audit(conn: Connection, event_type: AuditEventType | str, **fields: Any) -> None:
    """The same event without an ORM session, on the driver's cursor (db/driver_statements.py), in `conn`'s
    transaction (begun with `begin()`): the listener's path, an event per stored image and per association."""
    values = {k: v for k, v in fields.items() if v is not None}
    _INSERT_AUDIT.run(conn, {"event_type": str(event_type), **values})


def job_fields(job: Job) -> dict[str, Any]:
    """The audit fields that identify a job's study (what audit queries filter on)."""
    study = job.study
    return {
        "job_id": job.id,
        "study_instance_uid": study.study_instance_uid,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
    }
