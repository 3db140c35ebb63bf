"""Worklist ranking edge cases and filters (db/queries.py) on HAND-MADE rows (tests/opsdata.record_*).

Hand-made on purpose: these tests choose the scores, ages and priorities (a STAT study with the lowest score,
unscored studies of different ages, a superseded job beside a newer one) that a real run cannot stage on
demand, since real scores come from the model. The CLI and the browser read a database filled by a real
`edgenode serve` that infers and sends (tests/test_worklist_cli.py, tests/test_browser.py).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from db.models import OutboundStatus, StudyStatus, utcnow
from db.queries import WORKLIST_FIELDS, WorklistFilter, parse_time, worklist
from db.session import Database
from tests.opsdata import record_inference_outcome, record_received_study


@pytest.fixture
def db(database_url: str) -> Database:
    database = Database(database_url)
    yield database
    database.dispose()


def test_triage_order_stat_then_score_then_age(db: Database, tmp_path: Path) -> None:
    now = utcnow()
    spool = tmp_path / "spool"
    low = record_received_study(db, spool, patient_id="P1", accession="A1", received_at=now - timedelta(hours=5))
    high = record_received_study(db, spool, patient_id="P2", accession="A2", received_at=now - timedelta(hours=1))
    stat = record_received_study(db, spool, patient_id="P3", accession="A3", received_at=now)
    old_unscored = record_received_study(
        db, spool, patient_id="P4", accession="A4", received_at=now - timedelta(days=1)
    )
    new_unscored = record_received_study(db, spool, patient_id="P5", accession="A5", received_at=now)
    record_inference_outcome(db, spool, low, score=0.2, uncertainty=0.01)
    record_inference_outcome(db, spool, high, score=0.9, uncertainty=0.05)
    record_inference_outcome(db, spool, stat, score=0.1, uncertainty=0.02, stat=True)
    with db.session() as session:
        rows = worklist(session)
    assert [r["study_instance_uid"] for r in rows] == [stat, high, low, old_unscored, new_unscored]
    assert rows[0]["priority"] == "stat" and rows[1]["priority"] == "routine"
    assert all(tuple(r) == WORKLIST_FIELDS for r in rows)
    assert rows[1]["score"] == pytest.approx(0.9) and rows[1]["uncertainty"] == pytest.approx(0.05)
    assert rows[1]["delivery"] == "sent" and rows[1]["results_destination"] == "PACS"
    assert rows[3]["score"] is None and rows[3]["delivery"] == "none" and rows[3]["status"] == "queued"


def test_filters(db: Database, tmp_path: Path) -> None:
    now = utcnow()
    spool = tmp_path / "spool"
    ct = record_received_study(db, spool, patient_id="P1", accession="A1", received_at=now - timedelta(days=3))
    dx = record_received_study(db, spool, patient_id="P2", accession="A2", modality="DX", received_at=now)
    record_inference_outcome(db, spool, ct, score=0.7, uncertainty=0.1, delivery=OutboundStatus.DEAD, heatmaps=2)
    with db.session() as session:
        assert [r["study_instance_uid"] for r in worklist(session, WorklistFilter(modality="dx"))] == [dx]
        assert [r["study_instance_uid"] for r in worklist(session, WorklistFilter(statuses=("done",)))] == [ct]
        assert [r["study_instance_uid"] for r in worklist(session, WorklistFilter(min_score=0.5))] == [ct]
        assert worklist(session, WorklistFilter(min_score=0.8)) == []
        since = parse_time("1d", now=now)
        assert [r["study_instance_uid"] for r in worklist(session, WorklistFilter(since=since))] == [dx]
        assert [r["study_instance_uid"] for r in worklist(session, WorklistFilter(until=since))] == [ct]
        row = worklist(session, WorklistFilter(statuses=(StudyStatus.DONE,)))[0]
    assert row["delivery"] == "dead" and row["results_count"] == 2 and row["modality"] == "CT"


def test_parse_time_spellings() -> None:
    now = utcnow()
    assert parse_time("24h", now=now) == now - timedelta(hours=24)
    assert parse_time("2w", now=now) == now - timedelta(days=14)
    assert parse_time("2026-11-01").isoformat() == "2026-11-01T00:00:00+00:00"
    assert parse_time("2026-11-01T09:30Z").isoformat() == "2026-11-01T09:30:00+00:00"
    with pytest.raises(ValueError, match="ISO date"):
        parse_time("yesterday")


def test_superseded_job_does_not_rank_the_study(db: Database, tmp_path: Path) -> None:
    """A study that grew after its job ran is ranked by its new (unscored) job, not the old score."""
    from sqlalchemy import select

    from db.models import Job, JobStatus, Study

    spool = tmp_path / "spool"
    grown = record_received_study(db, spool, patient_id="P1", accession="GROWN")
    other = record_received_study(db, spool, patient_id="P2", accession="OTHER")
    record_inference_outcome(db, spool, grown, score=0.99, uncertainty=0.1)
    record_inference_outcome(db, spool, other, score=0.30, uncertainty=0.1)
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == grown))
        old = study.jobs[0]
        old.status = JobStatus.SUPERSEDED
        session.add(Job(study=study, rule="chest", destination_ae="PACS"))
    with db.session() as session:
        rows = worklist(session)
        assert [r["accession_number"] for r in rows] == ["OTHER", "GROWN"]
        assert rows[1]["score"] is None and rows[1]["job_status"] == "queued"
        assert [r["accession_number"] for r in worklist(session, WorklistFilter(min_score=0.5))] == []
        assert len(worklist(session, WorklistFilter(limit=1))) == 1
