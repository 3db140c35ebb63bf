"""at most one active (queued or running) job per study, enforced by a partial unique index

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Two stability scans of one study (two nodes, or two threads) each created a job; nothing in the schema stopped
it. Before the index is built, any study that already has several active jobs keeps its newest one and the others
are marked superseded by it, as the scan itself does when a study grows.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = "status IN ('queued', 'running')"


def upgrade() -> None:
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.Integer),
        sa.column("study_id", sa.Integer),
        sa.column("status", sa.String),
        sa.column("superseded_by", sa.Integer),
        sa.column("finished_at", sa.DateTime),
    )
    bind = op.get_bind()
    active = jobs.c.status.in_(["queued", "running"])
    newest = dict(
        bind.execute(
            sa.select(jobs.c.study_id, sa.func.max(jobs.c.id))
            .where(active)
            .group_by(jobs.c.study_id)
            .having(sa.func.count() > 1)
        ).all()
    )
    now = datetime.now(UTC).replace(tzinfo=None)  # naive UTC, as the models store it
    for study_id, keep in newest.items():
        bind.execute(
            jobs.update()
            .where(jobs.c.study_id == study_id, active, jobs.c.id != keep)
            .values(status="superseded", superseded_by=keep, finished_at=now)
        )
    op.create_index(
        "uq_jobs_active_study",
        "jobs",
        ["study_id"],
        unique=True,
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_active_study", table_name="jobs")
