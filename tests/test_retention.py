"""Retention removes old, fully delivered studies (files and rows) and nothing else; audit stays.

HAND-MADE rows (tests/opsdata.record_*): each case needs a study of a chosen age in a chosen delivery state
(40 days old and sent, pending, dead, never queued), which a real run cannot produce without waiting.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import AuditEvent, Instance, OutboundStatus, Result, Study, StudyStatus, utcnow
from db.session import Database
from node.config import load_settings
from node.retention import run_retention
from tests.opsdata import record_inference_outcome, record_received_study


@pytest.fixture
def env(tmp_path: Path, database_url: str):
    settings = load_settings(
        None, node={"data_dir": str(tmp_path)}, retention={"days": 30}, database={"url": database_url}
    )
    db = Database(settings.database_url)
    yield settings, db
    db.dispose()


def _files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*") if p.is_file())


def test_deletes_only_old_fully_delivered_studies(env) -> None:
    settings, db = env
    spool = settings.spool_dir
    old = utcnow() - timedelta(days=45)
    delivered = record_received_study(db, spool, patient_id="P1", accession="A1", received_at=old)
    record_inference_outcome(db, spool, delivered, score=0.3, uncertainty=0.1, heatmaps=2)
    pending = record_received_study(db, spool, patient_id="P2", accession="A2", received_at=old)
    record_inference_outcome(db, spool, pending, score=0.3, uncertainty=0.1, delivery=OutboundStatus.PENDING)
    dead = record_received_study(db, spool, patient_id="P3", accession="A3", received_at=old)
    record_inference_outcome(db, spool, dead, score=0.3, uncertainty=0.1, delivery=OutboundStatus.DEAD)
    never_queued = record_received_study(db, spool, patient_id="P4", accession="A4", received_at=old)
    record_inference_outcome(db, spool, never_queued, score=0.3, uncertainty=0.1, delivery=None)
    busy = record_received_study(db, spool, patient_id="P5", accession="A5", received_at=old)  # job still queued
    declined = record_received_study(
        db, spool, patient_id="P6", accession="A6", received_at=old, status=StudyStatus.COMPLETE
    )
    recent = record_received_study(db, spool, patient_id="P7", accession="A7")
    record_inference_outcome(db, spool, recent, score=0.3, uncertainty=0.1)
    with db.session() as session:
        audit_before = session.scalar(select(func.count(AuditEvent.id)))
    delivered_files = [p for p in _files(spool) if delivered in str(p)]
    assert len(delivered_files) == 4  # 2 instances + 2 heatmaps
    doomed = delivered_files + [p for p in _files(spool) if declined in str(p)]
    doomed_bytes = sum(p.stat().st_size for p in doomed)

    report = run_retention(settings, db, spool)

    assert sorted(report.studies_deleted) == sorted([delivered, declined])
    assert sorted(report.studies_kept_undelivered) == sorted([pending, dead, never_queued])
    assert report.studies_kept_busy == [busy]
    assert report.files_deleted == len(doomed) == 6 and report.bytes_freed == doomed_bytes
    assert not any(p.exists() for p in delivered_files)
    assert not (spool / delivered).exists() and not (spool / declined).exists()
    assert spool.is_dir()
    with db.session() as session:
        uids = set(session.scalars(select(Study.study_instance_uid)))
        assert uids == {pending, dead, never_queued, busy, recent}
        kept_paths = set(session.scalars(select(Instance.path))) | set(session.scalars(select(Result.path)))
        events = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "retention.deleted")).all()
        audit_after = session.scalar(select(func.count(AuditEvent.id)))
        old_audit = session.scalar(select(func.count(AuditEvent.id)).where(AuditEvent.study_instance_uid == delivered))
    assert all((spool / p).is_file() for p in kept_paths)
    assert {e.study_instance_uid for e in events} == {delivered, declined}
    assert {e.patient_id for e in events} == {"P1", "P6"}
    assert audit_after == audit_before + 2  # nothing removed from the trail, two events added
    assert old_audit > 2  # the deleted study's history is still there


def test_rerun_after_files_already_gone_finishes(env) -> None:
    settings, db = env
    spool = settings.spool_dir
    uid = record_received_study(db, spool, patient_id="P1", accession="A1", received_at=utcnow() - timedelta(days=40))
    record_inference_outcome(db, spool, uid, score=0.5, uncertainty=0.1)
    for path in _files(spool):
        path.unlink()  # as if an earlier run died after removing files
    report = run_retention(settings, db, spool)
    assert report.studies_deleted == [uid] and report.files_missing == 3 and report.files_deleted == 0
    assert run_retention(settings, db, spool).studies_deleted == []


def test_now_argument_and_days_setting(env) -> None:
    settings, db = env
    spool = settings.spool_dir
    uid = record_received_study(db, spool, patient_id="P1", accession="A1", status=StudyStatus.COMPLETE)
    assert run_retention(settings, db, spool).studies_deleted == []
    later = utcnow() + timedelta(days=31)
    assert run_retention(settings, db, spool, now=later).studies_deleted == [uid]


def test_a_file_that_cannot_be_deleted_keeps_its_study_and_the_rest_go_on(env) -> None:  # type: ignore[no-untyped-def]
    settings, db = env
    spool = settings.spool_dir
    old = utcnow() - timedelta(days=45)
    stuck = record_received_study(db, spool, patient_id="P1", accession="A1", received_at=old)
    other = record_received_study(db, spool, patient_id="P2", accession="A2", received_at=old)
    for uid in (stuck, other):
        record_inference_outcome(db, spool, uid, score=0.3, uncertainty=0.1)
    blocked = next(p for p in _files(spool) if stuck in str(p))
    blocked.unlink()
    blocked.mkdir()  # unlink() now fails with IsADirectoryError, as a permission or read-only error would
    for _ in range(2):  # every run: the stuck study is kept, the other is not held up by it
        report = run_retention(settings, db, spool)
        assert report.studies_kept_failed == [stuck]
    assert report.studies_deleted == [] and other not in {p.name for p in spool.iterdir()}
    with db.session() as session:
        assert set(session.scalars(select(Study.study_instance_uid))) == {stuck}
        kept = set(session.scalars(select(Instance.path)))
    assert kept  # its rows still name its files: nothing orphaned


def test_a_spool_folder_on_another_disk_through_a_symlink_is_still_the_spool(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, db = env
    spool = settings.spool_dir
    uid = record_received_study(db, spool, patient_id="P1", accession="A1", received_at=utcnow() - timedelta(days=45))
    record_inference_outcome(db, spool, uid, score=0.3, uncertainty=0.1, heatmaps=2)
    results = spool / "results"
    elsewhere = tmp_path / "other-disk" / "results"
    elsewhere.parent.mkdir()
    results.rename(elsewhere)
    results.symlink_to(elsewhere)  # results on their own volume
    report = run_retention(settings, db, spool)
    assert report.studies_deleted == [uid] and report.files_deleted == 4
    assert not [p for p in elsewhere.rglob("*") if p.is_file()]  # no orphans left on the other disk
    with db.session() as session:
        (detail,) = session.scalars(select(AuditEvent.detail).where(AuditEvent.event_type == "retention.deleted"))
    assert "removed 4 files" in detail and "0 already gone" in detail


def test_duration_histograms_never_shrink_when_retention_removes_jobs(env) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from node.metrics import build_registry

    settings, db = env
    spool = settings.spool_dir

    def scraped() -> dict[str, float]:
        text = generate_latest(build_registry(settings, db)).decode()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        wanted = [s for s in samples if s.name.startswith("edgenode_inference_seconds_") and "le" not in s.labels]
        return {s.name: s.value for s in wanted}

    old = utcnow() - timedelta(days=45)
    for n in range(2):
        uid = record_received_study(db, spool, patient_id=f"P{n}", accession=f"A{n}", received_at=old)
        record_inference_outcome(db, spool, uid, score=0.3, uncertainty=0.1)
    before = scraped()
    assert before["edgenode_inference_seconds_count"] == 2
    assert len(run_retention(settings, db, spool).studies_deleted) == 2
    assert scraped() == before  # a counter that went down would read as a reset to Prometheus
