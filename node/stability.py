"""Study completion: a study is complete after `stable_seconds` without a new source instance,
or forced `max_wait_seconds` after the first instance of the current receiving episode.

On completion the first matching routing rule creates a queued inference job (STAT when the rule
or the study says so); a study that grew after an earlier completion gets a new job, and its
queued/running job is superseded. The node's own results (SEG/SC/SR sent back) never count.
The scan holds the ingest write lock, so no instance commit interleaves with a decision. Scans on several
nodes (or threads) are safe too: the completion mark is a compare-and-set, and the schema allows one active job
per study.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from db.audit import record_audit
from db.ingest import IngestIndex, PendingStudy, pending_studies
from db.jobs import insert_active_job, mark_study_completed, supersede_active_jobs
from db.models import PRIORITY_ROUTINE, PRIORITY_STAT, AuditEventType, Job, StudyStatus, utcnow
from db.session import Database
from db.states import move_study
from node.config import Priority, Settings
from node.routing import select_rule

log = logging.getLogger(__name__)


class StabilityScanner:
    def __init__(self, settings: Settings, db: Database, index: IngestIndex) -> None:
        self.settings = settings
        self.db = db
        self.index = index

    def scan(self, now: datetime | None = None) -> list[int]:
        """Complete every study that is due; return the ids of the jobs created."""
        created: list[int] = []
        with self.index.write_lock, self.db.session() as session:
            now = now or utcnow()
            for pending in pending_studies(session):
                why = self._due(pending, now)
                if why:
                    job = self._complete(session, pending, now, why)
                    if job is not None:
                        created.append(job.id)
        return created

    def _due(self, pending: PendingStudy, now: datetime) -> str:
        stability = self.settings.stability
        if now - pending.study.last_received_at >= timedelta(seconds=stability.stable_seconds):
            return "quiet"
        if now - pending.episode_start >= timedelta(seconds=stability.max_wait_seconds):
            return "forced"
        return ""

    def _complete(self, session: Session, pending: PendingStudy, now: datetime, why: str) -> Job | None:
        study = pending.study
        ids = {
            "patient_id": study.patient_id,
            "accession_number": study.accession_number,
            "study_instance_uid": study.study_instance_uid,
            "calling_ae": study.calling_ae,
        }
        rule = select_rule(self.settings.routing, study.calling_ae, pending.series)
        # A study first known through our own results alone was "complete" with no source instance: not growth.
        grew = study.completed_at is not None and study.completed_instance_count > 0
        # The completion mark is real time taken under the ingest lock, so every instance committed
        # after this scan is later than it ("grew"), even when `now` is a simulated future time.
        # Another scan (another node) may have judged the study since we read it: then it is that scan's.
        if not mark_study_completed(session, study, source_count=pending.source_count, at=min(now, utcnow())):
            log.info("study %s was completed by a concurrent scan", study.study_instance_uid)
            return None
        record_audit(
            session,
            AuditEventType.STUDY_COMPLETE,
            **ids,
            detail=(
                f"{why}: {pending.source_count} source instance(s) in {len(pending.series)} series"
                f"{' (grew after an earlier completion)' if grew else ''}; "
                f"rule {rule.name if rule else 'none matched: no job'}"
            ),
        )
        if rule is None:
            move_study(study, StudyStatus.COMPLETE)
            log.info("study %s complete (%s), no routing rule matched", study.study_instance_uid, why)
            return None
        stat = rule.priority == Priority.STAT or study.priority >= PRIORITY_STAT
        superseded = supersede_active_jobs(session, study.id, now)  # first: one active job per study
        job = insert_active_job(
            session,
            study_id=study.id,
            priority=PRIORITY_STAT if stat else PRIORITY_ROUTINE,
            rule=rule.name,
            destination_ae=rule.destination or study.calling_ae,
            instance_count=pending.source_count,
            next_attempt_at=now,
            created_at=now,
        )
        if job is None:
            log.warning("study %s already has an active job: none created", study.study_instance_uid)
            return None
        for old in superseded:
            old.superseded_by = job.id
            record_audit(
                session,
                AuditEventType.JOB_SUPERSEDED,
                **ids,
                job_id=old.id,
                detail=f"study grew to {pending.source_count} source instance(s); superseded by job {job.id}",
            )
        move_study(study, StudyStatus.QUEUED)
        record_audit(
            session,
            AuditEventType.JOB_CREATED,
            **ids,
            job_id=job.id,
            detail=f"rule {rule.name}, priority {'stat' if stat else 'routine'}, {pending.source_count} instance(s), "
            f"results to {job.destination_ae}",
        )
        log.info(
            "study %s complete (%s): job %d (%s)", study.study_instance_uid, why, job.id, "STAT" if stat else "routine"
        )
        return job
