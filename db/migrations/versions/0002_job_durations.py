"""job durations: an append-only record per finished job, for the /metrics histograms

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

The histograms were built from the jobs table, which retention prunes: their counts went down, which
Prometheus reads as a counter reset. Existing finished jobs are copied in, so nothing already counted is lost.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.jobs import inference_seconds, queue_wait_seconds

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    durations = op.create_table(
        "job_durations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=False),
        sa.Column("worker_seconds", sa.Float(), nullable=True),
        sa.Column("queue_wait_seconds", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.Integer),
        sa.column("status", sa.String),
        sa.column("finished_at", sa.DateTime),
        sa.column("created_at", sa.DateTime),
        sa.column("timings", sa.JSON),
    )
    done = op.get_bind().execute(
        sa.select(jobs.c.id, jobs.c.finished_at, jobs.c.created_at, jobs.c.timings).where(jobs.c.status == "done")
    )
    rows = [
        {
            "job_id": job_id,
            "finished_at": finished_at or created_at,
            "worker_seconds": inference_seconds(timings),
            "queue_wait_seconds": queue_wait_seconds(timings),
        }
        for job_id, finished_at, created_at, timings in done
    ]
    if rows:
        op.bulk_insert(durations, rows)


def downgrade() -> None:
    op.drop_table("job_durations")
