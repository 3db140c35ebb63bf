"""The listener's index writes (SQLAlchemy Core, statements built once): what they leave in the database."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from db.ingest import IngestIndex, InstanceRecord
from db.models import PRIORITY_ROUTINE, PRIORITY_STAT, AuditEvent, Instance, Series, Study, StudyStatus
from db.session import Database
from tests.conftest import REPO_ROOT


@pytest.fixture
def index(database_url: str) -> IngestIndex:
    return IngestIndex(Database(database_url))


def record(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", **kw: object) -> InstanceRecord:
    base = InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"{study}/{series}/{sop}.dcm",
        size_bytes=1000,
        sha256="ab" * 32,
        calling_ae="CT1",
        patient_id="PAT1",
        accession_number="ACC1",
        modality="CT",
        series_number=3,
        instance_number=int(sop.rsplit(".", 1)[1]),
    )
    return replace(base, **kw)


def test_instances_series_and_study_counted_with_one_audit_event_each(index: IngestIndex) -> None:
    assert index.add_instances([record("9.1"), record("9.2")]) == [True, True]
    assert index.add_instances([record("9.3", series="1.2.3.2", modality="CR")]) == [True]
    with index.db.session() as s:
        study = s.scalars(select(Study)).one()
        assert (study.instance_count, study.status, study.priority) == (3, StudyStatus.RECEIVING, PRIORITY_ROUTINE)
        assert (study.patient_id, study.accession_number, study.calling_ae) == ("PAT1", "ACC1", "CT1")
        assert study.first_received_at <= study.last_received_at and study.completed_at is None
        counts = dict(s.execute(select(Series.series_instance_uid, Series.instance_count)).all())
        assert counts == {"1.2.3.1": 2, "1.2.3.2": 1}
        instance = s.scalars(select(Instance).where(Instance.sop_instance_uid == "9.2")).one()
        assert (instance.path, instance.size_bytes, instance.instance_number) == ("1.2.3/1.2.3.1/9.2.dcm", 1000, 2)
        events = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert [e.sop_instance_uid for e in events] == ["9.1", "9.2", "9.3"]
        assert {(e.event_type, e.outcome, e.dimse_status, e.detail) for e in events} == {
            ("instance.stored", "success", 0, "1000 bytes")
        }
    assert index.lookup("9.2") == (True, False, None) and index.lookup("9.9") == (False, False, None)
    assert index.lookup("9.9", "1.2.3.2").series_study == "1.2.3"  # the study a known series belongs to


def test_a_duplicate_in_a_batch_is_reported_and_the_rest_still_indexed(index: IngestIndex) -> None:
    assert index.add_instances([record("9.1")]) == [True]
    assert index.add_instances([record("9.2"), record("9.1"), record("9.3")]) == [True, False, True]
    with index.db.session() as s:
        assert s.scalars(select(Study.instance_count)).one() == 3
        assert s.scalars(select(Series.instance_count)).one() == 3


def test_stat_raises_priority_and_own_output_neither_restarts_nor_opens_a_study(index: IngestIndex) -> None:
    index.add_instances([record("9.1"), record("9.2", stat=True), record("9.3")])
    with index.db.session() as s:
        study = s.scalars(select(Study)).one()
        assert study.priority == PRIORITY_STAT  # kept by the routine instance after it
        last = study.last_received_at
    index.add_instances([record("9.4", series="1.2.3.99", own_output=True)])
    # a study known only through our own results is complete at once
    index.add_instances([record("8.1", study="7.7", series="7.7.1", own_output=True)])
    with index.db.session() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == "1.2.3")).one()
        assert (study.instance_count, study.last_received_at, study.status) == (4, last, StudyStatus.RECEIVING)
        own = s.scalars(select(Study).where(Study.study_instance_uid == "7.7")).one()
        assert own.status == StudyStatus.COMPLETE and own.completed_at is not None
        flags = dict(s.execute(select(Series.series_instance_uid, Series.is_own_output)).all())
        assert flags == {"1.2.3.1": False, "1.2.3.99": True, "7.7.1": True}
        details = s.scalars(select(AuditEvent.detail).where(AuditEvent.sop_instance_uid == "9.4")).all()
        assert details == ["1000 bytes (own output)"]


def test_a_series_first_seen_as_source_is_marked_own_when_our_output_joins_it(index: IngestIndex) -> None:
    index.add_instances([record("9.1")])
    index.add_instances([record("9.2", own_output=True)])
    with index.db.session() as s:
        assert s.scalars(select(Series.is_own_output)).one() is True


def test_after_a_failed_batch_each_record_gets_its_own_outcome(
    index: IngestIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import IntegrityError, OperationalError

    import db.ingest

    index.add_instances([record("9.9")])
    real = db.ingest.add_instance_rows

    def flaky(conn, rec, *more):  # type: ignore[no-untyped-def]
        if rec.sop_instance_uid == "9.3":
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        if rec.sop_instance_uid == "9.4":  # e.g. the series was removed by retention in between
            raise IntegrityError("INSERT", {}, Exception("FOREIGN KEY constraint failed"))
        return real(conn, rec, *more)

    monkeypatch.setattr(db.ingest, "add_instance_rows", flaky)
    outcomes = index.add_instances([record("9.1"), record("9.9"), record("9.3"), record("9.4")])
    assert outcomes[:2] == [True, False]  # indexed; already there (a true duplicate)
    assert isinstance(outcomes[2], OperationalError) and isinstance(outcomes[3], IntegrityError)
    assert [index.lookup(s)[0] for s in ("9.1", "9.3", "9.4")] == [True, False, False]


def test_a_series_uid_already_filed_under_another_study_is_refused(index: IngestIndex) -> None:
    from db.ingest import SeriesInOtherStudy

    index.add_instances([record("9.1")])
    (outcome,) = index.add_instances([record("8.1", study="7.7")])  # same series UID, another study
    assert isinstance(outcome, SeriesInOtherStudy)
    with index.db.session() as s:
        assert s.scalars(select(Series.instance_count)).one() == 1


def indexed_sops(db: Database) -> set[str]:
    """What another connection sees committed."""
    with db.engine.connect() as conn:
        return set(conn.scalars(select(Instance.sop_instance_uid)))


def test_rows_are_committed_only_once_ready_and_never_for_a_record_it_refuses(index: IngestIndex) -> None:
    seen_before: list[set[str]] = []
    disk_full = OSError(28, "No space left on device")

    def ready() -> list[BaseException | None]:  # the listener: its files' fsyncs
        seen_before.append(indexed_sops(index.db))
        return [None, disk_full, None]

    outcomes = index.add_instances([record("9.1"), record("9.2"), record("9.3")], ready=ready)
    assert outcomes == [True, disk_full, True]
    assert seen_before == [set()]  # nothing committed while the files were not yet durable
    assert indexed_sops(index.db) == {"9.1", "9.3"}
    with index.db.session() as s:
        assert s.scalars(select(Series.instance_count)).one() == 2


def test_ready_is_awaited_before_the_write_lock_when_another_writer_holds_it(index: IngestIndex) -> None:
    import threading

    called = threading.Event()

    def ready() -> list[BaseException | None]:
        called.set()
        return [None]

    outcome: list[object] = []
    with index.write_lock:  # another writer (the stability scan, another listener process)
        writer = threading.Thread(target=lambda: outcome.append(index.add_instances([record("9.1")], ready=ready)))
        writer.start()
        assert called.wait(30), "ready() waited for the lock: the lock would be held through the fsyncs"
        assert indexed_sops(index.db) == set()
    writer.join(30)
    assert outcome == [[True]] and indexed_sops(index.db) == {"9.1"}


def test_the_write_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    import subprocess
    import sys

    from db.host_lock import HostWriteLock, sqlite_write_lock_path

    url = f"sqlite:///{tmp_path / 'edgenode.db'}"
    path = sqlite_write_lock_path(url)
    assert path == tmp_path / "edgenode.db.write-lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO_ROOT), path=str(path))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = HostWriteLock(path)
        assert not lock.acquire(blocking=False)
        holder.kill()  # SIGKILL: the kernel releases its lock
        holder.wait(30)
        assert lock.acquire(blocking=True)
        lock.release()
    finally:
        holder.kill()
    assert sqlite_write_lock_path("postgresql+psycopg://u@h/db") is None


HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from db.host_lock import HostWriteLock
HostWriteLock(__import__("pathlib").Path({path!r})).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_audit_events_share_the_kept_connection_and_survive_a_failed_one(index: IngestIndex) -> None:
    index.record_event("association.accepted", calling_ae="CT1", peer_address="10.0.0.5", detail="128 contexts")
    assert index.add_instances([record("9.1")]) == [True]
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error for a value it cannot bind
        index.record_event("association.released", calling_ae=object())
    index.record_event("association.released", calling_ae="CT1", peer_address="10.0.0.5")
    with index.db.engine.connect() as conn:  # another connection: committed
        events = conn.execute(select(AuditEvent.event_type, AuditEvent.calling_ae).order_by(AuditEvent.id)).all()
    assert [tuple(e) for e in events] == [
        ("association.accepted", "CT1"),
        ("instance.stored", "CT1"),
        ("association.released", "CT1"),
    ]
