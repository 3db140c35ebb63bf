"""Database side of ingest and study completion: one short transaction per received instance.

The listener calls `IngestIndex.add_instance` after the file is durably in the spool and before it
answers Success. Writers in this process take `write_lock` so that SQLite never makes threads poll
for its lock and so the stability scan sees a consistent picture (no commit lands mid-scan).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.audit import record_audit
from db.models import (
    PRIORITY_STAT,
    AuditEventType,
    Instance,
    Job,
    JobStatus,
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


class IngestIndex:
    """Instance indexing, duplicate and own-output checks, and audit events for the listener."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.write_lock = threading.Lock()

    def lookup(self, sop_instance_uid: str) -> tuple[bool, bool]:
        """(already stored, is one of our own results) for a SOP Instance UID, in one round trip."""
        with self.db.session() as session:
            stored, own = session.execute(
                select(
                    exists().where(Instance.sop_instance_uid == sop_instance_uid),
                    exists().where(Result.sop_instance_uid == sop_instance_uid),
                )
            ).one()
        return bool(stored), bool(own)

    def add_instance(self, rec: InstanceRecord) -> bool:
        """Index a stored instance with its audit event; False if the SOP Instance UID was already there."""
        with self.write_lock:
            try:
                with self.db.session() as session:
                    _add_instance(session, rec)
            except IntegrityError:
                # Only reachable if another process stored the same SOP Instance UID in between.
                return False
        return True

    def record_event(self, event_type: AuditEventType | str, **fields: object) -> None:
        """Append one audit event in its own short transaction."""
        with self.write_lock, self.db.session() as session:
            record_audit(session, event_type, **fields)

    def iter_instance_paths(self) -> Iterator[str]:
        with self.db.session() as session:
            yield from session.scalars(select(Instance.path).execution_options(yield_per=5000))

    def instance_by_sop(self, sop_instance_uid: str) -> Instance | None:
        with self.db.session() as session:
            return session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).one_or_none()


def _add_instance(session: Session, rec: InstanceRecord) -> None:
    now = utcnow()
    study = session.scalars(select(Study).where(Study.study_instance_uid == rec.study_instance_uid)).one_or_none()
    if study is None:
        study = Study(
            study_instance_uid=rec.study_instance_uid,
            patient_id=rec.patient_id,
            accession_number=rec.accession_number,
            study_date=rec.study_date,
            study_description=rec.study_description,
            calling_ae=rec.calling_ae,
            first_received_at=now,
            last_received_at=now,
            instance_count=0,
            completed_instance_count=0,
        )
        if rec.own_output:  # a study known only through our own results: nothing to wait for
            study.status = StudyStatus.COMPLETE
            study.completed_at = now
        session.add(study)
        session.flush()
    series = session.scalars(select(Series).where(Series.series_instance_uid == rec.series_instance_uid)).one_or_none()
    if series is None:
        series = Series(
            study_id=study.id,
            series_instance_uid=rec.series_instance_uid,
            modality=rec.modality,
            body_part=rec.body_part,
            series_description=rec.series_description,
            series_number=rec.series_number,
            is_own_output=rec.own_output,
            instance_count=0,
        )
        session.add(series)
        session.flush()
    elif rec.own_output and not series.is_own_output:
        series.is_own_output = True
    session.add(
        Instance(
            series_id=series.id,
            sop_instance_uid=rec.sop_instance_uid,
            sop_class_uid=rec.sop_class_uid,
            instance_number=rec.instance_number,
            transfer_syntax_uid=rec.transfer_syntax_uid,
            path=rec.path,
            size_bytes=rec.size_bytes,
            sha256=rec.sha256,
            calling_ae=rec.calling_ae,
            received_at=now,
        )
    )
    series.instance_count += 1
    study.instance_count += 1
    if not rec.own_output:
        # Only source images restart the quiet period; our own results never make a study "grow".
        study.last_received_at = now
        study.status = StudyStatus.RECEIVING
        if rec.stat:
            study.priority = max(study.priority, PRIORITY_STAT)
    record_audit(
        session,
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


def active_jobs(session: Session, study_id: int) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.study_id == study_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        ).all()
    )
