"""A throwaway PostgreSQL server for the test session, and the `database_url` fixture that runs a test on SQLite and
on PostgreSQL.

The server is Debian's `postgresql` (initdb and pg_ctl from /usr/lib/postgresql/<version>/bin), started once per
session in a temp dir on a free loopback port (its unix socket in that dir too), with fsync off: a test database need
not survive power loss. PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user
(the Debian package creates it). Each test gets a fresh database on it. Tests that use `database_url` are skipped on
PostgreSQL only when the server binaries are missing (scripts/setup.sh installs them); a missing driver or a server
that does not start is an error.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port

SUPERUSER = "postgres"
ENGINES = ("sqlite", "postgresql")


def server_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's bin folder, or None when no server is installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class PostgresServer:
    """A PostgreSQL cluster in `root`, running as `user` (None: as this process's user)."""

    def __init__(self, bin_dir: Path, root: Path, port: int, user: str | None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.port = port
        self.user = user
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        done = subprocess.run(cmd, user=self.user, cwd=self.root, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{tail}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres") as conn:
            conn.autocommit = True
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _server_user() -> str | None:
    """None when this process may run the server itself; as root, the `postgres` system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SUPERUSER], check=True)
    return SUPERUSER


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = server_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries missing (/usr/lib/postgresql/*/bin): run scripts/setup.sh")
    try:
        import psycopg  # noqa: F401 - the driver the tests' URLs name
    except ImportError:
        pytest.fail("psycopg is missing: install the edgenode[postgres] extra (scripts/setup.sh does)")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="edgenode-pg-"))  # not under pytest's 0700 tmp: the server user needs it
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bin_dir, root, free_port(), user)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database's URL: a SQLite file in tmp_path, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgenode.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """An empty PostgreSQL database's URL, for tests about PostgreSQL alone."""
    return postgres_server.create_database()
