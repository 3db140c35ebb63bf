"""The listener's group committer (node/committer.py) on a real spool and a real database: a row is committed only
after its file and folder are durable, a failed fsync fails its own store only, and a store that arrives while
another's commit waits has its fsyncs under way meanwhile."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db.ingest import IngestIndex
from db.models import Instance
from db.session import Database
from node.committer import GroupCommitter
from node.spool import PlacedFile, Spool
from tests.test_ingest_index import indexed_sops, record


class GatedSpool(Spool):
    """A spool whose folder fsyncs are noted as they start and, for the folders named in `gates`, held until
    their event is set: a slow disk, on demand."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gates: dict[str, threading.Event] = {}
        self.started: list[str] = []

    def sync_folder(self, folder: Path) -> None:
        self.started.append(folder.name)
        gate = self.gates.get(folder.name)
        if gate is not None:
            assert gate.wait(30), "gate never opened"
        super().sync_folder(folder)


@pytest.fixture
def index(tmp_path: Path) -> IngestIndex:
    return IngestIndex(Database(f"sqlite:///{tmp_path / 'edgenode.db'}"))


@pytest.fixture
def spool(tmp_path: Path) -> GatedSpool:
    return GatedSpool(tmp_path / "spool")


@pytest.fixture
def committer(index: IngestIndex, spool: GatedSpool) -> Iterator[GroupCommitter]:
    running = GroupCommitter(index, spool)
    running.start()
    yield running
    for gate in spool.gates.values():
        gate.set()
    running.stop()


def _place(spool: Spool, sop: str, series: str) -> tuple[PlacedFile, bytes]:
    data = os.urandom(4096) + sop.encode()
    return spool.place_instance("1.2.3", series, sop, data[:100], data[100:]), data


def _submit_in_thread(committer: GroupCommitter, spool: Spool, sop: str, series: str) -> tuple[threading.Thread, list]:
    placed, data = _place(spool, sop, series)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(committer.submit(record(sop, series=series, path=placed.relpath), placed))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)
        finally:
            placed.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_store_is_committed_after_its_fsyncs_with_its_files_digest(
    committer: GroupCommitter, spool: GatedSpool, index: IngestIndex
) -> None:
    gate = spool.gates["1.2.3.1"] = threading.Event()
    thread, outcome = _submit_in_thread(committer, spool, "9.1", "1.2.3.1")
    thread.join(0.5)
    assert thread.is_alive() and indexed_sops(index.db) == set()  # the folder not yet durable: no row, no answer
    gate.set()
    thread.join(30)
    assert outcome == [True] and indexed_sops(index.db) == {"9.1"}
    with index.db.session() as session:
        path, sha256 = session.execute(select(Instance.path, Instance.sha256)).one()
    stored = spool.path(path).read_bytes()
    assert sha256 == hashlib.sha256(stored).hexdigest() and len(stored) == 4096 + 3


def test_a_failed_fsync_fails_that_store_and_no_other(
    committer: GroupCommitter, spool: GatedSpool, index: IngestIndex
) -> None:
    broken, _ = _place(spool, "9.1", "1.2.3.1")
    assert broken.fd is not None
    os.close(broken.fd)
    reader, writer = os.pipe()
    broken.fd = reader  # fsync of a pipe fails (EINVAL), as a failing disk's does (EIO)
    good, outcome = _submit_in_thread(committer, spool, "9.2", "1.2.3.2")
    with pytest.raises(OSError):
        committer.submit(record("9.1", path=broken.relpath), broken)
    broken.close()
    os.close(writer)
    good.join(30)
    assert outcome == [True]
    assert indexed_sops(index.db) == {"9.2"}


def test_a_store_that_arrives_during_a_commit_starts_its_fsyncs_at_once(
    committer: GroupCommitter, spool: GatedSpool, index: IngestIndex
) -> None:
    first_gate = spool.gates["1.2.3.1"] = threading.Event()
    first, first_outcome = _submit_in_thread(committer, spool, "9.1", "1.2.3.1")
    while "1.2.3.1" not in spool.started:  # the first store's commit waits for its folder
        first.join(0.01)
    second, second_outcome = _submit_in_thread(committer, spool, "9.2", "1.2.3.2")
    for _ in range(3000):
        if "1.2.3.2" in spool.started:
            break
        second.join(0.01)
    assert "1.2.3.2" in spool.started, "the second store's fsyncs waited for the first store's commit"
    assert first.is_alive() and second.is_alive()
    first_gate.set()
    first.join(30)
    second.join(30)
    assert first_outcome == [True] and second_outcome == [True]
    assert indexed_sops(index.db) == {"9.1", "9.2"}
