"""Read-side queries shared by the CLI (`edgenode worklist|audit`) and the dashboard/REST API.

One implementation, so the terminal and the browser always show the same rows with the same field
names. Rows are plain dicts of JSON-ready values (ISO 8601 UTC strings for times); the field names
are part of the operator's contract: add fields, never rename them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from db.counts import state_counts
from db.models import (
    PRIORITY_STAT,
    AuditEvent,
    AuditEventType,
    Instance,
    Job,
    JobStatus,
    OutboundItem,
    OutboundStatus,
    Result,
    Series,
    Study,
)

WORKLIST_FIELDS: tuple[str, ...] = (
    "study_instance_uid",
    "patient_id",
    "accession_number",
    "study_date",
    "study_description",
    "modality",
    "calling_ae",
    "received_at",
    "last_received_at",
    "completed_at",
    "status",
    "priority",
    "score",
    "uncertainty",
    "instance_count",
    "job_id",
    "job_status",
    "model_id",
    "results_count",
    "results_destination",
    "delivery",
)

AUDIT_FIELDS: tuple[str, ...] = (
    "id",
    "at",
    "event_type",
    "outcome",
    "calling_ae",
    "called_ae",
    "peer_address",
    "patient_id",
    "accession_number",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "job_id",
    "dimse_status",
    "detail",
)


def iso(value: datetime | None) -> str | None:
    """UTC ISO 8601 with a trailing Z, or None: one spelling for CSV, JSON and HTML."""
    if value is None:
        return None
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class WorklistFilter:
    statuses: tuple[str, ...] = ()  # StudyStatus values; empty = all
    since: datetime | None = None  # first_received_at >= since
    until: datetime | None = None  # first_received_at < until
    modality: str = ""  # any source series of this modality
    min_score: float | None = None  # drops studies without a score
    limit: int | None = 500


@dataclass(frozen=True)
class AuditFilter:
    patient_id: str = ""
    accession: str = ""
    study_uid: str = ""
    ae: str = ""  # calling or called AE title
    event_type: str = ""  # exact, or a prefix ending in "." or "*" ("send." matches send.ok, send.retry, ...)
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = 1000  # the most recent N, returned in chronological order


@dataclass
class _Delivery:
    destinations: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def summary(self) -> str:
        """'none', 'sent', 'pending', 'dead' or a mix like 'sent 2, pending 1' (worst state first)."""
        if not self.counts:
            return "none"
        present = [s for s in (OutboundStatus.DEAD, OutboundStatus.PENDING, OutboundStatus.SENT) if self.counts[s]]
        if len(present) == 1:
            return str(present[0])
        return ", ".join(f"{s} {self.counts[s]}" for s in present)


def _current_job(jobs: list[Job]) -> Job | None:
    """The job that speaks for the study: the newest that is not superseded (else the newest)."""
    live = [j for j in jobs if j.status != JobStatus.SUPERSEDED]
    pool = live or jobs
    return max(pool, key=lambda j: j.id) if pool else None


def _study_rows(session: Session, studies: list[Study]) -> list[dict[str, Any]]:
    """Worklist rows for these studies, with their current job and delivery state (batched queries)."""
    if not studies:
        return []
    ids = [s.id for s in studies]
    modalities: dict[int, list[str]] = defaultdict(list)
    for study_id, modality in session.execute(
        select(Series.study_id, Series.modality)
        .where(Series.study_id.in_(ids), Series.is_own_output.is_(False))
        .order_by(Series.series_number, Series.id)
    ):
        if modality and modality not in modalities[study_id]:
            modalities[study_id].append(modality)
    jobs: dict[int, list[Job]] = defaultdict(list)
    for candidate in session.scalars(select(Job).where(Job.study_id.in_(ids))):
        jobs[candidate.study_id].append(candidate)
    current = {sid: _current_job(js) for sid, js in jobs.items()}
    job_ids = [j.id for j in current.values() if j is not None]
    result_counts: dict[int, int] = dict(
        session.execute(
            select(Result.job_id, func.count(Result.id)).where(Result.job_id.in_(job_ids)).group_by(Result.job_id)
        ).all()
    )
    delivery: dict[int, _Delivery] = defaultdict(_Delivery)
    for job_id, dest, status, count in session.execute(
        select(Result.job_id, OutboundItem.destination_ae, OutboundItem.status, func.count(OutboundItem.id))
        .join(Result, OutboundItem.result_id == Result.id)
        .where(Result.job_id.in_(job_ids))
        .group_by(Result.job_id, OutboundItem.destination_ae, OutboundItem.status)
    ):
        delivery[job_id].destinations.add(dest)
        delivery[job_id].counts[status] += count
    rows = []
    for study in studies:
        job = current.get(study.id)
        dlv = delivery.get(job.id, _Delivery()) if job else _Delivery()
        # STAT comes from the study (sender asked for it) or from the routing rule that made the job.
        priority = max(study.priority, job.priority if job else study.priority)
        rows.append(
            {
                "study_instance_uid": study.study_instance_uid,
                "patient_id": study.patient_id,
                "accession_number": study.accession_number,
                "study_date": study.study_date,
                "study_description": study.study_description,
                "modality": "/".join(modalities.get(study.id, [])),
                "calling_ae": study.calling_ae,
                "received_at": iso(study.first_received_at),
                "last_received_at": iso(study.last_received_at),
                "completed_at": iso(study.completed_at),
                "status": study.status,
                "priority": "stat" if priority >= PRIORITY_STAT else "routine",
                "score": job.score if job else None,
                "uncertainty": job.uncertainty if job else None,
                "instance_count": study.instance_count,
                "job_id": job.id if job else None,
                "job_status": job.status if job else None,
                "model_id": job.model_id if job else "",
                "results_count": result_counts.get(job.id, 0) if job else 0,
                "results_destination": ",".join(sorted(dlv.destinations)) or (job.destination_ae if job else ""),
                "delivery": dlv.summary(),
            }
        )
    return rows


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _current_job_ids() -> Any:
    """Per study, the id of the job that speaks for it (as _current_job): newest live, else newest."""
    live = (
        select(Job.study_id, func.max(Job.id).label("job_id"))
        .where(Job.status != JobStatus.SUPERSEDED)
        .group_by(Job.study_id)
        .subquery()
    )
    newest = select(Job.study_id, func.max(Job.id).label("job_id")).group_by(Job.study_id).subquery()
    return (
        select(newest.c.study_id, func.coalesce(live.c.job_id, newest.c.job_id).label("job_id"))
        .outerjoin(live, live.c.study_id == newest.c.study_id)
        .subquery()
    )


def worklist(session: Session, flt: WorklistFilter | None = None) -> list[dict[str, Any]]:
    """Studies ranked for triage, filtered; each row has exactly WORKLIST_FIELDS.

    Order: STAT first (study or job priority), then highest anomaly score (unscored last), then oldest
    received first. Ranking, filters and the limit run in SQL, so the cost follows the limit, not the
    size of the database.
    """
    flt = flt or WorklistFilter()
    current = _current_job_ids()
    job = aliased(Job)
    priority = case((job.priority > Study.priority, job.priority), else_=Study.priority)
    query = (
        select(Study)
        .outerjoin(current, current.c.study_id == Study.id)
        .outerjoin(job, job.id == current.c.job_id)
        .order_by(priority.desc(), job.score.is_(None), job.score.desc(), Study.first_received_at, Study.id)
    )
    if flt.statuses:
        query = query.where(Study.status.in_(flt.statuses))
    if flt.since is not None:
        query = query.where(Study.first_received_at >= flt.since)
    if flt.until is not None:
        query = query.where(Study.first_received_at < flt.until)
    if flt.min_score is not None:
        query = query.where(job.score >= flt.min_score)
    if flt.modality:
        query = query.where(
            select(Series.id)
            .where(
                Series.study_id == Study.id,
                Series.is_own_output.is_(False),
                func.upper(Series.modality) == flt.modality.upper(),
            )
            .exists()
        )
    if flt.limit is not None:
        query = query.limit(flt.limit)
    return [_public(r) for r in _study_rows(session, list(session.scalars(query)))]


def study_detail(session: Session, study_uid: str) -> dict[str, Any] | None:
    """Everything the study page shows: the worklist row plus series, jobs, results, delivery, audit and
    conflicting resends (`instance.conflict` events)."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    detail = _public(_study_rows(session, [study])[0])
    detail["series"] = [
        {
            "series_instance_uid": s.series_instance_uid,
            "series_number": s.series_number,
            "modality": s.modality,
            "body_part": s.body_part,
            "series_description": s.series_description,
            "is_own_output": s.is_own_output,
            "instance_count": s.instance_count,
        }
        for s in sorted(study.series, key=lambda s: (s.series_number is None, s.series_number or 0, s.id))
    ]
    detail["jobs"] = []
    for job in sorted(study.jobs, key=lambda j: j.id, reverse=True):
        results = []
        for res in sorted(job.results, key=lambda r: r.id):
            results.append(
                {
                    "result_id": res.id,
                    "kind": res.kind,
                    "sop_instance_uid": res.sop_instance_uid,
                    "sop_class_uid": res.sop_class_uid,
                    "series_instance_uid": res.series_instance_uid,
                    "source_series_instance_uid": res.source_series_instance_uid,
                    "model_id": res.model_id,
                    "size_bytes": res.size_bytes,
                    "created_at": iso(res.created_at),
                    "outbound": [
                        {
                            "destination_ae": o.destination_ae,
                            "host": o.host,
                            "port": o.port,
                            "status": o.status,
                            "attempts": o.attempts,
                            "last_status": o.last_status,
                            "last_error": o.last_error,
                            "next_attempt_at": iso(o.next_attempt_at),
                            "sent_at": iso(o.sent_at),
                        }
                        for o in sorted(res.outbound, key=lambda o: o.id)
                    ],
                }
            )
        detail["jobs"].append(
            {
                "job_id": job.id,
                "status": job.status,
                "priority": "stat" if job.priority >= PRIORITY_STAT else "routine",
                "rule": job.rule,
                "destination_ae": job.destination_ae,
                "attempts": job.attempts,
                "created_at": iso(job.created_at),
                "started_at": iso(job.started_at),
                "finished_at": iso(job.finished_at),
                "score": job.score,
                "uncertainty": job.uncertainty,
                "model_id": job.model_id,
                "timings": dict(job.timings or {}),
                "error": job.error,
                "results": results,
            }
        )
    _served_by(session, detail, _current_job(study.jobs))
    detail["audit"] = audit_events(session, AuditFilter(study_uid=study_uid, limit=200))
    # Resends whose content differed from the kept copy: shown apart, however old, so they are not missed.
    conflicts = AuditFilter(study_uid=study_uid, event_type=str(AuditEventType.INSTANCE_CONFLICT), limit=100)
    detail["conflicts"] = audit_events(session, conflicts)
    return detail


