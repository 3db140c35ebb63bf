"""Several nodes on one database: migrations at once, concurrent claimers, leases on the database's clock, start-up
recovery of only this node's jobs, one active job per study and concurrent stability scans, the append-only audit
trail and downgrade. Each runs on SQLite and on a real PostgreSQL server (tests/postgres.py) unless it says why not.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from db.audit import record_audit
from db.clock import db_utcnow
from db.host_lock import HostWriteLock
from db.ingest import IngestIndex, InstanceRecord, add_instance_rows
from db.jobs import claim_next_job, requeue_expired, requeue_owned_by
from db.models import AuditEvent, AuditEventType, Job, JobStatus, Study, StudyStatus, utcnow
from db.session import Database, alembic_config, make_engine
from node.config import load_settings
from node.identity import node_identity, worker_owner
from node.stability import StabilityScanner
from tests.test_ingest_index import record


def _add_job(db: Database, uid: str) -> int:
    with db.session() as s:
        study = Study(study_instance_uid=uid, patient_id="P", status=StudyStatus.QUEUED)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id)
        s.add(job)
        s.flush()
        return job.id


# ---- migrations --------------------------------------------------------------------------------------------------


def _open(url: str, out: multiprocessing.Queue) -> None:
    try:
        Database(url).dispose()
        out.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test, which names it
        out.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_processes_starting_together_on_an_empty_database_all_migrate(database_url: str) -> None:
    """Without the migration lock the second of two nodes on PostgreSQL died with UniqueViolation (3 of 3 tries)."""
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_open, args=(database_url, out)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert outcomes == ["ok"] * 4
    db = Database(database_url, run_migrations=False)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


def test_downgrade_to_nothing_and_upgrade_again(database_url: str) -> None:
    """PostgreSQL's downgrade failed on DROP TRIGGER without ON <table>."""
    db = Database(database_url)
    _add_job(db, "1.1")
    config = alembic_config(db.engine)
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 0
    db.dispose()
    db = Database(database_url)
    _add_job(db, "1.1")  # the tables are back, empty
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1


