"""Database side of ingest and study completion: short transactions for received instances.

The listener's group committer calls `IngestIndex.add_instances` (one transaction for the instances that
arrived together) after their files are durably in the spool and before it answers Success. Writers take
`write_lock` so that SQLite never makes threads (or, on one host, the node's listener processes: db/host_lock.py)
poll for its lock and so the stability scan sees a consistent picture (no commit lands mid-scan).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import Connection, bindparam, case, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from db.audit import insert_audit
from db.driver_statements import DriverStatement
from db.host_lock import HostWriteLock, sqlite_write_lock_path
from db.models import (
    PRIORITY_STAT,
    AuditEventType,
    Instance,
    Result,
    Series,
    Study,
    StudyStatus,
    utcnow,
)
from db.session import Database


@dataclass(frozen=True)
class InstanceRecord:
    """What the listener parsed from one instance, plus where and how it was stored."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    sha256: str
    calling_ae: str = ""
    called_ae: str = ""
    peer_address: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    own_output: bool = False  # produced by this node (its SEG/SC/SR coming back)
    stat: bool = False  # the study asks for STAT handling


class Known(NamedTuple):
    stored: bool  # an instance with this SOP Instance UID is indexed
    own_result: bool  # the UID is one of this node's result objects
    series_study: str | None  # the Study Instance UID the series already belongs to (None: a new series)


class StoredCopy(NamedTuple):
    path: str  # spool-relative path of the kept file
    transfer_syntax_uid: str


Ready = Callable[[], list[BaseException | None]]  # see IngestIndex.add_instances
INDEX_ATTEMPTS = 3  # tries of one instance's rows when a concurrent writer's new study or series got in the way


class _NotAllReady(Exception):
    """A batch whose `ready` refused some records: rolled back, the others written again on their own."""


class SeriesInOtherStudy(ValueError):
    """A Series Instance UID that is already indexed under another study (UIDs must be unique)."""


class _IngestStatements:
    """The listener's per-instance statements, built once and run on the driver's cursor (db/driver_statements.py):
    SQLAlchemy's execution machinery cost more than the statements themselves."""

    studies, series, instances = Study.__table__, Series.__table__, Instance.__table__
    # The study's id and the series' row, in one round trip (NULLs for what is not there yet).
    _series_is = series.c.series_instance_uid == bindparam("series")
    placement = DriverStatement(
        select(
            select(studies.c.id).where(studies.c.study_instance_uid == bindparam("study")).scalar_subquery(),
            select(series.c.id).where(_series_is).scalar_subquery(),
            select(series.c.study_id).where(_series_is).scalar_subquery(),
            select(series.c.is_own_output).where(_series_is).scalar_subquery(),
        )
    )
    lookup = DriverStatement(
        select(
            exists().where(instances.c.sop_instance_uid == bindparam("uid")),
            exists().where(Result.__table__.c.sop_instance_uid == bindparam("uid")),
            select(studies.c.study_instance_uid)
            .join(series, series.c.study_id == studies.c.id)
            .where(series.c.series_instance_uid == bindparam("series"))
            .scalar_subquery(),
        )
    )
    stored_copy = select(instances.c.path, instances.c.transfer_syntax_uid).where(
        instances.c.sop_instance_uid == bindparam("uid")
    )
    insert_study = DriverStatement(insert(studies).returning(studies.c.id))
    insert_series = DriverStatement(insert(series).returning(series.c.id))
    insert_instance = DriverStatement(insert(instances))
    count_series = DriverStatement(
        update(series).where(series.c.id == bindparam("key")).values(instance_count=series.c.instance_count + 1)
    )
    mark_series_own = DriverStatement(update(series).where(series.c.id == bindparam("key")).values(is_own_output=True))
    _count_study = (
        update(studies).where(studies.c.id == bindparam("key")).values(instance_count=studies.c.instance_count + 1)
    )
    count_study = DriverStatement(_count_study)
    # A source image restarts the study's quiet period; our own results never make a study "grow".
    _count_study_source = _count_study.values(last_received_at=bindparam("now"), status=StudyStatus.RECEIVING)
    count_study_source = DriverStatement(_count_study_source)
    count_study_stat = DriverStatement(
        _count_study_source.values(
            priority=case((studies.c.priority < PRIORITY_STAT, PRIORITY_STAT), else_=studies.c.priority)
        )
    )


