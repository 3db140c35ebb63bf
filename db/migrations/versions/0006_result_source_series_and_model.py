"""which source series each result object was made from, and by which model

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

With a model per modality ([inference] model table) one job can use several models, so the job's model_id no
longer says which model served which series. Rows written before this revision keep empty values (the job's
model_id still names the one model used then).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("source_series_instance_uid", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("model_id", sa.String(80), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("model_id")
        batch.drop_column("source_series_instance_uid")
