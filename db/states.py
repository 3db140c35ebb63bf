"""Job and study status transitions: the one table of which changes are allowed, and the functions that make them.

Every status change of a job or a study goes through `move_job` / `move_study` (or, for a conditional UPDATE,
names its from-states with `job_states_leading_to`), so a change the table does not allow is a bug that fails
loudly instead of a row in a state nothing expects. Staying in the same state is always allowed.
"""

from __future__ import annotations

from db.models import Job, JobStatus, Study, StudyStatus

J, S = JobStatus, StudyStatus

JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    J.QUEUED: frozenset({J.RUNNING, J.SUPERSEDED}),  # claimed; or the study grew before a worker took it
    # done; given up; back to the queue (retry, release, deferral, expired lease); the study grew meanwhile
    J.RUNNING: frozenset({J.DONE, J.FAILED, J.QUEUED, J.SUPERSEDED}),
    J.DONE: frozenset(),
    J.FAILED: frozenset(),
    J.SUPERSEDED: frozenset(),
}

# A study's status follows its latest event: an arriving source instance makes any study RECEIVING again, and its
# jobs move it through QUEUED/PROCESSING to DONE or FAILED. A job of an earlier completion may still be running
# while the study receives more (or was completed again without a matching rule), so the job's outcome is
# recorded from RECEIVING and COMPLETE too.
_JOB_DRIVEN = frozenset({S.QUEUED, S.PROCESSING, S.DONE, S.FAILED})
STUDY_TRANSITIONS: dict[StudyStatus, frozenset[StudyStatus]] = {
    S.RECEIVING: frozenset({S.COMPLETE}) | _JOB_DRIVEN,
    S.COMPLETE: frozenset({S.RECEIVING}) | _JOB_DRIVEN,
    S.QUEUED: frozenset({S.RECEIVING, S.PROCESSING}),
    S.PROCESSING: frozenset({S.RECEIVING, S.QUEUED, S.DONE, S.FAILED}),
    S.DONE: frozenset({S.RECEIVING}),
    S.FAILED: frozenset({S.RECEIVING}),
}


class IllegalTransition(RuntimeError):
    """A status change the transition table does not allow."""


def job_may_move(old: JobStatus | str, new: JobStatus | str) -> bool:
    return old == new or JobStatus(new) in JOB_TRANSITIONS[JobStatus(old)]


def study_may_move(old: StudyStatus | str, new: StudyStatus | str) -> bool:
    return old == new or StudyStatus(new) in STUDY_TRANSITIONS[StudyStatus(old)]


def job_states_leading_to(new: JobStatus) -> list[JobStatus]:
    """The statuses a job may be in for a change to `new` (the WHERE of a conditional UPDATE)."""
    return [old for old, allowed in JOB_TRANSITIONS.items() if new in allowed]


def move_job(job: Job, new: JobStatus) -> None:
    if not job_may_move(job.status, new):
        raise IllegalTransition(f"job {job.id}: {job.status} -> {new} is not an allowed transition")
    job.status = new


def move_study(study: Study, new: StudyStatus) -> None:
    if not study_may_move(study.status, new):
        raise IllegalTransition(f"study {study.id}: {study.status} -> {new} is not an allowed transition")
    study.status = new
