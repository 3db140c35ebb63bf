"""Shared fixtures: real peers' tool paths, free loopback ports, and process environments."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# The peers' environment is shared with `edgenode demo` (TCP_NODELAY=1 for dcmtk and Orthanc); re-exported here.
from node.local_orthanc import peer_env as peer_env
from tests.ports import free_port as free_port  # race-free under pytest-xdist

# The throwaway PostgreSQL server and the `database_url` fixture (SQLite and PostgreSQL).
pytest_plugins = ["tests.postgres"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the fast tier runs cores + 1 workers) each worker computes on one thread: torch's
    default of one thread per core in every worker oversubscribes the CPU, and idle OpenMP threads spin."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# dcmtk's tools by absolute path: pynetdicom installs same-named scripts into the venv's bin.
DCMTK = {
    name: Path("/usr/bin") / name
    for name in ("storescu", "echoscu", "storescp", "dcmdump", "dcmcjpeg", "dcmcrle", "dcmcjpls")
}
DCIODVFY = Path("/usr/bin/dciodvfy")
DCENTVFY = Path("/usr/bin/dcentvfy")
ORTHANC = Path("/usr/sbin/Orthanc")


def node_env(**extra: str) -> dict[str, str]:
    """Environment for an `edgenode` subprocess running this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def edgenode_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "node", *args]


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup.sh (it installs dcmtk, dicom3tools and orthanc)")
    return path


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def dcmtk() -> dict[str, Path]:
    for path in DCMTK.values():
        require(path)
    return DCMTK


@pytest.fixture(scope="session")
def have_orthanc() -> Path:
    return require(ORTHANC)


def which_or_fail(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found on PATH")
    return found
