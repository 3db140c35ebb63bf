"""Several senders over one database (SQLite and a real PostgreSQL) and one real PACS (dcmtk storescp): per-item
claims with a lease, exactly-once delivery, a killed sender's items taken over, and retention and spool recovery
leaving another node's work alone."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import OutboundItem, OutboundStatus, Study
from db.outbound import claim_due_items, mark_sent, renew_leases
from db.session import Database
from node.config import PeerSettings, RetentionSettings
from node.identity import node_identity, sender_owner
from node.outbound import enqueue, release_own_claims
from node.retention import run_retention
from node.spool import TEMP_SUFFIX, Spool
from tests.conftest import edgenode_cmd, node_env
from tests.peers import StoreSCP
from tests.ports import free_port
from tests.test_outbound import audit_count, ct_objects, items, make_job, make_settings

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def node_dir(tmp_path: Path, name: str, instance: str) -> Path:
    """A node's data folder with a fixed instance id, so the test knows its identity."""
    data_dir = tmp_path / name
    data_dir.mkdir()
    (data_dir / "node-id").write_text(instance + "\n")
    return data_dir


def queue_jobs(
    db: Database, spool: Spool, peer: PeerSettings, jobs: int, heatmaps: int, now: datetime | None = None
) -> list[str]:
    """`jobs` studies' results queued for `peer`; their SOP Instance UIDs."""
    uids = []
    for _ in range(jobs):
        sources, objects = ct_objects(n_slices=heatmaps, heatmaps=heatmaps)
        enqueue(db, spool, make_job(db, sources, peer.ae_title), objects, peer, now=now)
        uids += [str(o.dataset.SOPInstanceUID) for o in objects]
    return uids


def sender_cmd(
    tmp_path: Path, data_dir: Path, spool_dir: Path, url: str, peer: PeerSettings, lease: float
) -> list[str]:
    config = data_dir / "edgenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{data_dir}"\nspool_dir = "{spool_dir}"\n'
        "acse_timeout = 3\ndimse_timeout = 3\nnetwork_timeout = 3\n"
        f'[database]\nurl = "{url}"\n[send]\nlease_seconds = {lease}\n'
        f'[[peers]]\nae_title = "{peer.ae_title}"\nport = {peer.port}\n'
    )
    return edgenode_cmd("outbound", "send", "--config", str(config))


def sent_count(stdout: str) -> int:
    return int(stdout.split("sent ", 1)[1].split(",", 1)[0])


