"""Statements run on the driver's cursor (db/driver_statements.py) write and read what SQLAlchemy's execution does,
on SQLite and on PostgreSQL, and fail with SQLAlchemy's exceptions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from db.driver_statements import DriverStatement
from db.models import AuditEvent, Series, Study, StudyStatus
from db.session import Database

studies, series, audit = Study.__table__, Series.__table__, AuditEvent.__table__
WHEN = datetime(2026, 12, 3, 16, 30, 0, tzinfo=UTC)  # microseconds 0: a format that drops them would show


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


def _study(uid: str) -> dict[str, object]:
    return {"study_instance_uid": uid, "patient_id": "P1", "first_received_at": WHEN, "last_received_at": WHEN}


def test_rows_are_the_ones_sqlalchemy_writes(db: Database) -> None:
    """The same INSERTs (with Python-side defaults, a datetime, a boolean, RETURNING) and UPDATE (a literal among
    its values) through both paths give equal rows."""
    add_study = DriverStatement(insert(studies).returning(studies.c.id))
    add_series = DriverStatement(insert(series).returning(series.c.id))
    touch = update(studies).where(studies.c.id == bindparam("key")).values(last_received_at=bindparam("now"))
    mark = DriverStatement(touch.values(status=StudyStatus.COMPLETE))
    with db.engine.begin() as conn:
        (ours,) = add_study.one(conn, _study("1.1"))
        theirs = conn.execute(insert(studies), _study("1.2")).inserted_primary_key[0]
        for study_id, uid in ((ours, "1.1.1"), (theirs, "1.2.1")):
            add_series.one(conn, {"study_id": study_id, "series_instance_uid": uid, "is_own_output": True})
        mark.run(conn, {"key": ours, "now": WHEN.replace(microsecond=5)})
        conn.execute(touch.values(status=StudyStatus.COMPLETE), {"key": theirs, "now": WHEN.replace(microsecond=5)})
    with db.engine.connect() as conn:
        rows = conn.execute(select(studies).order_by(studies.c.id)).mappings().all()
        both = conn.execute(select(series).order_by(series.c.id)).mappings().all()
        # As stored, before SQLAlchemy reads it back (which would parse several text formats of a time alike).
        stored = conn.exec_driver_sql("SELECT first_received_at, last_received_at, status FROM studies ORDER BY id")
        assert len(set(stored.all())) == 1
    first, second = ({k: v for k, v in row.items() if k not in ("id", "study_instance_uid")} for row in rows)
    assert first == second
    assert first["status"] == StudyStatus.COMPLETE and first["last_received_at"] == WHEN.replace(microsecond=5)
    assert first["instance_count"] == 0 and first["priority"] == second["priority"]  # column defaults filled
    assert [(row["is_own_output"], row["instance_count"]) for row in both] == [(True, 0), (True, 0)]


def test_an_insert_gets_its_python_side_defaults_per_call(db: Database) -> None:
    add = DriverStatement(insert(audit))
    with db.engine.begin() as conn:
        add.run(conn, {"event_type": "test", "detail": "one"})
        add.run(conn, {"event_type": "test", "detail": "two"})
    with db.engine.connect() as conn:
        rows = conn.execute(select(audit.c.at, audit.c.outcome).order_by(audit.c.id)).all()
    assert [outcome for _, outcome in rows] == ["success", "success"]
    assert rows[0].at <= rows[1].at and rows[0].at.tzinfo is not None


def test_driver_errors_are_sqlalchemys(db: Database) -> None:
    add = DriverStatement(insert(studies))
    with db.engine.begin() as conn:
        add.run(conn, _study("2.1"))
    with pytest.raises(IntegrityError), db.engine.begin() as conn:
        add.run(conn, _study("2.1"))  # the Study Instance UID is unique
    unbound = DriverStatement(update(studies).where(studies.c.id == bindparam("key")).values(priority=1))
    with pytest.raises(ValueError, match="parameters not given: key"), db.engine.connect() as conn:
        unbound.run(conn, {})
