"""Study completion: quiet period, forced completion, late series, routing, priority, own output.

Instances arrive over DICOM (pynetdicom sender into a running node); the scans are called with an
explicit `now` derived from the database timestamps, so no test depends on how fast the machine is.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from db.models import (
    PRIORITY_ROUTINE,
    PRIORITY_STAT,
    AuditEvent,
    Job,
    JobStatus,
    Result,
    Series,
    Study,
    StudyStatus,
)
from node.app import EdgeNode
from tests.dicomgen import make_ct_series, make_dx
from tests.ingest_support import node_settings, running_node, sender_ae

STABLE = 1.0


def send(node: EdgeNode, datasets: list[Dataset]) -> None:
    ae = sender_ae()
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="EDGENODE")
    assert assoc.is_established
    for ds in datasets:
        assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()


def study_row(node: EdgeNode, uid: str) -> Study:
    with node.db.session() as s:
        return s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def jobs(node: EdgeNode, uid: str) -> list[Job]:
    with node.db.session() as s:
        return list(s.scalars(select(Job).join(Study).where(Study.study_instance_uid == uid).order_by(Job.id)).all())


def events(node: EdgeNode, uid: str) -> list[str]:
    with node.db.session() as s:
        return list(
            s.scalars(
                select(AuditEvent.event_type)
                .where(AuditEvent.study_instance_uid == uid)
                .where(AuditEvent.event_type.in_(["study.complete", "job.created", "job.superseded"]))
                .order_by(AuditEvent.id)
            ).all()
        )


def quiet_time(node: EdgeNode, uid: str, factor: float = 1.5) -> object:
    return study_row(node, uid).last_received_at + timedelta(seconds=STABLE * factor)


@pytest.fixture
def node(tmp_path: Path, database_url: str):  # type: ignore[no-untyped-def]
    # The scheduler's own scans are off (slowed right down, no wake-up at quiet end): the tests call scan() with
    # an explicit time.
    settings = node_settings(
        tmp_path / "var",
        database={"url": database_url},
        stability={
            "stable_seconds": STABLE,
            "max_wait_seconds": STABLE,
            "scan_interval_seconds": 3600,
            "scan_at_quiet_end": False,
        },
    )
    with running_node(settings) as running:
        yield running


def test_one_job_per_complete_study(node: EdgeNode) -> None:
    series = make_ct_series(4, 32, 32)
    uid = str(series[0].StudyInstanceUID)
    send(node, series)
    assert node.stability.scan(now=quiet_time(node, uid, 0.5)) == []  # still within the quiet period
    assert study_row(node, uid).status == StudyStatus.RECEIVING
    created = node.stability.scan(now=quiet_time(node, uid))
    assert len(created) == 1
    assert node.stability.scan(now=quiet_time(node, uid, 10)) == []  # nothing new: no second job
    [job] = jobs(node, uid)
    assert (job.status, job.priority, job.rule, job.destination_ae, job.instance_count) == (
        JobStatus.QUEUED,
        PRIORITY_ROUTINE,
        "chest",
        "SENDER",
        4,
    )
    study = study_row(node, uid)
    assert (study.status, study.completed_instance_count) == (StudyStatus.QUEUED, 4)
    assert study.completed_at is not None
    send(node, series)  # a resend is all duplicates: the study does not grow
    assert node.stability.scan(now=quiet_time(node, uid, 10)) == []
    assert events(node, uid) == ["study.complete", "job.created"]


def test_late_series_gives_a_new_job_that_supersedes_the_old(node: EdgeNode) -> None:
    first = make_ct_series(3, 32, 32)
    uid = str(first[0].StudyInstanceUID)
    send(node, first)
    [old_id] = node.stability.scan(now=quiet_time(node, uid))
    send(node, make_ct_series(2, 32, 32, study_uid=uid, series_number=2))
    assert node.stability.scan(now=quiet_time(node, uid, 0.5)) == []
    [new_id] = node.stability.scan(now=quiet_time(node, uid))
    old, new = jobs(node, uid)
    assert (old.id, new.id) == (old_id, new_id)
    assert (old.status, old.superseded_by) == (JobStatus.SUPERSEDED, new_id)
    assert (new.status, new.instance_count) == (JobStatus.QUEUED, 5)
    assert study_row(node, uid).completed_instance_count == 5
    assert events(node, uid) == ["study.complete", "job.created", "study.complete", "job.superseded", "job.created"]


def test_forced_completion_after_max_wait(node: EdgeNode) -> None:
    series = make_ct_series(2, 32, 32)
    uid = str(series[0].StudyInstanceUID)
    send(node, series[:1])
    time.sleep(0.3)  # the second slice arrives a little later: the study keeps "receiving"
    send(node, series[1:])
    study = study_row(node, uid)
    now = study.last_received_at + timedelta(seconds=STABLE * 0.9)  # not quiet yet...
    assert now - study.first_received_at >= timedelta(seconds=STABLE)  # ...but max_wait has passed
    assert len(node.stability.scan(now=now)) == 1
    with node.db.session() as s:
        detail = s.scalars(select(AuditEvent.detail).where(AuditEvent.event_type == "study.complete")).one()
    assert detail.startswith("forced")


def test_own_results_never_trigger_work(node: EdgeNode) -> None:
    series = make_ct_series(2, 32, 32)
    uid = str(series[0].StudyInstanceUID)
    send(node, series)
    [job_id] = node.stability.scan(now=quiet_time(node, uid))
    # (a) an object carrying our Manufacturer, (b) an object whose SOP Instance UID is in our results table
    ours = make_ct_series(1, 32, 32, study_uid=uid, series_number=99)[0]
    ours.Manufacturer = "edgenode"
    recorded = make_ct_series(1, 32, 32, study_uid=uid, series_number=98)[0]
    with node.db.session() as s:
        s.add(
            Result(
                job_id=job_id,
                kind="sc",
                sop_instance_uid=str(recorded.SOPInstanceUID),
                sop_class_uid=str(recorded.SOPClassUID),
                series_instance_uid=str(recorded.SeriesInstanceUID),
                path="results/x.dcm",
            )
        )
    before = study_row(node, uid)
    send(node, [ours, recorded])
    after = study_row(node, uid)
    assert after.last_received_at == before.last_received_at
    assert after.instance_count == 4
    assert node.stability.scan(now=quiet_time(node, uid, 100)) == []
    assert [j.status for j in jobs(node, uid)] == [JobStatus.QUEUED]
    with node.db.session() as s:
        own = dict(s.execute(select(Series.series_number, Series.is_own_output)).all())
    assert own == {1: False, 98: True, 99: True}

    only_ours = make_ct_series(1, 32, 32)[0]  # a study we only know through our own output
    only_ours.Manufacturer = "EDGENODE"
    send(node, [only_ours])
    assert node.stability.scan(now=quiet_time(node, str(only_ours.StudyInstanceUID), 100)) == []
    assert study_row(node, str(only_ours.StudyInstanceUID)).status == StudyStatus.COMPLETE


def test_routing_by_modality_and_stat_from_the_study(node: EdgeNode) -> None:
    mr = make_ct_series(2, 32, 32)
    for ds in mr:
        ds.Modality = "MR"  # no default rule takes MR
    dx = make_dx(32, 32)
    item = Dataset()
    item.RequestedProcedurePriority = "STAT"
    dx.RequestAttributesSequence = [item]
    send(node, [*mr, dx])
    mr_uid, dx_uid = str(mr[0].StudyInstanceUID), str(dx.StudyInstanceUID)
    node.stability.scan(now=max(quiet_time(node, mr_uid), quiet_time(node, dx_uid)))
    assert jobs(node, mr_uid) == []
    assert study_row(node, mr_uid).status == StudyStatus.COMPLETE
    [job] = jobs(node, dx_uid)
    assert job.priority == PRIORITY_STAT


def test_rule_priority_destination_and_filters(tmp_path: Path) -> None:
    rules = [
        {
            "name": "er-chest",
            "modalities": ["CT"],
            "body_parts": ["CHEST"],
            "series_description": "chest",
            "calling_ae": ["SENDER"],
            "priority": "stat",
            "destination": "PACS",
        },
        {"name": "other-ct", "modalities": ["CT"]},
    ]
    peers = [{"ae_title": "SENDER", "host": "127.0.0.1"}, {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]
    settings = node_settings(
        tmp_path / "var",
        peers=peers,
        routing=rules,
        stability={
            "stable_seconds": STABLE,
            "max_wait_seconds": 60,
            "scan_interval_seconds": 3600,
            "scan_at_quiet_end": False,
        },
    )
    with running_node(settings) as node:
        chest = make_ct_series(1, 32, 32)
        abdomen = make_ct_series(1, 32, 32)
        abdomen[0].BodyPartExamined = "ABDOMEN"
        send(node, [*chest, *abdomen])
        now = max(quiet_time(node, str(s[0].StudyInstanceUID)) for s in (chest, abdomen))
        node.stability.scan(now=now)
        [chest_job] = jobs(node, str(chest[0].StudyInstanceUID))
        [abdomen_job] = jobs(node, str(abdomen[0].StudyInstanceUID))
        assert (chest_job.rule, chest_job.priority, chest_job.destination_ae) == ("er-chest", PRIORITY_STAT, "PACS")
        assert (abdomen_job.rule, abdomen_job.priority, abdomen_job.destination_ae) == (
            "other-ct",
            PRIORITY_ROUTINE,
            "SENDER",
        )


def test_scheduler_runs_the_scan(tmp_path: Path) -> None:
    """End to end with the real scheduler: a job appears by itself after the quiet period."""
    settings = node_settings(
        tmp_path / "var", stability={"stable_seconds": 0.5, "max_wait_seconds": 60, "scan_interval_seconds": 0.2}
    )
    with running_node(settings) as node:
        series = make_ct_series(2, 32, 32)
        send(node, series)
        deadline = time.monotonic() + 60
        while not jobs(node, str(series[0].StudyInstanceUID)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(jobs(node, str(series[0].StudyInstanceUID))) == 1


@pytest.mark.parametrize("listeners", [1, 2])
def test_scan_runs_when_the_quiet_period_ends(tmp_path: Path, listeners: int) -> None:
    """With the periodic scan an hour apart, the one-shot wake-up armed by the last instance completes the study
    right after its quiet period (not before it, and not at the next periodic scan); with listener processes too,
    whose notes reach the main process through a socket, at most one per study every fifth of a second."""
    settings = node_settings(
        tmp_path / "var",
        node={"listeners": listeners},
        stability={"stable_seconds": STABLE, "max_wait_seconds": 60, "scan_interval_seconds": 3600},
    )
    with running_node(settings) as node:
        series = make_ct_series(3, 32, 32)
        uid = str(series[0].StudyInstanceUID)
        send(node, series[:2])
        time.sleep(0.5)
        send(node, series[2:])  # re-arms the wake-up: the quiet period restarts here
        deadline = time.monotonic() + 60
        while not jobs(node, uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        [job] = jobs(node, uid)
        study = study_row(node, uid)
        assert job.instance_count == 3  # completed once, after the last instance
        assert job.created_at - study.last_received_at >= timedelta(seconds=STABLE)
        assert events(node, uid) == ["study.complete", "job.created"]


def test_quiet_end_waker_rearms_one_scan_per_study() -> None:
    """A study's one-shot scan runs stable_seconds after its LAST instance; studies do not share one."""
    from datetime import UTC, datetime

    from apscheduler.schedulers.background import BackgroundScheduler

    from node.config import load_settings
    from node.scheduler import QuietEndWaker

    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.start(paused=True)  # jobs are stored (and replaced) but nothing runs by itself
    scans: list[int] = []
    now = [1000.0]
    settings = load_settings(None, stability={"stable_seconds": 30.0})
    waker = QuietEndWaker(scheduler, settings, lambda: scans.append(1), clock=lambda: now[0])
    waker.note_instance("1.2.3")
    now[0] += 10
    waker.note_instance("1.2.3")  # 10 s later: the quiet period now ends at 40 s
    waker.note_instance("1.2.4")
    jobs = {job.id: job for job in scheduler.get_jobs()}
    assert set(jobs) == {"quiet-end:1.2.3", "quiet-end:1.2.4"}
    assert timedelta(seconds=29) < jobs["quiet-end:1.2.4"].trigger.run_date - datetime.now(UTC) <= timedelta(seconds=31)

    now[0] += 20  # the first job's time (30 s after the first instance): not quiet yet, armed again for 10 s
    jobs["quiet-end:1.2.3"].func(*jobs["quiet-end:1.2.3"].args)
    assert scans == []
    again = scheduler.get_job("quiet-end:1.2.3")
    assert timedelta(seconds=9) < again.trigger.run_date - datetime.now(UTC) <= timedelta(seconds=11)
    now[0] += 10.1  # 30 s (and the margin) after the last instance: the scan runs
    again.func(*again.args)
    assert scans == [1]
    jobs["quiet-end:1.2.4"].func(*jobs["quiet-end:1.2.4"].args)  # the other study's, quiet too by now
    assert scans == [1, 1]
    scheduler.shutdown(wait=False)


def test_sources_after_our_own_results_complete_the_study_as_new_not_grown(node: EdgeNode) -> None:
    ours = make_ct_series(1, 32, 32, series_number=99)[0]
    ours.Manufacturer = "edgenode"  # e.g. our results reached the node before the study's images did
    uid = str(ours.StudyInstanceUID)
    send(node, [ours])
    send(node, make_ct_series(2, 32, 32, study_uid=uid))
    assert len(node.stability.scan(now=quiet_time(node, uid))) == 1
    with node.db.session() as s:
        detail = s.scalars(select(AuditEvent.detail).where(AuditEvent.event_type == "study.complete")).one()
    assert "2 source instance(s)" in detail and "grew" not in detail
