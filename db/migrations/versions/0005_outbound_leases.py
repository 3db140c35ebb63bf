"""outbound items claimed with a lease; results and studies name the spool that holds their files

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Several nodes on one database each send only the items they claimed (lease owner and expiry, on the database
clock), and only items whose file is in a spool they can read (`spool_id`, the id kept in the spool root).
Existing rows get no spool id: they were written by a lone node and stay claimable by any.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbound", sa.Column("lease_owner", sa.String(64), nullable=True))
    op.add_column("outbound", sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    op.add_column("results", sa.Column("spool_id", sa.String(32), nullable=True))
    op.add_column("studies", sa.Column("spool_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("spool_id")
    with op.batch_alter_table("results") as batch:
        batch.drop_column("spool_id")
    with op.batch_alter_table("outbound") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
