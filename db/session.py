"""Engine and session factory: SQLite in WAL mode by default, any SQLAlchemy URL accepted.

Migrations are applied by `open_database`, so every process (listener, worker, CLI) sees the
current schema. SQLite commits are synchronous=FULL: an acknowledged instance survives power loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Create an engine; for SQLite, create the parent folder and set WAL/durability pragmas."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # A ping before every checkout guards against dropped server connections; a SQLite file has none.
    engine = create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


# pg_advisory_xact_lock key held while migrating: nodes starting together on an empty PostgreSQL database would
# otherwise all create the same tables at once and all but one die. Any fixed 64-bit number ("edgenode" in ASCII).
MIGRATION_LOCK_KEY = 0x65646765_6E6F6465


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent, safe for several processes at once).

    PostgreSQL: one transaction holds an advisory lock for its whole length (DDL is transactional there), so the
    processes migrate one after another and the later ones find the schema at head. SQLite: the same, under its
    write lock (BEGIN IMMEDIATE; the others wait up to its busy timeout).
    """
    cfg = alembic_config(engine)
    with engine.connect() as connection:  # the usual case, and read-only: nothing to do
        if set(MigrationContext.configure(connection).get_current_heads()) == set(
            ScriptDirectory.from_config(cfg).get_heads()
        ):
            return
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        elif connection.dialect.name == "sqlite":
            # The driver runs DDL outside any transaction: take the write lock first, for the whole migration.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


class Database:
    """The node's database: an engine with the schema migrated and a session factory."""

    def __init__(self, url: str, *, run_migrations: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if run_migrations:
            migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> None:
        """One round trip (SELECT 1); raises the driver's error when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


class DatabaseNotFound(FileNotFoundError):
    """A read-side command pointed at a SQLite file that does not exist (a wrong data_dir, usually)."""


def open_existing(url: str) -> Database:
    """The node's database for commands that only look at (or operate on) what the node recorded: a missing
    SQLite file is an error naming the path, rather than a new empty database that shows nothing."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise DatabaseNotFound(
                f"no edgenode database at {path}: check [node] data_dir (the node creates it when it first starts)"
            )
    return Database(url)
