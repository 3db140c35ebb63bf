"""The database side of retention (node/retention.py): which studies are old, whether one may go, its files, removal.

A study may go only when nothing is in flight for it and every result it produced was acknowledged by every
destination; audit rows are never touched (they are not linked to the study rows).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Instance, Job, JobStatus, OutboundStatus, Result, Series, Study, StudyStatus

BUSY_STUDY = (StudyStatus.RECEIVING, StudyStatus.QUEUED, StudyStatus.PROCESSING)
BUSY_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)


def studies_received_before(session: Session, cutoff: datetime) -> list[str]:
    """Study Instance UIDs whose last instance arrived before `cutoff`, oldest row first."""
    return list(
        session.scalars(select(Study.study_instance_uid).where(Study.last_received_at < cutoff).order_by(Study.id))
    )


def lock_study(session: Session, study_uid: str) -> Study | None:
    """The study, after taking the database write lock (a no-op UPDATE) so that no instance can join it
    between the caller's checks and its removal; the listener waits on its busy timeout meanwhile."""
    session.execute(
        update(Study).where(Study.study_instance_uid == study_uid).values(status=Study.status),
        execution_options={"synchronize_session": False},
    )
    return session.scalar(select(Study).where(Study.study_instance_uid == study_uid))


def is_busy(study: Study) -> bool:
    """Still receiving, queued or processing, or a job of it queued or running."""
    return study.status in BUSY_STUDY or any(j.status in BUSY_JOB for j in study.jobs)


def has_undelivered_results(study: Study) -> bool:
    """A result not yet acknowledged by every destination (one never queued for delivery counts too)."""
    for job in study.jobs:
        for result in job.results:
            if not result.outbound or any(o.status != OutboundStatus.SENT for o in result.outbound):
                return True
    return False


def files_elsewhere(study: Study, spool_id: str) -> bool:
    """Whether some of the study's files are in another spool than `spool_id` (another node's, not shared with
    this one): this node can neither delete them nor tell whether they are gone, so it must keep the rows. Rows
    from before spool ids were recorded (None) were written by a lone node."""
    spools = {study.spool_id} | {r.spool_id for job in study.jobs for r in job.results}
    return bool(spools - {None, spool_id})


def study_file_paths(session: Session, study_id: int) -> list[str]:
    """Spool-relative paths of the study's received instances and of the result files it produced."""
    instances = session.scalars(select(Instance.path).join(Series).where(Series.study_id == study_id))
    results = session.scalars(select(Result.path).join(Job).where(Job.study_id == study_id))
    return [*instances, *results]


def delete_study(session: Session, study: Study) -> None:
    """The study's rows (series, instances, jobs, results, outbound items go with it by cascade)."""
    session.delete(study)
