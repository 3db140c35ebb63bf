"""audit events append-only on PostgreSQL too

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

0001 made SQLite refuse UPDATE and DELETE on audit_events with triggers; PostgreSQL had none, so a shared
database's audit trail could be rewritten. A trigger function raises on both, as the SQLite triggers do.
Nothing changes on SQLite.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'audit_events is append-only'; END $$"
    )
    for verb in ("update", "delete"):
        op.execute(
            f"CREATE TRIGGER audit_events_no_{verb} BEFORE {verb.upper()} ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for verb in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS audit_events_no_{verb} ON audit_events")
    op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