def _served_by(session: Session, detail: dict[str, Any], job: Job | None) -> None:
    """Per source series of the study page: the model(s) whose results the current job queued for it
    (`model_ids`), or why it was not analysed (`skipped`: the job's `series.skipped` details)."""
    models: dict[str, list[str]] = defaultdict(list)
    skipped: dict[str, list[str]] = defaultdict(list)
    if job is not None:
        for res in job.results:
            if res.source_series_instance_uid and res.model_id not in models[res.source_series_instance_uid]:
                models[res.source_series_instance_uid].append(res.model_id)
        for uid, why in session.execute(
            select(AuditEvent.series_instance_uid, AuditEvent.detail)
            .where(AuditEvent.job_id == job.id, AuditEvent.event_type == str(AuditEventType.SERIES_SKIPPED))
            .order_by(AuditEvent.id)
        ):
            skipped[uid].append(why)
    for series in detail["series"]:
        uid = series["series_instance_uid"]
        series["model_ids"] = models.get(uid, [])
        series["skipped"] = skipped.get(uid, [])


def result_path(session: Session, study_uid: str, result_id: int) -> tuple[str, str] | None:
    """(kind, spool-relative path) of a result that belongs to this study, or None."""
    row = session.execute(
        select(Result.kind, Result.path)
        .join(Job, Result.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Result.id == result_id, Study.study_instance_uid == study_uid)
    ).first()
    return (row[0], row[1]) if row else None