class IngestIndex:
    """Instance indexing, duplicate and own-output checks, and audit events for the listener."""

    def __init__(self, db: Database, spool_id: str | None = None) -> None:
        """`spool_id`: the spool this node stores into, recorded on the studies it creates (retention and other
        nodes then know where their files are)."""
        self.db = db
        self.spool_id = spool_id
        self.write_lock = HostWriteLock(sqlite_write_lock_path(db.url))
        self._writer: Connection | None = None

    def lookup(self, sop_instance_uid: str, series_instance_uid: str = "") -> Known:
        """What the index knows of an instance about to be stored, in one round trip."""
        params = {"uid": sop_instance_uid, "series": series_instance_uid}
        with self.db.engine.connect() as conn:
            stored, own, series_study = _IngestStatements.lookup.one(conn, params)
        return Known(bool(stored), bool(own), series_study)

    def stored_copy(self, sop_instance_uid: str) -> StoredCopy | None:
        """Where the kept copy of an instance is, to compare a resend with it (None: not indexed)."""
        with self.db.engine.connect() as conn:
            row = conn.execute(_IngestStatements.stored_copy, {"uid": sop_instance_uid}).one_or_none()
        return None if row is None else StoredCopy(row.path, row.transfer_syntax_uid)

    def add_instance(self, rec: InstanceRecord) -> bool:
        """Index a stored instance with its audit event; False if the SOP Instance UID was already there.

        Any other failure raises: an integrity error is only a duplicate when the row is really there (another
        process indexed the same instance in between), not e.g. when retention removed the study meanwhile. An
        integrity error that is no duplicate is tried again (up to INDEX_ATTEMPTS): another process may just have
        created the study or series this instance goes into (listener processes on PostgreSQL store one study
        from several associations at once), and the next try finds it. So is a deadlock PostgreSQL broke by
        aborting this transaction (rows are locked in one order, so only other writers' orders can cause one).
        """
        for attempt in range(1, INDEX_ATTEMPTS + 1):
            with self.write_lock:
                try:
                    with self.db.engine.begin() as conn:
                        add_instance_rows(conn, rec, self.spool_id)
                    return True
                except IntegrityError:
                    if self.lookup(rec.sop_instance_uid)[0]:
                        return False
                    if attempt == INDEX_ATTEMPTS:
                        raise
                except OperationalError as exc:
                    if not _is_deadlock(exc) or attempt == INDEX_ATTEMPTS:
                        raise
        raise AssertionError("unreachable")  # the loop returns or raises

    def add_instances(self, records: list[InstanceRecord], ready: Ready | None = None) -> list[bool | BaseException]:
        """Index several stored instances in ONE transaction (group commit). Per record: True when indexed, False
        when it was already there, or the exception that kept it out: after a failed batch each record is tried on
        its own (and a single record once more), so one record's failure never decides another's.

        `ready()`, when given, blocks until the records may be committed (the listener: until their files are on
        disk) and returns, per record, None or the exception that keeps it out; it must not raise, and is called
        once, before anything is committed. Its wait is used: when the write
        lock is free at once, the rows are written meanwhile and only the commit waits for `ready`; when another
        writer holds the lock, `ready` is waited for first, so the lock is never held through that wait."""
        outcomes: list[bool | BaseException | None] = [None] * len(records)
        waited = ready is None
        if ready is not None and not self.write_lock.acquire(blocking=False):
            self._exclude(ready(), outcomes)
            waited = True
            self.write_lock.acquire()
        elif ready is None:
            self.write_lock.acquire()
        try:
            conn = self._connection()
            try:
                with conn.begin():
                    for position in _lock_order(records):
                        if outcomes[position] is None:
                            add_instance_rows(conn, records[position], self.spool_id)
                    if ready is not None and not waited:
                        waited = True
                        if self._exclude(ready(), outcomes):
                            raise _NotAllReady  # roll back: the ready ones are written again, alone
                return [True if outcome is None else outcome for outcome in outcomes]
            except Exception:  # noqa: BLE001 - rare: find which record failed, and why, one at a time
                self._drop_connection()
        finally:
            self.write_lock.release()
        if ready is not None and not waited:  # nothing is committed before `ready` has returned
            self._exclude(ready(), outcomes)
        return [
            self._add_alone(rec) if outcome is None else outcome for rec, outcome in zip(records, outcomes, strict=True)
        ]

    @staticmethod
    def _exclude(verdicts: list[BaseException | None], outcomes: list[bool | BaseException | None]) -> bool:
        """Record `ready`'s refusals in `outcomes`; True if there was any."""
        refused = False
        for position, verdict in enumerate(verdicts):
            if verdict is not None and outcomes[position] is None:
                outcomes[position] = verdict
                refused = True
        return refused

    def _connection(self) -> Connection:
        """The connection for group commits, kept open between them (checking one out of the pool and resetting
        it on return cost more than the statements); used under `write_lock` only."""
        if self._writer is None or self._writer.invalidated or self._writer.closed:
            self._writer = self.db.engine.connect()
        return self._writer

    def _drop_connection(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Give back the kept connection (call once writing is over)."""
        with self.write_lock:
            self._drop_connection()

    def _add_alone(self, rec: InstanceRecord) -> bool | Exception:
        try:
            return self.add_instance(rec)
        except Exception as exc:  # noqa: BLE001 - handed to that record's handler, which answers a failure
            return exc

    def record_event(self, event_type: AuditEventType | str, **fields: object) -> None:
        """Append one audit event in its own short transaction, on the connection kept for group commits."""
        with self.write_lock:
            conn = self._connection()
            try:
                with conn.begin():
                    insert_audit(conn, event_type, **fields)
            except Exception:
                self._drop_connection()
                raise

    def iter_instance_paths(self) -> Iterator[str]:
        with self.db.session() as session:
            yield from session.scalars(select(Instance.path).execution_options(yield_per=5000))


def _is_deadlock(exc: OperationalError) -> bool:
    """PostgreSQL chose this transaction as a deadlock's victim (SQLSTATE 40P01): safe to run again."""
    return getattr(exc.orig, "sqlstate", None) == "40P01"


def _lock_order(records: list[InstanceRecord]) -> list[int]:
    """Positions of `records` in (study, series) order: the order in which `add_instance_rows` locks rows."""
    return sorted(range(len(records)), key=lambda k: (records[k].study_instance_uid, records[k].series_instance_uid))


def add_instance_rows(conn: Connection, rec: InstanceRecord, spool_id: str | None = None) -> None:
    """Write one instance's rows (study and series created or counted, the instance, its audit event) in the
    caller's transaction; `IngestIndex` wraps it with the write lock, retries and group commit."""
    q = _IngestStatements
    now = utcnow()
    study_id, series_id, series_study_id, series_is_own = q.placement.one(
        conn, {"study": rec.study_instance_uid, "series": rec.series_instance_uid}
    )
    if study_id is None:
        # A study known only through our own results is complete at once: nothing to wait for.
        completed = {"status": StudyStatus.COMPLETE, "completed_at": now} if rec.own_output else {}
        (study_id,) = q.insert_study.one(
            conn,
            {
                "study_instance_uid": rec.study_instance_uid,
                "patient_id": rec.patient_id,
                "accession_number": rec.accession_number,
                "study_date": rec.study_date,
                "study_description": rec.study_description,
                "calling_ae": rec.calling_ae,
                "first_received_at": now,
                "last_received_at": now,
                "instance_count": 0,
                "completed_instance_count": 0,
                "spool_id": spool_id,
                **completed,
            },
        )
    if series_id is None:
        (series_id,) = q.insert_series.one(
            conn,
            {
                "study_id": study_id,
                "series_instance_uid": rec.series_instance_uid,
                "modality": rec.modality,
                "body_part": rec.body_part,
                "series_description": rec.series_description,
                "series_number": rec.series_number,
                "is_own_output": rec.own_output,
                "instance_count": 0,
            },
        )
    else:
        if series_study_id != study_id:  # the listener refuses these first; this guards a concurrent first store
            raise SeriesInOtherStudy(f"series {rec.series_instance_uid} belongs to another study")
        if rec.own_output and not series_is_own:
            q.mark_series_own.run(conn, {"key": series_id})
    q.insert_instance.run(
        conn,
        {
            "series_id": series_id,
            "sop_instance_uid": rec.sop_instance_uid,
            "sop_class_uid": rec.sop_class_uid,
            "instance_number": rec.instance_number,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "path": rec.path,
            "size_bytes": rec.size_bytes,
            "sha256": rec.sha256,
            "calling_ae": rec.calling_ae,
            "received_at": now,
        },
    )
    # Study row before series row, and a batch in (study, series) order: every transaction takes these row locks
    # in one global order, so listener processes storing one study's series at once never deadlock (PostgreSQL).
    if rec.own_output:
        q.count_study.run(conn, {"key": study_id})
    else:
        (q.count_study_stat if rec.stat else q.count_study_source).run(conn, {"key": study_id, "now": now})
    q.count_series.run(conn, {"key": series_id})
    insert_audit(
        conn,
        AuditEventType.INSTANCE_STORED,
        calling_ae=rec.calling_ae,
        called_ae=rec.called_ae,
        peer_address=rec.peer_address,
        patient_id=rec.patient_id,
        accession_number=rec.accession_number,
        study_instance_uid=rec.study_instance_uid,
        series_instance_uid=rec.series_instance_uid,
        sop_instance_uid=rec.sop_instance_uid,
        dimse_status=0,
        detail=f"{rec.size_bytes} bytes{' (own output)' if rec.own_output else ''}",
    )


# --- study completion -------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    body_part: str
    series_description: str
    instance_count: int


@dataclass
class PendingStudy:
    """A study with source instances received since it was last judged complete."""

    study: Study
    episode_start: datetime  # first source instance since the last completion
    source_count: int
    series: list[SeriesFacts] = field(default_factory=list)


def pending_studies(session: Session) -> list[PendingStudy]:
    """Studies that received source instances since their last completion (or were never completed)."""
    studies = session.scalars(
        select(Study).where(or_(Study.completed_at.is_(None), Study.last_received_at > Study.completed_at))
    ).all()
    pending = []
    for study in studies:
        source = session.scalars(
            select(Series).where(Series.study_id == study.id, Series.is_own_output.is_(False))
        ).all()
        source_count = sum(s.instance_count for s in source)
        if source_count == 0:
            continue
        episode_start = study.first_received_at
        if study.completed_at is not None:
            first_new = session.scalar(
                select(func.min(Instance.received_at))
                .join(Series, Instance.series_id == Series.id)
                .where(
                    Series.study_id == study.id,
                    Series.is_own_output.is_(False),
                    Instance.received_at > study.completed_at,
                )
            )
            episode_start = first_new or study.last_received_at
        facts = [SeriesFacts(s.modality, s.body_part, s.series_description, s.instance_count) for s in source]
        pending.append(PendingStudy(study, episode_start, source_count, facts))
    return pending
