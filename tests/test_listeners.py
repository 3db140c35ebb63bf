"""Several listener processes on one DICOM port (node/listeners.py), against real senders (dcmtk storescu with
TCP_NODELAY=1): concurrent associations are spread over the processes and every instance is stored and indexed
once; a listener killed with SIGKILL is restarted and nothing it acknowledged is lost; the node-wide limits hold
across the processes; the listeners end with `edgenode serve`."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from db.models import AuditEvent, Instance, Series, Study
from node.app import EdgeNode
from node.gate import REJECT_LOCAL_LIMIT
from node.spool import SPOOL_ID_FILE, TEMP_SUFFIX
from tests.conftest import DCMTK, peer_env
from tests.dicomgen import make_ct_series, write_datasets
from tests.ingest_support import (
    ServeProcess,
    dataset_bytes,
    kill_orphans,
    node_settings,
    poll,
    running_node,
    sender_ae,
    write_toml,
)

LISTENERS = 2


def storescu(port: int, files: list[Path]) -> subprocess.Popen[str]:
    """dcmtk storescu, verbose (it names each file it sends and each response), as a running process."""
    return subprocess.Popen(
        [
            str(DCMTK["storescu"]),
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            "EDGENODE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=peer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def acknowledged(output: str) -> set[str]:
    """The files a storescu -v run was answered Success for."""
    done, current = set(), None
    for line in output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current is not None:
            done.add(current)
    return done


def send_all(port: int, chunks: list[list[Path]]) -> list[tuple[int, str]]:
    procs = [storescu(port, chunk) for chunk in chunks]
    return [(proc.wait(300), proc.stdout.read() if proc.stdout else "") for proc in procs]


def audit(node: EdgeNode, event_type: str) -> list[AuditEvent]:
    with node.db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)).all())


def indexed(node: EdgeNode) -> dict[str, Instance]:
    with node.db.session() as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance)).all()}
        s.expunge_all()
        return rows


def sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_stored_once(node: EdgeNode, files: list[Path]) -> None:
    """Every file is indexed once with its bytes on disk, and the spool holds exactly the indexed files."""
    rows = indexed(node)
    assert sorted(rows) == sorted(sop(p) for p in files)
    for path in files:
        row = rows[sop(path)]
        stored = node.spool.path(row.path)
        assert dataset_bytes(stored) == dataset_bytes(path)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
    on_disk = {p.relative_to(node.spool.root).as_posix() for p in node.spool.root.rglob("*") if p.is_file()}
    on_disk -= {SPOOL_ID_FILE}
    assert not [f for f in on_disk if f.endswith(TEMP_SUFFIX)]
    assert on_disk == {r.path for r in rows.values()}


def test_concurrent_associations_are_spread_over_the_listener_processes(
    tmp_path: Path, dcmtk, database_url: str
) -> None:
    files = write_datasets(make_ct_series(48, 64, 64, patient_id="PAT-LISTEN"), tmp_path / "ct")
    chunks = [files[k::8] for k in range(8)]
    settings = node_settings(tmp_path / "var", node={"listeners": LISTENERS}, database={"url": database_url})
    with running_node(settings) as node:
        assert node.scp is None and node.listeners is not None
        assert len(node.listeners.pids()) == LISTENERS
        for code, output in send_all(node.port, chunks):
            assert code == 0, output
        assert_stored_once(node, files)
        with node.db.session() as s:
            assert s.scalar(select(Series.instance_count)) == 48
        assert len(audit(node, "instance.stored")) == 48 and not audit(node, "instance.duplicate")
        accepted = [e.detail for e in audit(node, "association.accepted")]
        assert len(accepted) == 8
        served_by = {re.search(r"listener (\d) of 2", detail).group(1) for detail in accepted}  # type: ignore[union-attr]
        assert served_by == {"1", "2"}, accepted

        for code, output in send_all(node.port, chunks[:2]):  # a resend reaches whichever process: duplicates
            assert code == 0, output
        assert len(audit(node, "instance.duplicate")) == 12
        assert_stored_once(node, files)


@pytest.mark.slow
def test_a_killed_listener_is_restarted_and_loses_nothing_acknowledged(tmp_path: Path, dcmtk) -> None:
    files = write_datasets(make_ct_series(240, 256, 256, patient_id="PAT-KILL"), tmp_path / "ct")
    chunks = [files[k::4] for k in range(4)]
    settings = node_settings(tmp_path / "var", node={"listeners": LISTENERS})
    node = EdgeNode(settings)
    node.start()
    try:
        assert node.listeners is not None
        before = node.listeners.pids()
        procs = [storescu(node.port, chunk) for chunk in chunks]
        assert poll(lambda: len(indexed(node)) >= 40, 120), "the node stored too little before the kill"
        victim = before[0]
        psutil.Process(victim).kill()  # SIGKILL, in the middle of its associations
        outputs = [(proc.wait(300), proc.stdout.read() if proc.stdout else "") for proc in procs]
        acked = set().union(*(acknowledged(output) for _, output in outputs))
        assert any(code != 0 for code, _ in outputs), "no association was cut by the kill"
        assert len(acked) < len(files)

        # Started again; the other listener served on all the while.
        assert poll(lambda: len(node.listeners.pids()) == LISTENERS and victim not in node.listeners.pids(), 30)
        rows = indexed(node)
        for path in map(Path, acked):  # nothing acknowledged is lost
            row = rows[sop(path)]
            assert dataset_bytes(node.spool.path(row.path)) == dataset_bytes(path)

        for code, output in send_all(node.port, chunks):  # the node keeps receiving: the rest, and duplicates
            assert code == 0, output
        assert sorted(indexed(node)) == sorted(sop(p) for p in files)
    finally:
        node.stop()
    assert node.listeners.crashed  # so the next start checks the spool: the victim may have left a file unindexed
    assert not (settings.data_dir / "clean-stop").exists()
    with running_node(settings) as again:  # start-up recovery, then spool and index agree
        assert_stored_once(again, files)


def test_node_limits_hold_across_listener_processes(tmp_path: Path) -> None:
    limits = {"listeners": LISTENERS, "max_associations": 3}
    with running_node(node_settings(tmp_path / "var", node=limits)) as node:
        held = [sender_ae().associate("127.0.0.1", node.port, ae_title="EDGENODE") for _ in range(3)]
        assert all(a.is_established for a in held)
        refused = sender_ae().associate("127.0.0.1", node.port, ae_title="EDGENODE")
        assert refused.is_rejected
        rsp = refused.acceptor.primitive
        assert (rsp.result, rsp.result_source, rsp.diagnostic) == REJECT_LOCAL_LIMIT
        held.pop().release()

        # the place is free once the listener has seen the release through
        assert poll(lambda: _associate_and_hold(node.port, held), 10, every=0.2)
        for assoc in held:
            assert int(assoc.send_c_echo().Status) == 0
            assoc.release()
    rejected = [e.detail for e in audit(node, "association.rejected")]
    assert any("local limit exceeded: 3 associations open (node.max_associations)" in d for d in rejected)


def _associate_and_hold(port: int, held: list) -> bool:  # type: ignore[type-arg]
    """Try one more association; an accepted one joins `held` (released by the test)."""
    assoc = sender_ae().associate("127.0.0.1", port, ae_title="EDGENODE")
    if assoc.is_established:
        held.append(assoc)
    return bool(assoc.is_established)


def test_a_dead_listeners_associations_stop_counting(tmp_path: Path) -> None:
    limits = {"listeners": LISTENERS, "max_associations": 2}
    with running_node(node_settings(tmp_path / "var", node=limits)) as node:
        assert node.listeners is not None
        held = [sender_ae().associate("127.0.0.1", node.port, ae_title="EDGENODE") for _ in range(2)]
        assert all(a.is_established for a in held)
        assert sender_ae().associate("127.0.0.1", node.port, ae_title="EDGENODE").is_rejected  # full
        served = {re.search(r"listener (\d) of", e.detail).group(1) for e in audit(node, "association.accepted")}  # type: ignore[union-attr]
        assert served == {"1", "2"}  # one association each
        victim = node.listeners.pids()[0]
        psutil.Process(victim).kill()
        assert poll(lambda: sum(a.is_established for a in held) == 1, 30)  # its association went with it

        # once the node has cleared the dead listener's count (within its 0.5 s watch)
        assert poll(lambda: _associate_and_hold(node.port, held), 30, every=0.5)
        for assoc in held:
            if assoc.is_established:
                assoc.release()


@pytest.mark.slow  # an `edgenode serve` with listener processes, one killed, then serve killed
def test_listener_processes_end_with_serve(tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "var", node={"listeners": LISTENERS})
    config = write_toml(settings, tmp_path / "edgenode.toml")
    log = tmp_path / "serve.log"
    serve = ServeProcess(config, settings.node.port, log).start()
    assert serve.proc is not None
    children: list[psutil.Process] = []
    try:
        serving = [f"listener process {slot} serving" for slot in range(LISTENERS)]
        assert poll(lambda: all(line in log.read_text() for line in serving), 120), log.read_text()[-3000:]
        listeners = serve.spawned()
        assert len(listeners) == LISTENERS

        listeners[0].kill()  # a crashed listener is restarted by serve
        assert poll(lambda: "exited with code -9; restarting in 1 s" in log.read_text(), 30), log.read_text()[-3000:]
        assert poll(lambda: log.read_text().count("listener process 0 serving") == 2, 120), log.read_text()[-3000:]
        assert len(serve.spawned()) == LISTENERS
        children = psutil.Process(serve.proc.pid).children(recursive=True)

        serve.kill_and_expect_descendants_to_end(children, 60)
        assert log.read_text().count("is gone: stopping") == LISTENERS
    finally:
        serve.stop()
        kill_orphans(children)


def test_counts_are_exact_when_listener_processes_store_one_study_at_once(
    tmp_path: Path, dcmtk, database_url: str
) -> None:
    """Two series of one study from eight associations at once: the processes race to create the study and the
    series and all count into them; study and series counters come out exact (SQLite: one writer at a time under
    the host lock; PostgreSQL: a lost race on a unique UID is retried alone)."""
    first = make_ct_series(20, 32, 32, patient_id="PAT-COUNT")
    second = make_ct_series(20, 32, 32, patient_id="PAT-COUNT", study_uid=str(first[0].StudyInstanceUID))
    files = write_datasets(first + second, tmp_path / "ct")
    settings = node_settings(tmp_path / "var", node={"listeners": LISTENERS}, database={"url": database_url})
    with running_node(settings) as node:
        for code, output in send_all(node.port, [files[k::8] for k in range(8)]):
            assert code == 0, output
        with node.db.session() as s:
            assert sorted(s.scalars(select(Series.instance_count))) == [20, 20]
            assert s.scalar(select(func.count()).select_from(Instance)) == 40
            assert s.scalars(select(Study.instance_count)).one() == 40
        assert_stored_once(node, files)