def _audit_query(flt: AuditFilter) -> Select[AuditEvent]:
    query = select(AuditEvent)
    if flt.study_uid:
        query = query.where(AuditEvent.study_instance_uid == flt.study_uid)
    # Patient and accession match the event's own fields, and also any event of the studies that
    # carry them (send and job events name the study, not necessarily the patient).
    for value, event_col, study_col in (
        (flt.patient_id, AuditEvent.patient_id, Study.patient_id),
        (flt.accession, AuditEvent.accession_number, Study.accession_number),
    ):
        if value:
            study_uids = select(Study.study_instance_uid).where(study_col == value)
            query = query.where(or_(event_col == value, AuditEvent.study_instance_uid.in_(study_uids)))
    if flt.ae:
        query = query.where(or_(AuditEvent.calling_ae == flt.ae, AuditEvent.called_ae == flt.ae))
    if flt.event_type:
        if flt.event_type.endswith(("*", ".")):
            prefix = flt.event_type.rstrip("*")
            query = query.where(AuditEvent.event_type.startswith(prefix, autoescape=True))
        else:
            query = query.where(AuditEvent.event_type == flt.event_type)
    if flt.since is not None:
        query = query.where(AuditEvent.at >= flt.since)
    if flt.until is not None:
        query = query.where(AuditEvent.at < flt.until)
    return query


