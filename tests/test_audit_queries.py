"""Audit filters (db/queries.py) and the append-only guarantee: the database refuses UPDATE and
DELETE on audit_events, and no code path in the application issues them.

The filter tests use HAND-MADE rows (tests/opsdata.record_*) to set event times and AE titles a real run
cannot choose (instances stored two days ago); the audit trail of a real run is checked in tests/test_worklist_cli.py.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from db.audit import record_audit
from db.models import AuditEventType, utcnow
from db.queries import AUDIT_FIELDS, AuditFilter, audit_events
from db.session import Database
from tests.conftest import REPO_ROOT
from tests.opsdata import record_inference_outcome, record_received_study


@pytest.fixture
def db(database_url: str) -> Database:
    database = Database(database_url)
    yield database
    database.dispose()


def test_filters(db: Database, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    old = utcnow() - timedelta(days=2)
    a = record_received_study(db, spool, patient_id="PA", accession="ACC-A", calling_ae="CT_A", received_at=old)
    b = record_received_study(db, spool, patient_id="PB", accession="ACC-B", calling_ae="CT_B", instances=1)
    record_inference_outcome(db, spool, a, score=0.5, uncertainty=0.1, destination="PACS_A")
    with db.session() as session:
        record_audit(
            session,
            AuditEventType.ASSOCIATION_REJECTED,
            outcome="failure",
            calling_ae="ROGUE",
            peer_address="10.0.0.9",
            detail="calling AE not allowed",
        )

        def uids(**kw: object) -> set[str]:
            return {e["study_instance_uid"] for e in audit_events(session, AuditFilter(**kw))}

        everything = audit_events(session)
        assert all(tuple(e) == AUDIT_FIELDS for e in everything)
        assert [e["id"] for e in everything] == sorted(e["id"] for e in everything)  # chronological
        # patient/accession also find the study's job, result and send events, which carry only the UID
        by_patient = audit_events(session, AuditFilter(patient_id="PA"))
        assert {e["event_type"] for e in by_patient} == {"instance.stored", "job.done", "result.created", "send.ok"}
        assert uids(accession="ACC-B") == {b}
        assert uids(study_uid=a) == {a}
        assert uids(ae="CT_B") == {b}
        assert uids(ae="PACS_A") == {a}  # called AE of the delivery
        assert [e["event_type"] for e in audit_events(session, AuditFilter(ae="ROGUE"))] == ["association.rejected"]
        assert {e["event_type"] for e in audit_events(session, AuditFilter(event_type="send."))} == {"send.ok"}
        assert {e["event_type"] for e in audit_events(session, AuditFilter(event_type="send*"))} == {"send.ok"}
        assert audit_events(session, AuditFilter(event_type="send")) == []  # exact unless a prefix is asked for
        assert uids(until=utcnow() - timedelta(days=1)) == {a}
        assert a not in uids(since=utcnow() - timedelta(hours=1), event_type="instance.stored")
        latest = audit_events(session, AuditFilter(limit=2))
        assert [e["id"] for e in latest] == [e["id"] for e in everything[-2:]]


def test_database_refuses_update_and_delete(db: Database) -> None:
    with db.session() as session:
        event = record_audit(session, AuditEventType.NODE_STARTED, detail="original")
    for statement in (
        "UPDATE audit_events SET detail = 'forged' WHERE id = :id",
        "DELETE FROM audit_events WHERE id = :id",
        "DELETE FROM audit_events",
    ):
        with pytest.raises(DatabaseError, match="append-only"), db.engine.begin() as conn:
            conn.execute(text(statement), {"id": event.id})
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT detail FROM audit_events")).scalars().all() == ["original"]


def test_no_code_path_updates_or_deletes_audit_events() -> None:
    """Static guard: the application never issues UPDATE/DELETE against the audit table."""
    forbidden = re.compile(
        r"(update|delete)\s*\(\s*AuditEvent\b|(UPDATE|DELETE\s+FROM)\s+audit_events|"
        r"session\.delete\(\s*(event|audit)",
        re.IGNORECASE,
    )
    offenders = []
    for package in ("node", "db", "inference", "engines"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue  # the migration creates the refusing triggers
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if forbidden.search(line):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{lineno}: {line.strip()}")
    assert offenders == []
