"""The job queue: claiming with a lease, heartbeats, completion, retries and re-queueing dead workers' jobs.

Every state change is a conditional UPDATE (status and lease owner must still match), so several
worker processes can share one SQLite database without claiming the same job twice, and a worker
that lost its lease (it stalled, or the job was superseded) cannot overwrite the newer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Update, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.audit import job_fields, record_audit
from db.clock import db_utcnow
from db.models import (
    ACTIVE_JOB_SQL,
    AuditEventType,
    Instance,
    Job,
    JobDuration,
    JobStatus,
    Series,
    Study,
    StudyStatus,
    utcnow,
)
from db.states import job_states_leading_to, move_job, move_study

WAITING_STAGES = frozenset({"queue_wait", "send"})  # time a job waited or was delivered, not worked on


def _updated_rows(session: Session, statement: Update) -> int:
    """Rows an UPDATE matched: the guard of every state change here (0 means another process got there first)."""
    result = session.execute(statement)
    assert isinstance(result, CursorResult)  # DML through a Session always returns one; typed as a plain Result
    return result.rowcount


def inference_seconds(timings: dict[str, Any] | None) -> float | None:
    """Seconds a worker spent on a job: its `total`, else the sum of its top-level stages.

    The worker records `queue_wait`, `load`, `infer`, `infer.<stage>` (parts of `infer`, so not added again),
    `encode`, `enqueue` and `total` (the worker's whole time on the job); the sender adds `send`. Waiting in
    the queue and delivery are left out: a backlog or a slow PACS must not look like slow inference
    (queue_wait has its own histogram). None when nothing was recorded.
    """
    if not timings:
        return None
    if isinstance(timings.get("total"), int | float):
        return float(timings["total"])
    values = [
        float(v)
        for k, v in timings.items()
        if "." not in k and k not in WAITING_STAGES and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return sum(values) if values else None


def queue_wait_seconds(timings: dict[str, Any] | None) -> float | None:
    """How long a job waited between its creation and a worker taking it (its `queue_wait` stage)."""
    value = (timings or {}).get("queue_wait")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class LeaseLost(Exception):
    """The job is no longer the caller's: superseded, completed or re-queued by someone else."""


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job, detached from the session."""

    id: int
    study_id: int
    study_instance_uid: str
    attempts: int
    priority: int
    destination_ae: str
    created_at: datetime
    rule: str


@dataclass(frozen=True)
class SourceInstance:
    """One received image of a study, as a job analyses it (in series, then receipt, order)."""

    series_instance_uid: str
    modality: str
    path: str  # relative to the spool
    sop_instance_uid: str


def source_instances(session: Session, study_id: int, modalities: tuple[str, ...]) -> list[SourceInstance]:
    """The study's received source images of `modalities` (never the node's own output), series by series."""
    rows = session.execute(
        select(Series.series_instance_uid, Series.modality, Instance.path, Instance.sop_instance_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id, Series.is_own_output.is_(False), Series.modality.in_(modalities))
        .order_by(Series.id, Instance.id)
    ).all()
    return [SourceInstance(*row) for row in rows]


def claim_next_job(
    session: Session, owner: str, lease_seconds: float, now: datetime | None = None, spool_id: str | None = None
) -> ClaimedJob | None:
    """Claim the most urgent due job (STAT first, then oldest) for `owner`; None when the queue is empty.

    Times come from the database's clock (`now` overrides it, for tests), so the lease means the same to every
    node. PostgreSQL: the top queued row is locked with FOR UPDATE SKIP LOCKED, so concurrent claimers each take a
    different job instead of queueing behind one and giving up. SQLite (one writer at a time): the top five are
    tried in turn with a conditional UPDATE, and looked up again if others took them all.

    With `spool_id` (the claimer's spool), only jobs of studies whose files are in that spool (or of studies from
    before spool ids were recorded): where nodes do not share a spool, a study's jobs stay with the node that
    received it.
    """
    at = now if now is not None else db_utcnow()
    expires = now + timedelta(seconds=lease_seconds) if now is not None else db_utcnow(lease_seconds)
    query = (
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED, Job.next_attempt_at <= at)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
    )
    if spool_id is not None:
        query = query.join(Study, Study.id == Job.study_id).where(
            or_(Study.spool_id == spool_id, Study.spool_id.is_(None))
        )
    if session.get_bind().dialect.name == "postgresql":
        query = query.limit(1).with_for_update(skip_locked=True, of=Job)
    else:
        query = query.limit(5)
    while True:
        candidates = list(session.execute(query).scalars())
        if not candidates:
            return None
        for job_id in candidates:
            claimed = _take(session, job_id, owner, at, expires)
            if claimed is not None:
                return claimed
        # Other claimers took every candidate since the query; this UPDATE began our write transaction, so the
        # next query sees what they committed. "Empty" is only ever said of an empty queue.


def _take(session: Session, job_id: int, owner: str, at: Any, expires: Any) -> ClaimedJob | None:
    """Start `job_id` for `owner` if it is still queued; None when another claimer took it first."""
    claimed = _updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(job_states_leading_to(JobStatus.RUNNING)))
        .values(
            status=JobStatus.RUNNING,
            lease_owner=owner,
            lease_expires_at=expires,
            heartbeat_at=at,
            attempts=Job.attempts + 1,
            started_at=at,
        )
        .execution_options(synchronize_session=False),
    )
    if claimed != 1:
        return None
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    study = job.study
    move_study(study, StudyStatus.PROCESSING)
    record_audit(
        session,
        AuditEventType.JOB_STARTED,
        **job_fields(job),
        detail=f"attempt {job.attempts} by {owner}",
    )
    return ClaimedJob(
        job.id,
        study.id,
        study.study_instance_uid,
        job.attempts,
        job.priority,
        job.destination_ae,
        job.created_at,
        job.rule,
    )


def heartbeat(session: Session, job_id: int, owner: str, lease_seconds: float, now: datetime | None = None) -> bool:
    """Extend the lease (on the database's clock unless `now` is given); False means the worker no longer owns the
    job and must stop working on it."""
    at = now if now is not None else db_utcnow()
    expires = now + timedelta(seconds=lease_seconds) if now is not None else db_utcnow(lease_seconds)
    extended = _updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == owner)
        .values(heartbeat_at=at, lease_expires_at=expires)
        .execution_options(synchronize_session=False),
    )
    return extended == 1


def complete_job(
    session: Session,
    job_id: int,
    owner: str,
    *,
    score: float | None,
    uncertainty: float | None,
    model_id: str,
    timings: dict[str, float],
    now: datetime | None = None,
) -> bool:
    """Mark the job done (only if `owner` still holds it) and the study done."""
    now = now or utcnow()
    done = _updated_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(job_states_leading_to(JobStatus.DONE)), Job.lease_owner == owner)
        .values(
            status=JobStatus.DONE,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            score=score,
            uncertainty=uncertainty,
            model_id=model_id,
            timings=timings,
            error="",
        ),
    )
    if done != 1:
        return False
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    session.add(
        JobDuration(
            job_id=job_id,
            finished_at=now,
            worker_seconds=inference_seconds(timings),
            queue_wait_seconds=queue_wait_seconds(timings),
        )
    )
    study = job.study
    if _is_latest_job(session, job):
        move_study(study, StudyStatus.DONE)
    record_audit(
        session,
        AuditEventType.JOB_DONE,
        **job_fields(job),
        detail=f"score={score if score is None else round(score, 4)} model={model_id}",
    )
    return True


def update_timings(session: Session, job_id: int, timings: dict[str, float]) -> None:
    """Merge stage timings into a job (e.g. `send` once its results are delivered)."""
    job = session.get(Job, job_id)
    if job is not None:
        job.timings = {**(job.timings or {}), **timings}


def fail_job(
    session: Session,
    job_id: int,
    owner: str,
    error: str,
    *,
    max_attempts: int,
    backoff_seconds: float,
    now: datetime | None = None,
) -> JobStatus | None:
    """Record a failed attempt: re-queue with exponential backoff, or give up after `max_attempts`."""
    now = now or utcnow()
    job = _end_lease(session, job_id, owner)
    if job is None:
        return None
    return _retry_or_fail(session, job, error, max_attempts=max_attempts, backoff_seconds=backoff_seconds, now=now)


def release_job(session: Session, job_id: int, owner: str) -> bool:
    """Hand a job back to the queue unfinished (the worker is stopping); the attempt does not count."""
    job = _end_lease(session, job_id, owner)
    if job is None:
        return False
    move_job(job, JobStatus.QUEUED)
    job.attempts = max(job.attempts - 1, 0)
    move_study(job.study, StudyStatus.QUEUED)
    return True


def defer_job(
    session: Session, job_id: int, owner: str, reason: str, *, delay_seconds: float, now: datetime | None = None
) -> bool:
    """Put a job back to wait for something outside it (the inference server is down): the attempt does not
    count, so a long outage costs the job nothing; it becomes due again after `delay_seconds`."""
    now = now or utcnow()
    job = _end_lease(session, job_id, owner)
    if job is None:
        return False
    move_job(job, JobStatus.QUEUED)
    job.attempts = max(job.attempts - 1, 0)
    job.next_attempt_at = now + timedelta(seconds=delay_seconds)
    job.error = reason[:4000]
    move_study(job.study, StudyStatus.QUEUED)
    record_audit(
        session,
        AuditEventType.JOB_RETRY,
        outcome="warning",
        detail=f"deferred, retry in {delay_seconds:.0f} s (attempt not counted): {reason[:500]}",
        **job_fields(job),
    )
    return True


def requeue_expired(
    session: Session, *, max_attempts: int, backoff_seconds: float, now: datetime | None = None
) -> list[int]:
    """Jobs whose worker stopped heart-beating (it died) go back to the queue, or fail after max attempts.

    Expiry is judged on the database's clock (`now` overrides it, for tests), the clock the leases were set on.
    """
    cutoff = now if now is not None else db_utcnow()
    expired = session.execute(
        select(Job.id, Job.lease_owner).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < cutoff)
    ).all()
    requeued = []
    for job_id, owner in expired:
        job = _end_lease(session, job_id, owner, expired_before=cutoff)
        if job is None:  # it finished, failed or renewed its lease since the query
            continue
        _retry_or_fail(
            session,
            job,
            f"lease expired (worker {owner} stopped)",
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            now=now or utcnow(),
        )
        requeued.append(job_id)
    return requeued


def requeue_owned_by(session: Session, owners: set[str] | None = None, *, prefix: str | None = None) -> list[int]:
    """At start-up: running jobs of workers that no longer exist go straight back to the queue.

    A node passes `prefix`, its own identity (every owner id it hands out starts with it): only its own workers'
    jobs are touched, never those that live workers on other nodes sharing the database are running. `owners`
    names owners one by one; with neither, every running job (a lone node with a database of its own).
    Attempts are kept, so a job that kills its worker every time still ends up failed.
    """
    query = select(Job.id, Job.lease_owner).where(Job.status == JobStatus.RUNNING)
    if prefix is not None:
        query = query.where(Job.lease_owner.startswith(prefix, autoescape=True))
    running = session.execute(query).all()
    requeued = []
    for job_id, owner in running:
        if owners is not None and owner not in owners:
            continue
        job = _end_lease(session, job_id, owner)
        if job is None:
            continue
        move_job(job, JobStatus.QUEUED)
        move_study(job.study, StudyStatus.QUEUED)
        record_audit(
            session,
            AuditEventType.JOB_RETRY,
            **job_fields(job),
            outcome="warning",
            detail="re-queued at start-up: its worker was gone",
        )
        requeued.append(job_id)
    return requeued


def _end_lease(session: Session, job_id: int, owner: str | None, expired_before: Any = None) -> Job | None:
    """End the lease of a job that is still running under `owner` (with `expired_before`: whose lease ran out
    before then), as one conditional UPDATE; the fresh row to finish the transition on, or None when another
    process changed the job first (completed, superseded, failed, renewed). The UPDATE also takes the database's
    write lock, so nothing can interleave between it and the rest of the transition."""
    conditions = [Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == owner]
    if expired_before is not None:
        conditions.append(Job.lease_expires_at < expired_before)
    ended = _updated_rows(
        session,
        update(Job)
        .where(*conditions)
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False),
    )
    if ended != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def _retry_or_fail(
    session: Session, job: Job, error: str, *, max_attempts: int, backoff_seconds: float, now: datetime
) -> JobStatus:
    study = job.study
    job.lease_owner = None
    job.lease_expires_at = None
    job.error = error[:4000]
    audit = job_fields(job)
    if job.attempts >= max_attempts:
        move_job(job, JobStatus.FAILED)
        job.finished_at = now
        if _is_latest_job(session, job):
            move_study(study, StudyStatus.FAILED)
        record_audit(
            session,
            AuditEventType.JOB_FAILED,
            outcome="failure",
            detail=f"gave up after {job.attempts} attempt(s): {error[:500]}",
            **audit,
        )
        return JobStatus.FAILED
    delay = backoff_seconds * (2 ** max(job.attempts - 1, 0))
    move_job(job, JobStatus.QUEUED)
    job.next_attempt_at = now + timedelta(seconds=delay)
    move_study(study, StudyStatus.QUEUED)
    record_audit(
        session,
        AuditEventType.JOB_RETRY,
        outcome="warning",
        detail=f"attempt {job.attempts} failed, retry in {delay:.0f} s: {error[:500]}",
        **audit,
    )
    return JobStatus.QUEUED


def _is_latest_job(session: Session, job: Job) -> bool:
    latest = session.execute(
        select(Job.id).where(Job.study_id == job.study_id).order_by(Job.id.desc()).limit(1)
    ).scalar_one()
    return latest == job.id


def mark_study_completed(session: Session, study: Study, *, source_count: int, at: datetime) -> bool:
    """Record that `study` was judged complete with `source_count` source instances, only if no other scan did so
    since `study` was read (its completion mark is unchanged): a compare-and-set, so two scans racing on one study
    (two nodes, or two threads) judge it once. The loser's UPDATE waits for the winner's transaction and then
    matches no row; False tells it to leave the study alone."""
    unchanged = Study.completed_at.is_(None) if study.completed_at is None else Study.completed_at == study.completed_at
    marked = _updated_rows(
        session,
        update(Study)
        .where(Study.id == study.id, Study.completed_instance_count == study.completed_instance_count, unchanged)
        .values(completed_at=at, completed_instance_count=source_count)
        .execution_options(synchronize_session=False),
    )
    if marked != 1:
        return False
    session.refresh(study)
    return True


def supersede_active_jobs(session: Session, study_id: int, now: datetime) -> list[Job]:
    """Mark the study's queued or running jobs superseded (flushed: a new active job may then be inserted)."""
    old = list(
        session.scalars(
            select(Job).where(Job.study_id == study_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        ).all()
    )
    for job in old:
        move_job(job, JobStatus.SUPERSEDED)
        job.finished_at = now
    session.flush()
    return old


def insert_active_job(session: Session, **values: Any) -> Job | None:
    """Queue a new job for `values["study_id"]`; None when the study already has an active job.

    The schema allows one active job per study (a partial unique index); the INSERT ... ON CONFLICT DO NOTHING
    yields to an active job another transaction created instead of failing the whole scan.
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = (
        insert(Job)
        .values(status=JobStatus.QUEUED, **values)
        .on_conflict_do_nothing(index_elements=[Job.study_id], index_where=text(ACTIVE_JOB_SQL))
        .returning(Job.id)
    )
    job_id = session.execute(statement).scalar_one_or_none()
    return None if job_id is None else session.get(Job, job_id)
