"""The Alembic migrations build exactly the schema the models describe, and upgrade an older database in place."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from db.models import Base, Job, JobDuration, JobStatus, Study
from db.session import Database, alembic_config, make_engine


def test_migrations_and_models_agree(database_url: str) -> None:
    db = Database(database_url)
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_upgrading_copies_finished_jobs_into_job_durations(database_url: str) -> None:
    url = database_url
    engine = make_engine(url)
    config = alembic_config(engine)
    with engine.begin() as conn:  # a database as the first release left it
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    with engine.begin() as conn:
        conn.execute(Study.__table__.insert().values(id=1, study_instance_uid="1.2.3"))
        conn.execute(
            Job.__table__.insert(),
            [
                {"id": 1, "study_id": 1, "status": JobStatus.DONE, "timings": {"queue_wait": 2.0, "total": 9.5}},
                {"id": 2, "study_id": 1, "status": JobStatus.FAILED, "timings": {"queue_wait": 1.0}},
            ],
        )
    engine.dispose()
    db = Database(url)  # opening migrates to the newest revision
    with db.session() as session:
        rows = session.execute(select(JobDuration.job_id, JobDuration.worker_seconds, JobDuration.queue_wait_seconds))
        assert rows.all() == [(1, 9.5, 2.0)]  # finished jobs only
