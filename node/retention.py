"""Retention: remove old studies from the spool and the database, never undelivered results or audit records.

A study is removed when its last instance arrived more than `retention.days` ago, no job of it is
queued or running, and every result it produced was acknowledged by every destination (all outbound
items `sent`; a result never queued for delivery counts as undelivered and keeps the study). Files go
first, then the rows, so a crash in between leaves rows whose files are already gone and the next run
finishes the job. Each removal appends a `retention.deleted` audit event; audit rows are never touched.

Several nodes on one database: a node removes only studies whose files are all in its own spool (or a spool it
shares with the node that wrote them: db/retention.py's `files_elsewhere`); another node's study stays for that node
to remove. An item another node is sending is pending, so its study is kept as undelivered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from db.audit import record_audit
from db.models import AuditEventType, utcnow
from db.retention import (
    delete_study,
    files_elsewhere,
    has_undelivered_results,
    is_busy,
    lock_study,
    studies_received_before,
    study_file_paths,
)
from db.session import Database
from node.config import Settings
from node.spool import contained_path, spool_id

log = logging.getLogger(__name__)


@dataclass
class RetentionReport:
    cutoff: datetime
    studies_deleted: list[str] = field(default_factory=list)  # Study Instance UIDs
    studies_kept_undelivered: list[str] = field(default_factory=list)
    studies_kept_busy: list[str] = field(default_factory=list)
    files_deleted: int = 0
    bytes_freed: int = 0
    files_missing: int = 0  # already gone from the spool (earlier interrupted run, manual cleanup)
    studies_kept_failed: list[str] = field(default_factory=list)  # a file could not be removed: rows kept, retried
    studies_kept_elsewhere: list[str] = field(default_factory=list)  # files in another node's spool: its to remove


@dataclass
class _Removal:
    deleted: int = 0
    missing: int = 0
    failed: int = 0  # outside the spool, or the file system refused
    bytes: int = 0


def _remove(relpath: str, spool_root: Path, removal: _Removal) -> Path | None:
    """Delete one spool file, counting the outcome; returns its path unless it lies outside the spool."""
    try:
        path = contained_path(spool_root, relpath)
    except ValueError:
        log.error("retention: refusing to delete %s outside the spool %s", relpath, spool_root)
        removal.failed += 1
        return None
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        removal.missing += 1
        return path
    except OSError as exc:
        log.error("retention: cannot delete %s: %s", path, exc)
        removal.failed += 1
        return path
    removal.deleted += 1
    removal.bytes += size
    return path


def _prune_empty_dirs(paths: set[Path], spool_root: Path) -> None:
    """Remove now-empty folders between each deleted file and the spool root (never the root)."""
    for folder in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        current = folder
        while current != spool_root and current.is_relative_to(spool_root):
            try:
                current.rmdir()
            except OSError:  # not empty, or already gone
                break
            current = current.parent


def run_retention(settings: Settings, db: Database, spool_root: Path, now: datetime | None = None) -> RetentionReport:
    """Delete studies older than retention.days whose results were all delivered; report what happened."""
    spool_root = spool_root.resolve()
    cutoff = (now or utcnow()) - timedelta(days=settings.retention.days)
    report = RetentionReport(cutoff=cutoff)
    ours = spool_id(spool_root)
    with db.session() as session:
        candidates = studies_received_before(session, cutoff)
    for uid in candidates:
        with db.session() as session:
            study = lock_study(session, uid)
            if study is None or study.last_received_at >= cutoff:  # gone or grew meanwhile
                continue
            if is_busy(study):
                report.studies_kept_busy.append(uid)
                continue
            if files_elsewhere(study, ours):
                report.studies_kept_elsewhere.append(uid)
                continue
            if has_undelivered_results(study):
                report.studies_kept_undelivered.append(uid)
                continue
            removal = _Removal()
            removed = [_remove(relpath, spool_root, removal) for relpath in study_file_paths(session, study.id)]
            _prune_empty_dirs({p.parent for p in removed if p is not None}, spool_root)
            report.files_deleted += removal.deleted
            report.files_missing += removal.missing
            report.bytes_freed += removal.bytes
            if removal.failed:
                # Rows kept, so no file is left that nothing names; the next run tries again (deleted ones count
                # as missing then). The other studies go on.
                report.studies_kept_failed.append(uid)
                continue
            record_audit(
                session,
                AuditEventType.RETENTION_DELETED,
                patient_id=study.patient_id,
                accession_number=study.accession_number,
                study_instance_uid=uid,
                detail=(
                    f"older than {settings.retention.days} days, all results delivered: removed "
                    f"{removal.deleted} files ({removal.bytes} bytes; {removal.missing} already gone) and the "
                    "study's database rows"
                ),
            )
            delete_study(session, study)
        report.studies_deleted.append(uid)
        log.info("retention: removed study %s (%d files)", uid, removal.deleted)
    if report.studies_kept_failed:
        log.warning(
            "retention: kept %d old studies whose files could not all be deleted (see the errors above)",
            len(report.studies_kept_failed),
        )
    if report.studies_kept_undelivered:
        log.warning(
            "retention: kept %d old studies with undelivered results (see the queue page)",
            len(report.studies_kept_undelivered),
        )
    return report
