"""The job queue on SQLite and PostgreSQL: ordering, leases, retries, and concurrent claimers in real processes."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from db.jobs import (
    claim_next_job,
    complete_job,
    fail_job,
    heartbeat,
    requeue_expired,
    requeue_owned_by,
)
from db.models import PRIORITY_ROUTINE, PRIORITY_STAT, AuditEvent, Job, JobStatus, Study, StudyStatus, utcnow
from db.session import Database


def _db(database_url: str) -> Database:
    return Database(database_url)


def _add_job(db: Database, uid: str, priority: int = PRIORITY_ROUTINE, age_s: float = 0.0) -> int:
    with db.session() as s:
        study = s.execute(select(Study).where(Study.study_instance_uid == uid)).scalar_one_or_none()
        if study is None:
            study = Study(study_instance_uid=uid, patient_id="P", status=StudyStatus.QUEUED)
            s.add(study)
            s.flush()
        job = Job(study_id=study.id, priority=priority, created_at=utcnow() - timedelta(seconds=age_s))
        s.add(job)
        s.flush()
        return job.id


def test_stat_first_then_oldest(database_url: str) -> None:
    db = _db(database_url)
    old_routine = _add_job(db, "1.1", age_s=100)
    new_routine = _add_job(db, "1.2", age_s=10)
    stat = _add_job(db, "1.3", PRIORITY_STAT, age_s=1)
    order = []
    for _ in range(3):
        with db.session() as s:
            claimed = claim_next_job(s, "w1", 60)
            assert claimed is not None
            order.append(claimed.id)
    assert order == [stat, old_routine, new_routine]
    with db.session() as s:
        assert claim_next_job(s, "w1", 60) is None


def test_complete_only_by_owner_and_study_done(database_url: str) -> None:
    db = _db(database_url)
    job_id = _add_job(db, "2.1")
    with db.session() as s:
        claim_next_job(s, "w1", 60)
    with db.session() as s:
        assert not complete_job(s, job_id, "intruder", score=1.0, uncertainty=0.1, model_id="m", timings={})
    with db.session() as s:
        assert complete_job(s, job_id, "w1", score=0.7, uncertainty=0.1, model_id="m-1", timings={"infer": 1.5})
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.DONE and job.score == 0.7 and job.timings == {"infer": 1.5}
        assert job.study.status == StudyStatus.DONE
        events = [e.event_type for e in s.execute(select(AuditEvent)).scalars()]
        assert events == ["job.started", "job.done"]


def test_failures_back_off_then_give_up(database_url: str) -> None:
    db = _db(database_url)
    job_id = _add_job(db, "3.1")
    now = utcnow()
    with db.session() as s:
        claim_next_job(s, "w1", 60, now=now)
        assert fail_job(s, job_id, "w1", "boom", max_attempts=2, backoff_seconds=30, now=now) == JobStatus.QUEUED
    with db.session() as s:
        assert claim_next_job(s, "w1", 60, now=now + timedelta(seconds=29)) is None  # still backing off
        claimed = claim_next_job(s, "w1", 60, now=now + timedelta(seconds=31))
        assert claimed is not None and claimed.attempts == 2
        assert fail_job(s, job_id, "w1", "boom again", max_attempts=2, backoff_seconds=30) == JobStatus.FAILED
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.FAILED and "boom again" in job.error
        assert job.study.status == StudyStatus.FAILED


def test_dead_worker_lease_expires_and_job_is_requeued(database_url: str) -> None:
    db = _db(database_url)
    job_id = _add_job(db, "4.1")
    now = utcnow()
    with db.session() as s:
        claim_next_job(s, "dead-worker", 10, now=now)
    with db.session() as s:
        assert requeue_expired(s, max_attempts=3, backoff_seconds=0, now=now + timedelta(seconds=5)) == []
        assert requeue_expired(s, max_attempts=3, backoff_seconds=0, now=now + timedelta(seconds=11)) == [job_id]
    with db.session() as s:
        assert not heartbeat(s, job_id, "dead-worker", 10)  # the old owner lost the job
        claimed = claim_next_job(s, "w2", 10, now=now + timedelta(seconds=12))
        assert claimed is not None and claimed.id == job_id and claimed.attempts == 2


def test_restart_requeues_running_jobs(database_url: str) -> None:
    db = _db(database_url)
    job_id = _add_job(db, "5.1")
    with db.session() as s:
        claim_next_job(s, "w-before-crash", 600)
    with db.session() as s:
        assert requeue_owned_by(s) == [job_id]
    with db.session() as s:
        assert s.get(Job, job_id).status == JobStatus.QUEUED


def _claim_all(url: str, owner: str, out: multiprocessing.Queue) -> None:
    db = Database(url, run_migrations=False)
    claimed = []
    while True:
        with db.session() as s:
            job = claim_next_job(s, owner, 60)
        if job is None:
            break
        claimed.append(job.id)
    out.put(claimed)


def test_concurrent_workers_never_claim_the_same_job(database_url: str) -> None:
    db = _db(database_url)
    ids = {_add_job(db, f"6.{n}") for n in range(40)}
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(db.url, f"w{n}", results)) for n in range(3)]
    for p in procs:
        p.start()
    claimed = [job_id for _ in procs for job_id in results.get(timeout=120)]
    for p in procs:
        p.join(timeout=30)
    assert sorted(claimed) == sorted(ids)  # each job exactly once


# ---- waking idle workers --------------------------------------------------------------------------------------


def _serve_in_thread(run_once, wake):  # type: ignore[no-untyped-def]
    import threading

    from node.worker import serve_jobs

    stop = threading.Event()
    thread = threading.Thread(target=serve_jobs, args=(run_once, stop, wake, 3600.0), daemon=True)
    thread.start()
    return stop, thread


def test_idle_worker_claims_a_new_job_when_woken_not_at_its_next_poll() -> None:
    """The poll interval is an hour here: only the wake-up can make the worker look again."""
    import threading

    queued: list[int] = []
    claimed: list[int] = []
    looked = threading.Semaphore(0)

    def run_once() -> bool:
        job = queued.pop() if queued else None
        if job is not None:
            claimed.append(job)
        looked.release()
        return job is not None

    wake = multiprocessing.get_context("spawn").Event()
    stop, thread = _serve_in_thread(run_once, wake)
    assert looked.acquire(timeout=30)  # the first look: nothing queued, the worker waits
    queued.append(7)
    wake.set()  # what EdgeNode.scan_studies does through WorkerSupervisor.wake()
    assert looked.acquire(timeout=30) and claimed == [7]
    stop.set()
    wake.set()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_job_created_during_a_claim_is_not_slept_through() -> None:
    """The wake-up that arrives while the worker is claiming (and finding nothing) makes it look again at once."""
    import threading

    wake = multiprocessing.get_context("spawn").Event()
    looks: list[int] = []
    second_look = threading.Event()

    def run_once() -> bool:
        looks.append(1)
        if len(looks) == 1:
            wake.set()  # a job is created (and the workers woken) while this claim finds nothing
        else:
            second_look.set()
        return False

    stop, thread = _serve_in_thread(run_once, wake)
    assert second_look.wait(timeout=30)
    stop.set()
    wake.set()
    thread.join(timeout=30)


def test_stability_scan_wakes_the_workers_when_it_creates_jobs(tmp_path: Path) -> None:
    from tests.dicomgen import make_ct_series
    from tests.ingest_support import node_settings, running_node, sender_ae

    class Workers:
        woken = 0

        def wake(self) -> None:
            self.woken += 1

    stability = {"stable_seconds": 0, "max_wait_seconds": 60, "scan_interval_seconds": 3600, "scan_at_quiet_end": False}
    with running_node(node_settings(tmp_path / "var", stability=stability)) as node:
        workers = Workers()
        node.workers = workers  # type: ignore[assignment]
        assert node.scan_studies() == [] and workers.woken == 0  # nothing created: nobody woken
        assoc = sender_ae().associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
        for ds in make_ct_series(2, 16, 16):
            assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        assert len(node.scan_studies()) == 1 and workers.woken == 1


def test_a_rule_for_any_modality_analyses_every_image_modality() -> None:
    from node.config import RoutingRule
    from node.job_series import IMAGE_MODALITIES, modalities_to_process

    assert modalities_to_process(RoutingRule(name="any", modalities=[])) == IMAGE_MODALITIES  # empty = any
    assert modalities_to_process(RoutingRule(name="ct", modalities=["ct", "MR"])) == ("CT",)
    assert modalities_to_process(None) == IMAGE_MODALITIES  # the rule was removed from the config since


def test_each_worker_slot_gets_its_gpu_and_cpu_workers_none() -> None:
    import torch

    from node.model_loader import pin_worker_gpu

    assert pin_worker_gpu(0, "cpu") is None
    if not torch.cuda.is_available():
        assert pin_worker_gpu(1, "auto") is None
        return
    count = torch.cuda.device_count()
    assert pin_worker_gpu(count + 1, "auto") == 1 % count == torch.cuda.current_device()
    pin_worker_gpu(0, "auto")


def _just_before_the_first_update(session, change) -> None:  # type: ignore[no-untyped-def]
    """Run `change` (another process's commit) right before `session` writes its first UPDATE."""
    from sqlalchemy import event

    fired: list[bool] = []

    @event.listens_for(session, "do_orm_execute")
    def _interleave(state) -> None:  # type: ignore[no-untyped-def]
        if state.is_update and not fired:
            fired.append(True)
            change()


def test_a_failure_reported_after_the_job_was_superseded_does_not_requeue_it(database_url: str) -> None:
    db = _db(database_url)
    job_id = _add_job(db, "1.2.1")
    with db.session() as s:
        claim_next_job(s, "w1", 60)

    def supersede() -> None:
        with db.session() as other:
            job = other.get(Job, job_id)
            job.status, job.superseded_by = JobStatus.SUPERSEDED, 99

    with db.session() as s:
        _just_before_the_first_update(s, supersede)
        assert fail_job(s, job_id, "w1", "boom", max_attempts=3, backoff_seconds=0) is None
    with db.session() as s:
        assert s.get(Job, job_id).status == JobStatus.SUPERSEDED


def test_a_job_completed_while_its_expired_lease_is_requeued_stays_done(database_url: str) -> None:
    db = _db(database_url)
    job_id = _add_job(db, "1.2.2")
    with db.session() as s:
        claim_next_job(s, "w1", 1)

    def complete() -> None:
        with db.session() as other:
            assert complete_job(other, job_id, "w1", score=0.5, uncertainty=0.1, model_id="m", timings={})

    later = utcnow() + timedelta(seconds=5)
    with db.session() as s:
        _just_before_the_first_update(s, complete)
        assert requeue_expired(s, max_attempts=3, backoff_seconds=0, now=later) == []
    with db.session() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.study.status) == (JobStatus.DONE, StudyStatus.DONE)
