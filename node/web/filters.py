"""Query parameters of the worklist and audit (API and pages alike) turned into db.queries filters; a bad value is
a 400 that names the parameter."""

from __future__ import annotations

from datetime import datetime

from fastapi import HTTPException

from db.models import StudyStatus
from db.queries import AuditFilter, WorklistFilter, parse_time

MAX_ROWS = 1_000_000  # bounds for numeric query parameters: beyond them SQLite's integers overflow (a 500)
MAX_ID = 2**63 - 1


def time_param(name: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"{name}: {exc}") from None


def worklist_filter(
    status: list[str], since: str | None, until: str | None, modality: str, min_score: float | None, limit: int
) -> WorklistFilter:
    known = {str(s) for s in StudyStatus}
    statuses = tuple(s for s in status if s)
    for value in statuses:
        if value not in known:
            raise HTTPException(status_code=400, detail=f"status: {value!r} is not one of {', '.join(sorted(known))}")
    return WorklistFilter(
        statuses=statuses,
        since=time_param("since", since),
        until=time_param("until", until),
        modality=modality.strip(),
        min_score=min_score,
        limit=limit or None,
    )


def audit_filter(
    patient_id: str,
    accession: str,
    study_uid: str,
    ae: str,
    event_type: str,
    since: str | None,
    until: str | None,
    limit: int,
) -> AuditFilter:
    return AuditFilter(
        patient_id=patient_id.strip(),
        accession=accession.strip(),
        study_uid=study_uid.strip(),
        ae=ae.strip(),
        event_type=event_type.strip(),
        since=time_param("since", since),
        until=time_param("until", until),
        limit=limit or None,
    )