def audit_events(session: Session, flt: AuditFilter | None = None) -> list[dict[str, Any]]:
    """Audit events matching the filter, oldest first; each row has exactly AUDIT_FIELDS."""
    flt = flt or AuditFilter()
    query = _audit_query(flt).order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
    if flt.limit is not None:
        query = query.limit(flt.limit)
    events = list(session.scalars(query))
    events.reverse()
    return [
        {
            "id": e.id,
            "at": iso(e.at),
            "event_type": e.event_type,
            "outcome": e.outcome,
            "calling_ae": e.calling_ae,
            "called_ae": e.called_ae,
            "peer_address": e.peer_address,
            "patient_id": e.patient_id,
            "accession_number": e.accession_number,
            "study_instance_uid": e.study_instance_uid,
            "series_instance_uid": e.series_instance_uid,
            "sop_instance_uid": e.sop_instance_uid,
            "job_id": e.job_id,
            "dimse_status": e.dimse_status,
            "detail": e.detail,
        }
        for e in events
    ]


def queue_summary(session: Session) -> dict[str, Any]:
    """Queue and delivery state for the queue page: counts by state, waiting and stuck items."""
    states = state_counts(session)
    active = session.execute(
        select(Job, Study.study_instance_uid, Study.accession_number)
        .join(Study, Job.study_id == Study.id)
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .order_by(Job.priority.desc(), Job.next_attempt_at, Job.id)
        .limit(100)
    ).all()
    failed = session.execute(
        select(Job, Study.study_instance_uid, Study.accession_number)
        .join(Study, Job.study_id == Study.id)
        .where(Job.status == JobStatus.FAILED)
        .order_by(Job.id.desc())
        .limit(50)
    ).all()
    undelivered = session.execute(
        select(OutboundItem, Result.kind, Study.study_instance_uid)
        .join(Result, OutboundItem.result_id == Result.id)
        .join(Job, Result.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(OutboundItem.status != OutboundStatus.SENT)
        .order_by(OutboundItem.status, OutboundItem.next_attempt_at)
        .limit(100)
    ).all()

    def job_row(job: Job, uid: str, accession: str) -> dict[str, Any]:
        return {
            "job_id": job.id,
            "study_instance_uid": uid,
            "accession_number": accession,
            "status": job.status,
            "priority": "stat" if job.priority >= PRIORITY_STAT else "routine",
            "attempts": job.attempts,
            "lease_owner": job.lease_owner,
            "lease_expires_at": iso(job.lease_expires_at),
            "next_attempt_at": iso(job.next_attempt_at),
            "created_at": iso(job.created_at),
            "error": job.error,
        }

    return {
        "studies_by_state": states.studies,
        "jobs_by_state": states.jobs,
        "outbound_by_state": states.outbound,
        "instances_stored": session.scalar(select(func.count(Instance.id))) or 0,
        "active_jobs": [job_row(*row) for row in active],
        "failed_jobs": [job_row(*row) for row in failed],
        "undelivered": [
            {
                "study_instance_uid": uid,
                "kind": kind,
                "destination_ae": o.destination_ae,
                "status": o.status,
                "attempts": o.attempts,
                "last_status": o.last_status,
                "last_error": o.last_error,
                "next_attempt_at": iso(o.next_attempt_at),
            }
            for o, kind, uid in undelivered
        ],
    }


def latest_job_of_study(session: Session, study_uid: str) -> Job | None:
    """The study's most recent job (a study that grew after its job ran has several), or None."""
    return session.scalars(
        select(Job).join(Study).where(Study.study_instance_uid == study_uid).order_by(Job.id.desc()).limit(1)
    ).first()


def job_deliveries(session: Session, job_id: int) -> list[tuple[str, str, str]]:
    """(delivery status, result kind, SOP Instance UID) of every outbound item of the job's results."""
    rows = session.execute(
        select(OutboundItem.status, Result.kind, Result.sop_instance_uid).join(Result).where(Result.job_id == job_id)
    ).all()
    return [(status, kind, uid) for status, kind, uid in rows]


_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """Parse a filter time: ISO 8601 date or datetime (naive = UTC), or an age like 30m, 24h, 7d, 2w.

    Raises ValueError with a message that says which spellings are accepted.
    """
    value = text.strip()
    if len(value) > 1 and value[-1].lower() in _UNITS and value[:-1].replace(".", "", 1).isdigit():
        now = now or datetime.now(UTC)
        try:
            return now - timedelta(seconds=float(value[:-1]) * _UNITS[value[-1].lower()])
        except OverflowError:  # further back than any datetime
            raise ValueError(f"{text!r} reaches back further than any date; give a smaller age or a date") from None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use an ISO date or datetime (2026-11-01, 2026-11-01T09:30Z) "
            "or an age (30m, 24h, 7d, 2w)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
