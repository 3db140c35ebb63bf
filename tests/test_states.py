"""Job and study status transitions: the one table, and the queue functions keeping to it on a real database."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select

from db.jobs import claim_next_job, complete_job, defer_job, fail_job, release_job, requeue_owned_by
from db.models import Job, JobStatus, Study, StudyStatus
from db.session import Database
from db.states import (
    JOB_TRANSITIONS,
    STUDY_TRANSITIONS,
    IllegalTransition,
    job_may_move,
    job_states_leading_to,
    move_job,
    move_study,
    study_may_move,
)


def test_every_status_has_a_row_and_finished_jobs_never_move() -> None:
    assert set(JOB_TRANSITIONS) == set(JobStatus) and set(STUDY_TRANSITIONS) == set(StudyStatus)
    for finished in (JobStatus.DONE, JobStatus.FAILED, JobStatus.SUPERSEDED):
        assert [s for s in JobStatus if s != finished and job_may_move(finished, s)] == []
    assert not job_may_move(JobStatus.QUEUED, JobStatus.DONE)  # only a running job completes
    assert not job_may_move(JobStatus.QUEUED, JobStatus.FAILED)
    assert job_states_leading_to(JobStatus.RUNNING) == [JobStatus.QUEUED]
    assert job_states_leading_to(JobStatus.DONE) == [JobStatus.RUNNING]


def test_a_new_instance_reopens_any_study_and_only_a_job_finishes_one() -> None:
    assert all(study_may_move(s, StudyStatus.RECEIVING) for s in StudyStatus)
    assert not study_may_move(StudyStatus.DONE, StudyStatus.PROCESSING)  # a new job needs a new completion first
    assert not study_may_move(StudyStatus.QUEUED, StudyStatus.DONE)  # nothing finishes without being processed
    assert not study_may_move(StudyStatus.FAILED, StudyStatus.DONE)


def test_the_queue_functions_make_only_allowed_transitions(database_url: str) -> None:
    db = Database(database_url)
    seen: list[tuple[str, str, str]] = []

    def record(kind: str):  # type: ignore[no-untyped-def]
        def listener(target, value, old, initiator):  # type: ignore[no-untyped-def]
            if isinstance(old, str):
                seen.append((kind, old, value))

        return listener

    on_job, on_study = record("job"), record("study")
    event.listen(Job.status, "set", on_job)
    event.listen(Study.status, "set", on_study)
    try:
        with db.session() as s:
            study = Study(study_instance_uid="9.1", patient_id="P", status=StudyStatus.QUEUED)
            s.add(study)
            s.flush()
            s.add(Job(study_id=study.id))
        for end in ("fail", "release", "defer", "requeue", "complete"):
            with db.session() as s:
                job = claim_next_job(s, "w1", 60)
                assert job is not None
            with db.session() as s:
                if end == "fail":
                    fail_job(s, job.id, "w1", "boom", max_attempts=3, backoff_seconds=0.0)
                elif end == "release":
                    release_job(s, job.id, "w1")
                elif end == "defer":
                    defer_job(s, job.id, "w1", "server down", delay_seconds=0.0)
                elif end == "requeue":
                    requeue_owned_by(s, {"w1"})
                else:
                    complete_job(s, job.id, "w1", score=0.1, uncertainty=0.0, model_id="m", timings={})
    finally:
        event.remove(Job.status, "set", on_job)
        event.remove(Study.status, "set", on_study)
    assert seen  # the listener saw the ORM changes
    for kind, old, new in seen:
        allowed = job_may_move(old, new) if kind == "job" else study_may_move(old, new)
        assert allowed, (kind, old, new)
    with db.session() as s:
        job_row = s.scalars(select(Job)).one()
        assert job_row.status == JobStatus.DONE and job_row.study.status == StudyStatus.DONE
        with pytest.raises(IllegalTransition, match="done -> running"):
            move_job(job_row, JobStatus.RUNNING)
        with pytest.raises(IllegalTransition, match="done -> processing"):
            move_study(job_row.study, StudyStatus.PROCESSING)
        assert job_row.status == JobStatus.DONE  # a refused move changes nothing