def test_the_audit_trail_is_append_only(database_url: str) -> None:
    db = Database(database_url)
    with db.session() as s:
        record_audit(s, AuditEventType.NODE_STARTED, detail="first")
    for statement in ("UPDATE audit_events SET detail = 'rewritten'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), db.engine.begin() as conn:
            conn.execute(text(statement))
    with db.session() as s:
        assert s.scalars(select(AuditEvent.detail)).all() == ["first"]


def test_upgrading_keeps_only_the_newest_active_job_of_a_study(database_url: str) -> None:
    """A database from before the one-active-job index, with the duplicate the racing scans made."""
    engine = make_engine(database_url)
    config = alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
    with engine.begin() as conn:
        conn.execute(Study.__table__.insert().values(id=1, study_instance_uid="2.1"))
        conn.execute(
            Job.__table__.insert(),
            [{"id": n, "study_id": 1, "status": JobStatus.QUEUED, "timings": {}} for n in (1, 2)],
        )
    engine.dispose()
    db = Database(database_url)
    with db.session() as s:
        rows = s.execute(select(Job.id, Job.status, Job.superseded_by).order_by(Job.id)).all()
    assert rows == [(1, JobStatus.SUPERSEDED, 2), (2, JobStatus.QUEUED, None)]


def test_the_schema_refuses_a_second_active_job_for_a_study(database_url: str) -> None:
    db = Database(database_url)
    _add_job(db, "3.1")
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(Job(study_id=1))
    with db.session() as s:  # a finished job and a new active one are fine
        s.execute(Job.__table__.update().values(status=JobStatus.DONE))
        s.add(Job(study_id=1))
    with db.session() as s:
        assert sorted(s.scalars(select(Job.status)).all()) == [JobStatus.DONE, JobStatus.QUEUED]


# ---- claims and leases -------------------------------------------------------------------------------------------


def test_four_concurrent_claimers_never_see_an_empty_queue_while_jobs_are_queued(database_url: str) -> None:
    """Each claimer takes jobs until it is told the queue is empty: that may only happen once every job is taken.
    On PostgreSQL the old top-five-then-conditional-UPDATE claim gave up with ~290 of 400 jobs still queued."""
    db = Database(database_url)
    total = 120
    with db.session() as s:
        studies = [Study(study_instance_uid=f"4.{n}", patient_id="P") for n in range(total)]
        s.add_all(studies)
        s.flush()
        s.add_all([Job(study_id=study.id) for study in studies])
    claimed: dict[str, list[int]] = {}
    queued_when_empty: list[int] = []
    start = threading.Barrier(4)

    def claimer(owner: str) -> None:
        mine = claimed.setdefault(owner, [])
        start.wait()
        while True:
            with db.session() as s:
                job = claim_next_job(s, owner, 60)
            if job is None:
                with db.session() as s:  # queued jobs no other claimer is taking at this moment (row-locked)
                    free = select(Job.id).where(Job.status == JobStatus.QUEUED).with_for_update(skip_locked=True)
                    queued_when_empty.append(s.scalar(select(func.count()).select_from(free.subquery())))
                return
            mine.append(job.id)

    threads = [threading.Thread(target=claimer, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    every = sorted(job_id for ids in claimed.values() for job_id in ids)
    assert every == list(range(1, total + 1))  # each job exactly once
    assert queued_when_empty == [0, 0, 0, 0]


def test_leases_are_set_and_judged_on_the_database_clock(database_url: str) -> None:
    db = Database(database_url)
    short, long = _add_job(db, "5.1"), _add_job(db, "5.2")
    with db.session() as s:
        assert claim_next_job(s, "w-short", -5).id == short  # a lease that ran out 5 s ago on the database's clock
        assert claim_next_job(s, "w-long", 600).id == long
    with db.session() as s:
        started, expires, db_now = s.execute(
            select(Job.started_at, Job.lease_expires_at, db_utcnow()).where(Job.id == long)
        ).one()
        assert requeue_expired(s, max_attempts=3, backoff_seconds=0) == [short]  # judged by the database too
    assert expires - started == timedelta(seconds=600)  # both from one reading of the database's clock
    assert timedelta(0) <= db_now - started < timedelta(minutes=5)


def test_claim_times_come_from_the_database_server(postgres_url: str) -> None:
    """PostgreSQL's now() is the transaction's start: a claim inside a transaction stamps exactly that time,
    which no clock on the node could reproduce."""
    db = Database(postgres_url)
    job_id = _add_job(db, "6.1")
    with db.session() as s:
        server_now = s.scalar(text("SELECT now() AT TIME ZONE 'utc'"))
        claim_next_job(s, "w1", 60)
        started, heartbeat = s.execute(select(Job.started_at, Job.heartbeat_at).where(Job.id == job_id)).one()
    assert started.replace(tzinfo=None) == server_now == heartbeat.replace(tzinfo=None)


# ---- owners and start-up recovery --------------------------------------------------------------------------------


def test_owner_ids_carry_the_node_identity_which_survives_a_restart(tmp_path: Path) -> None:
    identity = node_identity(tmp_path / "a")
    assert node_identity(tmp_path / "a") == identity  # a restart keeps it
    assert node_identity(tmp_path / "b") != identity  # another node on the same host (or a clone) differs
    owner = worker_owner(identity, 3, 7)
    assert owner.startswith(identity + "/") and owner.endswith("-3.7") and len(owner) <= 64


def test_start_up_recovery_requeues_only_this_nodes_jobs(database_url: str, tmp_path: Path) -> None:
    db = Database(database_url)
    mine, theirs = _add_job(db, "7.1"), _add_job(db, "7.2")
    here, there = node_identity(tmp_path / "here"), node_identity(tmp_path / "there")
    with db.session() as s:
        claim_next_job(s, worker_owner(here, 0, 1), 600)
        claim_next_job(s, worker_owner(there, 0, 1), 600)
    with db.session() as s:
        assert requeue_owned_by(s, prefix=here + "/") == [mine]
    with db.session() as s:
        status = dict(s.execute(select(Job.id, Job.status)).all())
    assert status == {mine: JobStatus.QUEUED, theirs: JobStatus.RUNNING}


# ---- concurrent stability scans ----------------------------------------------------------------------------------


def _receive_study(db: Database, uid: str, received_hours_ago: float) -> None:
    index = IngestIndex(db)
    for n in range(3):
        index.add_instance(_instance(uid, n))
    with db.session() as s:
        s.execute(Study.__table__.update().values(last_received_at=utcnow() - timedelta(hours=received_hours_ago)))


def test_two_concurrent_scans_of_one_study_create_exactly_one_job(database_url: str, tmp_path: Path) -> None:
    """Two nodes' scans both read the study as due before either writes (a lock held by the test makes their writes
    wait): the one that writes second must see the first's decision. Before, this made two jobs every time."""
    settings = load_settings(None, node={"data_dir": str(tmp_path)}, database={"url": database_url})
    _receive_study(Database(database_url), "8.1", received_hours_ago=1)
    blocker = make_engine(database_url)
    scanners, about_to_write = [], []
    for _ in range(2):  # two nodes: their own engines and ingest indexes
        db = Database(database_url, run_migrations=False)
        writing = threading.Event()

        def note_write(_conn, _cursor, statement, *_args, writing=writing) -> None:  # type: ignore[no-untyped-def]
            if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
                writing.set()

        event.listen(db.engine, "before_cursor_execute", note_write)
        index = IngestIndex(db)
        # Nodes on other machines: no write lock in common. (On one machine SQLite writers share a file lock,
        # db/host_lock.py, which would keep the second scan from reading before the first has written.)
        index.write_lock = HostWriteLock(None)
        scanners.append(StabilityScanner(settings, db, index))
        about_to_write.append(writing)
    created: list[list[int]] = []
    with blocker.connect() as conn:
        if blocker.dialect.name == "postgresql":
            conn.execute(text("SELECT id FROM studies FOR UPDATE"))  # their UPDATE of the study waits for us
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite: the write lock; readers still read
        threads = [threading.Thread(target=lambda sc=sc: created.append(sc.scan())) for sc in scanners]
        for t in threads:
            t.start()
        for writing in about_to_write:
            assert writing.wait(timeout=60), "a scan never reached its write"
        conn.rollback()
    for t in threads:
        t.join(timeout=120)
    assert sorted(len(ids) for ids in created) == [0, 1]
    with scanners[0].db.session() as s:
        assert s.execute(select(Job.status)).scalars().all() == [JobStatus.QUEUED]
        kinds = s.scalars(select(AuditEvent.event_type).where(AuditEvent.study_instance_uid == "8.1")).all()
    assert kinds.count(AuditEventType.STUDY_COMPLETE) == 1 and kinds.count(AuditEventType.JOB_CREATED) == 1


def test_without_a_shared_spool_a_studys_job_stays_with_the_node_that_received_it(database_url: str) -> None:
    """Nodes with spools of their own: a claimer takes only jobs of studies in its spool (and of studies from before
    spool ids were recorded); nodes sharing a spool share one id, so any of them takes any job."""
    db = Database(database_url)
    try:
        theirs, ours, legacy = _add_job(db, "7.1"), _add_job(db, "7.2"), _add_job(db, "7.3")
        with db.session() as s:
            for job_id, spool in ((theirs, "spool-b"), (ours, "spool-a"), (legacy, None)):
                s.get_one(Job, job_id).study.spool_id = spool
        with db.session() as s:
            first = claim_next_job(s, "a-1", 60, spool_id="spool-a")
            second = claim_next_job(s, "a-2", 60, spool_id="spool-a")
            third = claim_next_job(s, "a-3", 60, spool_id="spool-a")
        assert first is not None and second is not None and third is None
        assert {first.id, second.id} == {ours, legacy}
        with db.session() as s:
            taken = claim_next_job(s, "b-1", 60, spool_id="spool-b")
        assert taken is not None and taken.id == theirs
    finally:
        db.dispose()


def _waiting_for_locks(watcher: Engine) -> int:
    """How many sessions of the test database wait for a lock (PostgreSQL)."""
    with watcher.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def _instance(study_uid: str, n: int) -> InstanceRecord:
    return record(f"{study_uid}.1.{n}", series=study_uid + ".1", study=study_uid, calling_ae="PACS")


def test_a_new_study_arriving_at_several_nodes_at_once_is_indexed_by_all(postgres_url: str) -> None:
    """One node has created a new study's row (not yet committed) while two others index instances of the same study
    and series: their inserts wait for its row, and once it commits they must add to it (and to each other's new
    series row). Before, they failed with UniqueViolation and the PACS got a failure status for those instances.
    PostgreSQL only: SQLite serves one node, whose ingest is serialised by its write lock."""
    Database(postgres_url).dispose()  # the schema
    first = make_engine(postgres_url)
    watcher = make_engine(postgres_url)
    nodes = [IngestIndex(Database(postgres_url, run_migrations=False), spool_id="shared") for _ in range(2)]
    outcomes: list[bool | BaseException] = []

    def index(node: IngestIndex, n: int) -> None:
        try:
            outcomes.append(node.add_instance(_instance("9.1", n)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcomes.append(exc)

    try:
        with first.begin() as conn:  # the first node's transaction, holding the new study's row
            conn.execute(Study.__table__.insert().values(study_instance_uid="9.1", patient_id="P", spool_id="shared"))
            threads = [threading.Thread(target=index, args=(node, n)) for n, node in enumerate(nodes, start=1)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while _waiting_for_locks(watcher) < len(nodes):  # both have looked the study up, found none, and now wait
                assert time.monotonic() < deadline, "the other nodes never reached their insert of the study"
                time.sleep(0.05)
        for t in threads:
            t.join(timeout=60)
        assert outcomes == [True, True]
        with nodes[0].db.session() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == "9.1")).one()
            assert study.instance_count == 2 and [len(series.instances) for series in study.series] == [2]
    finally:
        for node in nodes:
            node.db.dispose()
        first.dispose()
        watcher.dispose()


def test_two_series_of_one_study_indexed_at_once_never_deadlock(postgres_url: str) -> None:
    """Listener A has indexed an instance of series 1 and, before it commits, indexes one of series 2, while
    listener B indexes another of series 2. Rows are locked study first, so B waits for A's study row without
    holding series 2. Before, B held series 2 and waited for the study while A waited for series 2: PostgreSQL
    aborted one as a deadlock (seen as status 0x0110 from listener processes storing one study's two series)."""
    index = IngestIndex(Database(postgres_url))
    for series, n in (("10.1.1", 0), ("10.1.2", 0)):  # the study and both series exist
        assert index.add_instance(record(f"{series}.{n}", series=series, study="10.1"))
    index.db.dispose()
    listener_a = make_engine(postgres_url)
    listener_b = IngestIndex(Database(postgres_url, run_migrations=False))
    watcher = make_engine(postgres_url)
    errors: list[BaseException] = []
    for engine in (listener_a, listener_b.db.engine):
        event.listen(engine, "handle_error", lambda context: errors.append(context.original_exception))

    def index_b() -> None:
        try:
            listener_b.add_instance(record("10.1.2.1", series="10.1.2", study="10.1"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        with listener_a.begin() as conn:
            add_instance_rows(conn, record("10.1.1.1", series="10.1.1", study="10.1"))
            b = threading.Thread(target=index_b)
            b.start()
            deadline = time.monotonic() + 60
            while _waiting_for_locks(watcher) < 1:  # B waits for a row A holds
                assert time.monotonic() < deadline, "listener B never waited for listener A"
                time.sleep(0.05)
            add_instance_rows(conn, record("10.1.2.2", series="10.1.2", study="10.1"))
        b.join(timeout=60)
        assert errors == []
        with listener_b.db.session() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == "10.1")).one()
            assert study.instance_count == 5
            assert sorted(series.instance_count for series in study.series) == [2, 3]
    finally:
        listener_b.db.dispose()
        listener_a.dispose()
        watcher.dispose()