def test_claims_are_disjoint_expire_and_a_stale_owner_records_nothing(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    try:
        spool = Spool(tmp_path / "spool")
        peer = PeerSettings(ae_title="PACS", port=free_port())
        queue_jobs(db, spool, peer, jobs=2, heatmaps=2, now=T0)  # 2 x (SEG, 2 SC, SR)
        with db.session() as session:
            first = claim_due_items(session, "a", 60, spool.id, limit=5, now=T0)
        with db.session() as session:
            second = claim_due_items(session, "b", 60, spool.id, limit=5, now=T0)
        with db.session() as session:  # everything due is claimed by a live lease
            assert claim_due_items(session, "c", 60, spool.id, now=T0 + timedelta(seconds=30)) == []
            assert claim_due_items(session, "c", 60, "another-spool", now=T0 + timedelta(minutes=5)) == []
        a_ids, b_ids = {i.id for i in first}, {i.id for i in second}
        assert len(a_ids) == 5 and len(b_ids) == 3 and not a_ids & b_ids
        with db.session() as session:  # a renews, b does not: after the lease only b's items are taken over
            assert renew_leases(session, sorted(a_ids), "a", 60, now=T0 + timedelta(seconds=50)) == 5
        with db.session() as session:
            taken = claim_due_items(session, "c", 60, spool.id, now=T0 + timedelta(seconds=70))
        assert {i.id for i in taken} == b_ids
        with db.session() as session:  # b's late acknowledgement is not recorded; c's is
            stale = next(iter(b_ids))
            assert mark_sent(session, stale, "b", 0, "", T0 + timedelta(seconds=71)) is None
            assert mark_sent(session, stale, "c", 0, "", T0 + timedelta(seconds=72)) is not None
        with db.session() as session:
            row = session.get_one(OutboundItem, stale)
            assert row.status == OutboundStatus.SENT and row.attempts == 1 and row.lease_owner is None
    finally:
        db.dispose()


@pytest.mark.slow  # real sender processes, a 120-item backlog / a lease run out
def test_two_senders_deliver_every_item_exactly_once(tmp_path: Path, database_url: str) -> None:
    """Two nodes (two identities, one shared spool) send one backlog at once to one storescp."""
    db = Database(database_url)
    try:
        shared = tmp_path / "shared-spool"
        spool = Spool(shared)
        with StoreSCP(tmp_path / "storescp", extra_args=["--unique-filenames"]) as scp:
            peer = PeerSettings(ae_title="STORESCP", port=scp.port)
            uids = queue_jobs(db, spool, peer, jobs=20, heatmaps=4)  # 120 items: more than one claim batch
            commands = [
                sender_cmd(tmp_path, node_dir(tmp_path, name, instance), shared, database_url, peer, 30)
                for name, instance in (("node-a", "aaaaaaaa"), ("node-b", "bbbbbbbb"))
            ]
            senders = [
                subprocess.Popen(c, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for c in commands
            ]
            outputs = [s.communicate(timeout=180) for s in senders]
            for sender, (out, err) in zip(senders, outputs, strict=True):
                assert sender.returncode == 0, out + err
            received = [str(pydicom.dcmread(p).SOPInstanceUID) for p in scp.received()]
        assert sorted(received) == sorted(uids)  # every object, each transferred once (unique file names)
        assert sum(sent_count(out) for out, _ in outputs) == len(uids)
        assert {i.status for i in items(db)} == {OutboundStatus.SENT}
        assert audit_count(db, "send.ok") == len(uids)
    finally:
        db.dispose()


@pytest.mark.slow  # real sender processes, a 120-item backlog / a lease run out
def test_a_killed_senders_items_are_taken_over_after_its_lease(tmp_path: Path, database_url: str) -> None:
    """SIGKILL node A's sender mid-send; node B leaves A's claims alone while the lease runs, then takes them over
    and delivers each once. A node with a spool of its own never claims them (it cannot read the files)."""
    db = Database(database_url)
    try:
        shared = tmp_path / "shared-spool"
        spool = Spool(shared)
        lease = 12.0
        with StoreSCP(tmp_path / "storescp", extra_args=["--sleep-after", "1", "--unique-filenames"]) as scp:
            peer = PeerSettings(ae_title="STORESCP", port=scp.port)
            uids = queue_jobs(db, spool, peer, jobs=2, heatmaps=2)
            dir_a = node_dir(tmp_path, "node-a", "aaaaaaaa")
            a = subprocess.Popen(
                sender_cmd(tmp_path, dir_a, shared, database_url, peer, lease),
                env=node_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 60
            while not scp.received() and a.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(a.pid, signal.SIGKILL)
            a.wait()
            identity_a = node_identity(dir_a)
            with db.session() as session:
                held = session.scalars(
                    select(OutboundItem.id).where(
                        OutboundItem.status == OutboundStatus.PENDING,
                        OutboundItem.lease_owner.startswith(identity_a + "/"),
                    )
                ).all()
            assert held, "node A finished before it could be killed"

            # A node that cannot read the shared spool never claims (or kills) these items.
            lone = sender_cmd(
                tmp_path, node_dir(tmp_path, "node-c", "cccccccc"), tmp_path / "own-spool", database_url, peer, lease
            )
            run = subprocess.run(lone, env=node_env(), capture_output=True, text=True, timeout=60, check=False)
            assert run.returncode == 0 and sent_count(run.stdout) == 0, run.stdout + run.stderr

            command_b = sender_cmd(
                tmp_path, node_dir(tmp_path, "node-b", "bbbbbbbb"), shared, database_url, peer, lease
            )
            early = subprocess.run(command_b, env=node_env(), capture_output=True, text=True, timeout=60, check=False)
            assert early.returncode == 0, early.stdout + early.stderr
            with db.session() as session:  # A's lease has not run out: B sent none of A's claims
                still = session.scalars(select(OutboundItem).where(OutboundItem.id.in_(held))).all()
                assert all(i.status == OutboundStatus.PENDING and i.lease_owner.startswith(identity_a) for i in still)

            late_deadline = time.monotonic() + 120
            while any(i.status == OutboundStatus.PENDING for i in items(db)) and time.monotonic() < late_deadline:
                subprocess.run(command_b, env=node_env(), capture_output=True, text=True, timeout=120, check=False)
                time.sleep(1)
            received = [str(pydicom.dcmread(p).SOPInstanceUID) for p in scp.received()]
        assert {i.status for i in items(db)} == {OutboundStatus.SENT}
        assert set(received) == set(uids)
        assert len(received) - len(set(received)) <= 1  # at most the one in flight at the kill
        assert audit_count(db, "send.ok") == len(uids)  # one acknowledgement recorded per item
        assert not any(p.name.endswith(".dcm") for p in (tmp_path / "own-spool").rglob("*"))
    finally:
        db.dispose()


def test_start_up_releases_only_this_nodes_dead_senders_claims(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    try:
        data_dir = node_dir(tmp_path, "var", "aaaaaaaa")
        settings = make_settings(tmp_path, [])
        settings.node.data_dir = data_dir
        spool = Spool(tmp_path / "spool")
        peer = PeerSettings(ae_title="PACS", port=free_port())
        queue_jobs(db, spool, peer, jobs=1, heatmaps=2)  # 4 items
        identity = node_identity(data_dir)
        dead = subprocess.Popen(["true"])
        dead.wait()
        gone_owner = sender_owner(identity).rsplit(".", 1)[0] + f".{dead.pid}-send"
        owners = [gone_owner, sender_owner(identity), "other~bbbbbbbb/00000000.1-send"]
        with db.session() as session:
            ids = [i.id for i in session.scalars(select(OutboundItem).order_by(OutboundItem.id))]
        for item_id, owner in zip(ids, owners, strict=False):
            with db.session() as session:
                row = session.get_one(OutboundItem, item_id)
                row.lease_owner, row.lease_expires_at = owner, datetime.now(UTC) + timedelta(hours=1)
        assert release_own_claims(settings, db) == 1
        assert [i.lease_owner for i in items(db)] == [None, sender_owner(identity), owners[2], None]
    finally:
        db.dispose()


def test_retention_leaves_another_nodes_study_and_an_item_being_sent(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    try:
        settings = make_settings(tmp_path, [])
        settings.retention = RetentionSettings(days=1)
        theirs, ours = Spool(tmp_path / "their-spool"), Spool(tmp_path / "our-spool")
        peer = PeerSettings(ae_title="PACS", port=free_port())
        queue_jobs(db, theirs, peer, jobs=1, heatmaps=1)  # results in the other node's spool, delivered
        queue_jobs(db, ours, peer, jobs=1, heatmaps=1)  # ours, one item being sent by another node
        with db.session() as session:
            rows = session.scalars(select(OutboundItem).order_by(OutboundItem.id)).all()
            for row in rows:
                row.status, row.sent_at = OutboundStatus.SENT, T0
            rows[-1].status = OutboundStatus.PENDING
            rows[-1].lease_owner, rows[-1].lease_expires_at = "other~bbbbbbbb/0.1-send", datetime.now(UTC)
            for study in session.scalars(select(Study)):
                study.status, study.last_received_at = "done", T0
        report = run_retention(settings, db, ours.root, now=T0 + timedelta(days=2))
        assert report.studies_deleted == []
        assert len(report.studies_kept_elsewhere) == 1 and len(report.studies_kept_undelivered) == 1
        assert list(theirs.root.rglob("*.dcm")) and list(ours.root.rglob("*.dcm"))
        # The other node (its spool) removes its own study.
        report = run_retention(settings, db, theirs.root, now=T0 + timedelta(days=2))
        assert len(report.studies_deleted) == 1 and not list(theirs.root.rglob("*.dcm"))
    finally:
        db.dispose()


def test_spool_recovery_removes_only_this_writers_temp_files(tmp_path: Path) -> None:
    a, b = Spool(tmp_path / "spool", writer="host~aaaaaaaa"), Spool(tmp_path / "spool", writer="host~bbbbbbbb")
    assert a.id == b.id  # one shared spool, one id
    folder = tmp_path / "spool" / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    mine = folder / f".1.2.3.4.dcm.host~aaaaaaaa@abc{TEMP_SUFFIX}"
    theirs = folder / f".1.2.3.5.dcm.host~bbbbbbbb@def{TEMP_SUFFIX}"
    mine.write_bytes(b"x")
    theirs.write_bytes(b"y")
    assert a.cleanup_temp() == [mine.relative_to(a.root).as_posix()]
    assert theirs.exists()
    stored = b.write_atomic("1.2/1.2.3/1.2.3.6.dcm", b"z")
    assert stored.size == 1 and theirs.exists()


@pytest.mark.parametrize("lease", [10.0])
def test_lease_must_outlast_one_files_send(tmp_path: Path, lease: float) -> None:
    from pydantic import ValidationError

    from node.config import NodeSettings, SendSettings, Settings

    with pytest.raises(ValidationError, match=r"send\.lease_seconds"):
        Settings(
            node=NodeSettings(data_dir=tmp_path, acse_timeout=5, dimse_timeout=5, network_timeout=5),
            send=SendSettings(lease_seconds=lease),
        )


def test_recovery_on_a_shared_spool_leaves_young_unindexed_files(tmp_path: Path, database_url: str) -> None:
    """Another node's store in flight (renamed into the shared spool, its row not committed yet) survives this
    node's start-up recovery; an old unindexed file (a crash of long ago) is removed; another node's temp stays."""
    from node.app import EdgeNode
    from tests.ingest_support import node_settings

    shared = tmp_path / "shared-spool"
    node = EdgeNode(node_settings(tmp_path / "var", node={"spool_dir": str(shared)}, database={"url": database_url}))
    try:
        young = node.spool.write_atomic("1.2/1.2.3/1.2.3.4.dcm", b"in flight on another node")
        old = node.spool.write_atomic("1.2/1.2.3/1.2.3.5.dcm", b"left by a crash long ago")
        long_ago = time.time() - 2 * 3600
        os.utime(node.spool.path(old.relpath), (long_ago, long_ago))
        theirs = shared / "1.2" / "1.2.3" / f".1.2.3.6.dcm.other~bbbbbbbb@abc{TEMP_SUFFIX}"
        theirs.write_bytes(b"another node writing")
        temps, orphans = node.recover_spool()
        assert temps == [] and orphans == [old.relpath]
        assert node.spool.path(young.relpath).exists() and theirs.exists()
        assert not node.spool.path(old.relpath).exists()
    finally:
        node.db.dispose()
