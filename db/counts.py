"""Counts the queue page and /metrics both show: rows by state, audit events by type, duration histograms.

One implementation, so the dashboard and Prometheus never disagree about how many jobs are queued.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import case, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.models import AuditEvent, Job, JobStatus, OutboundItem, OutboundStatus, Study, StudyStatus


@dataclass(frozen=True)
class StateCounts:
    """Rows per state; every state of the enum is present (0 when none), plus any other value found."""

    studies: dict[str, int]
    jobs: dict[str, int]
    outbound: dict[str, int]


def _by_state(session: Session, status: InstrumentedAttribute[str], states: type[StrEnum]) -> dict[str, int]:
    counts = {str(s): 0 for s in states}
    counts.update({str(k): int(n) for k, n in session.execute(select(status, func.count()).group_by(status)).all()})
    return counts


def state_counts(session: Session) -> StateCounts:
    return StateCounts(
        studies=_by_state(session, Study.status, StudyStatus),
        jobs=_by_state(session, Job.status, JobStatus),
        outbound=_by_state(session, OutboundItem.status, OutboundStatus),
    )


def audit_event_count(session: Session, event_types: Iterable[str]) -> int:
    """Audit events of these types ever recorded (the trail is append-only, so this only grows)."""
    wanted = [str(t) for t in event_types]
    return int(session.scalar(select(func.count(AuditEvent.id)).where(AuditEvent.event_type.in_(wanted))) or 0)


def duration_histogram(
    session: Session, column: InstrumentedAttribute[float | None], bounds: Sequence[float]
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets (Prometheus `le` labels, "+Inf" last) and the sum of one job_durations column, counted
    in SQL: one row whatever the history's length. The table is append-only, so every count only grows."""
    counts = [func.sum(case((column <= bound, 1), else_=0)) for bound in bounds]
    row = session.execute(select(func.count(column), func.coalesce(func.sum(column), 0.0), *counts)).one()
    total_count, total, *cumulative = row
    buckets = [(str(float(bound)), float(n or 0)) for bound, n in zip(bounds, cumulative, strict=True)]
    return [*buckets, ("+Inf", float(total_count))], float(total)
