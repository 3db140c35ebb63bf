"""The outbound queue against real peers: dcmtk storescp, Orthanc, a closed port, and a restart in between."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage, SegmentationStorage
from sqlalchemy import func, select

from db.models import AuditEvent, Job, OutboundItem, OutboundStatus, Study
from db.outbound import Backoff, list_items
from db.session import Database
from node.config import NodeSettings, PeerSettings, ResultsSettings, SendSettings, Settings, settings_to_toml
from node.local_orthanc import Orthanc
from node.outbound import enqueue, retry_dead, send_due
from node.results import ResultObject, write_results
from node.spool import Spool
from tests.conftest import edgenode_cmd, node_env
from tests.dicomgen import make_ct_series
from tests.peers import StoreSCP
from tests.ports import free_port
from tests.test_results import MODEL, ct_result

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def make_settings(tmp_path: Path, peers: list[PeerSettings], **send: float) -> Settings:
    return Settings(
        node=NodeSettings(data_dir=tmp_path / "var", acse_timeout=5, dimse_timeout=10, network_timeout=10),
        peers=peers,
        send=SendSettings(**send),
    )


def make_job(db: Database, sources: list[pydicom.Dataset], destination: str) -> int:
    with db.session() as session:
        study = Study(
            study_instance_uid=str(sources[0].StudyInstanceUID),
            patient_id=str(sources[0].PatientID),
            accession_number=str(sources[0].AccessionNumber),
        )
        job = Job(study=study, destination_ae=destination, status="done")
        session.add(job)
        session.flush()
        return job.id


def ct_objects(n_slices: int = 6, heatmaps: int = 2) -> tuple[list[pydicom.Dataset], list[ResultObject]]:
    sources = make_ct_series(n_slices, 32, 32)
    objects = write_results(ct_result(sources), sources, "job-1", ResultsSettings(heatmap_slices=heatmaps), MODEL)
    return sources, objects


def audit_count(db: Database, event_type: str) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).where(AuditEvent.event_type == event_type)) or 0)


def items(db: Database) -> list[OutboundItem]:
    with db.session() as session:
        return list(session.scalars(select(OutboundItem).order_by(OutboundItem.id)).all())


@pytest.fixture
def node_db(tmp_path: Path, database_url: str) -> Iterator[tuple[Database, Spool]]:
    """The queue's database (SQLite, and a real PostgreSQL) and the node's spool."""
    db = Database(database_url)
    yield db, Spool(tmp_path / "var" / "spool")
    db.dispose()


def test_backoff_doubles_from_initial_and_is_capped() -> None:
    backoff = Backoff(initial_seconds=30, max_seconds=600, max_attempts=20)
    assert [backoff.delay(n).total_seconds() for n in range(1, 8)] == [30, 60, 120, 240, 480, 600, 600]


def test_delivers_to_storescp_and_keeps_files(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    db, spool = node_db
    sources, objects = ct_objects()
    with StoreSCP(tmp_path / "storescp") as scp:
        peer = PeerSettings(ae_title="STORESCP", port=scp.port)
        settings = make_settings(tmp_path, [peer])
        ids = enqueue(db, spool, make_job(db, sources, "STORESCP"), objects, peer)
        report = send_due(settings, db, spool)
        assert sorted(report.sent) == sorted(ids) and not report.retried and not report.dead
        received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in scp.received()}
    assert received == {str(o.dataset.SOPInstanceUID) for o in objects}
    assert all(item.status == OutboundStatus.SENT and item.last_status == 0 for item in items(db))
    assert audit_count(db, "result.created") == len(objects) and audit_count(db, "send.ok") == len(objects)
    with db.session() as session:
        assert {r["status"] for r in list_items(session)} == {"sent"}
    for obj in objects:  # nothing deleted after the ack: that is retention's job
        ds = obj.dataset
        path = spool.path(f"results/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm")
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert send_due(settings, db, spool).attempted == 0  # nothing sent twice


def orthanc_sop_classes(orthanc: Orthanc, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of everything Orthanc files under the study."""
    found = {}
    for instance in orthanc.instances_of_study(study_uid):
        tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        found[tags["SOPInstanceUID"]] = tags["SOPClassUID"]
    return found


def test_orthanc_files_seg_sc_and_sr_under_the_source_study(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    db, spool = node_db
    sources, objects = ct_objects()
    with Orthanc(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port()) as orthanc:
        for ds in sources:  # the PACS already holds the study the node analysed
            path = tmp_path / "src.dcm"
            ds.save_as(path, enforce_file_format=True)
            orthanc.post("/instances", path.read_bytes())
        peer = PeerSettings(ae_title="ORTHANC", port=orthanc.dicom_port)
        enqueue(db, spool, make_job(db, sources, "ORTHANC"), objects, peer)
        report = send_due(make_settings(tmp_path, [peer]), db, spool)
        assert len(report.sent) == len(objects)
        held = orthanc_sop_classes(orthanc, str(sources[0].StudyInstanceUID))
        instances = orthanc.instances_of_study(str(sources[0].StudyInstanceUID))
        studies = {orthanc.get(f"/series/{i['ParentSeries']}")["ParentStudy"] for i in instances}
    assert len(studies) == 1  # one Orthanc study (same patient + study): the results sit beside the images
    assert len(held) == len(sources) + len(objects)
    classes = [held[str(o.dataset.SOPInstanceUID)] for o in objects]
    assert classes.count(SegmentationStorage) == 1
    assert classes.count(SecondaryCaptureImageStorage) == 2
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.34") == 1  # Comprehensive 3D SR


def test_dead_pacs_backoff_then_restart_delivers_each_object_once(
    tmp_path: Path, node_db: tuple[Database, Spool]
) -> None:
    db, spool = node_db
    sources, objects = ct_objects()
    port = free_port()  # nothing listens here yet: the PACS is down
    peer = PeerSettings(ae_title="ORTHANC", port=port)
    settings = make_settings(tmp_path, [peer], initial_backoff_seconds=30, max_backoff_seconds=100, max_attempts=10)
    enqueue(db, spool, make_job(db, sources, "ORTHANC"), objects, peer, now=T0)

    now, expected_delay = T0, 30
    for attempt in range(1, 5):
        began = time.monotonic()
        report = send_due(settings, db, spool, now=now)
        took = timedelta(seconds=time.monotonic() - began)
        assert len(report.retried) == len(objects) and not report.sent
        for item in items(db):
            assert item.attempts == attempt and item.status == OutboundStatus.PENDING
            assert "cannot connect" in item.last_error or "aborted" in item.last_error
            # counted from the attempt, which was somewhere in this pass
            assert now + timedelta(seconds=expected_delay) <= item.next_attempt_at.replace(tzinfo=UTC)
            assert item.next_attempt_at.replace(tzinfo=UTC) <= now + timedelta(seconds=expected_delay) + took
        assert send_due(settings, db, spool, now=now + timedelta(seconds=expected_delay - 1)).attempted == 0
        now = max(item.next_attempt_at.replace(tzinfo=UTC) for item in items(db))
        expected_delay = min(expected_delay * 2, 100)
    assert audit_count(db, "send.retry") == 4 * len(objects)

    # Restart: the node's objects go away; new ones over the same database file and spool folder.
    db.dispose()
    db2 = Database(db.url)
    spool2 = Spool(spool.root)
    try:
        with Orthanc(tmp_path / "orthanc", dicom_port=port, http_port=free_port()) as orthanc:
            report = send_due(settings, db2, spool2, now=now)
            assert len(report.sent) == len(objects)
            assert send_due(settings, db2, spool2, now=now + timedelta(hours=1)).attempted == 0
            study_uid = str(sources[0].StudyInstanceUID)
            first = orthanc_sop_classes(orthanc, study_uid)
            assert set(first) == {str(o.dataset.SOPInstanceUID) for o in objects}

            # The job runs again (same job key): identical UIDs, queued and sent once more, still one copy each.
            _, again = ct_objects()
            enqueue(db2, spool2, items_job_id(db2), again, peer, now=now)
            assert len(send_due(settings, db2, spool2, now=now).sent) == len(objects)
            assert orthanc_sop_classes(orthanc, study_uid) == first
            assert len(orthanc.instances_of_study(study_uid)) == len(objects)
    finally:
        db2.dispose()


def items_job_id(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(Job.id)) or 0)


class StatusSCP:
    """A pynetdicom Storage SCP answering a chosen status per SOP class; records the proposed contexts."""

    def __init__(self, statuses: dict[str, int]) -> None:
        self.statuses = statuses
        self.proposed: list[set[tuple[str, str]]] = []
        self.received: list[str] = []
        self.port = free_port()
        self.ae = AE(ae_title="STATUSSCP")
        self.ae.supported_contexts = AllStoragePresentationContexts

    def _on_request(self, event: evt.Event) -> None:
        contexts = event.assoc.requestor.requested_contexts
        self.proposed.append({(str(cx.abstract_syntax), str(ts)) for cx in contexts for ts in cx.transfer_syntax})

    def _on_store(self, event: evt.Event) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.statuses.get(sop_class, 0x0000)

    def __enter__(self) -> StatusSCP:
        handlers = [(evt.EVT_REQUESTED, self._on_request), (evt.EVT_C_STORE, self._on_store)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_warning_accepted_failure_retried_and_only_needed_contexts(
    tmp_path: Path, node_db: tuple[Database, Spool]
) -> None:
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=2)
    statuses = {SegmentationStorage: 0xB007, SecondaryCaptureImageStorage: 0xA700}  # SR: success
    with StatusSCP(statuses) as scp:
        peer = PeerSettings(ae_title="STATUSSCP", port=scp.port)
        settings = make_settings(tmp_path, [peer], initial_backoff_seconds=5)
        enqueue(db, spool, make_job(db, sources, "STATUSSCP"), objects, peer, now=T0)
        report = send_due(settings, db, spool, now=T0)
    assert len(report.sent) == 2 and len(report.retried) == 2  # SEG (warning) + SR sent; two SCs out of resources
    assert len(scp.proposed) == 1  # one association for the destination
    explicit_le, implicit_le = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    classes = {str(o.dataset.SOPClassUID) for o in objects}  # only the classes needed, in the file's syntax and
    assert scp.proposed[0] == {(c, ts) for c in classes for ts in (explicit_le, implicit_le)}  # the fallback one
    by_class = {}
    with db.session() as session:
        for item in session.scalars(select(OutboundItem)).all():
            by_class.setdefault(item.result.sop_class_uid, []).append((item.status, item.last_status))
    assert by_class[SegmentationStorage] == [(OutboundStatus.SENT, 0xB007)]
    assert by_class[SecondaryCaptureImageStorage] == [(OutboundStatus.PENDING, 0xA700)] * 2
    with db.session() as session:
        warning = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "send.ok")).all()
    assert sorted(e.outcome for e in warning) == ["success", "warning"]


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_dead_letter_then_cli_list_and_retry(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=1)
    peer = PeerSettings(ae_title="PACS", port=free_port())
    settings = make_settings(tmp_path, [peer], initial_backoff_seconds=1, max_attempts=2)
    enqueue(db, spool, make_job(db, sources, "PACS"), objects, peer, now=T0)
    assert len(send_due(settings, db, spool, now=T0).retried) == len(objects)
    report = send_due(settings, db, spool, now=max(i.next_attempt_at.replace(tzinfo=UTC) for i in items(db)))
    assert len(report.dead) == len(objects)
    assert audit_count(db, "send.dead") == len(objects)
    assert send_due(settings, db, spool, now=T0 + timedelta(days=1)).attempted == 0  # dead items rest

    config = tmp_path / "edgenode.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[database]\nurl = "{db.url}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            edgenode_cmd("outbound", *args, "--config", str(config)),
            env=node_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    listed = cli("list", "--status", "dead", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == len(objects) and all(r["status"] == "dead" and r["attempts"] == 2 for r in rows)
    assert cli("retry").returncode == 2  # neither --id nor --all-dead
    one = cli("retry", "--id", str(rows[0]["id"]))
    assert one.returncode == 0 and "requeued 1" in one.stdout
    assert cli("retry", "--id", str(rows[0]["id"])).returncode == 1  # no longer dead
    rest = cli("retry", "--all-dead")
    assert rest.returncode == 0 and f"requeued {len(objects) - 1}" in rest.stdout
    assert {i.status for i in items(db)} == {OutboundStatus.PENDING}
    assert all(i.attempts == 0 for i in items(db))
    assert audit_count(db, "send.requeued") == len(objects)
    table = cli("list")
    assert table.returncode == 0 and "pending" in table.stdout


def test_missing_spool_file_goes_dead_at_once(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=1)
    peer = PeerSettings(ae_title="PACS", port=free_port())
    enqueue(db, spool, make_job(db, sources, "PACS"), objects[:1], peer, now=T0)
    ds = objects[0].dataset
    spool.delete(f"results/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm")
    report = send_due(make_settings(tmp_path, [peer]), db, spool, now=T0)
    assert len(report.dead) == 1
    (item,) = items(db)
    assert item.status == OutboundStatus.DEAD and "unreadable" in item.last_error
    assert retry_dead(db) == [item.id]


def test_a_damaged_result_file_goes_dead_and_the_rest_are_delivered(
    tmp_path: Path, node_db: tuple[Database, Spool]
) -> None:
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=2)
    with StoreSCP(tmp_path / "storescp") as scp:
        peer = PeerSettings(ae_title="STORESCP", port=scp.port)
        enqueue(db, spool, make_job(db, sources, "STORESCP"), objects, peer, now=T0)
        ds = objects[0].dataset  # the first item's file, truncated by a disk fault, say
        spool.path(f"results/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm").write_bytes(b"")
        report = send_due(make_settings(tmp_path, [peer]), db, spool, now=T0)
        assert (report.dead, len(report.sent)) == ([items(db)[0].id], len(objects) - 1)
        assert len(scp.received()) == len(objects) - 1
    assert "unreadable" in items(db)[0].last_error


@pytest.mark.slow
def test_restart_as_a_real_process(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    """`edgenode outbound send` in fresh processes: fails while the peer is down, delivers once it is up."""
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=1)
    port = free_port()
    peer = PeerSettings(ae_title="STORESCP", port=port)
    enqueue(db, spool, make_job(db, sources, "STORESCP"), objects, peer)
    config = tmp_path / "edgenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n[database]\nurl = "{db.url}"\n'
        "[send]\ninitial_backoff_seconds = 0.2\n"
        f'[[peers]]\nae_title = "STORESCP"\nport = {port}\n'
    )
    command = edgenode_cmd("outbound", "send", "--config", str(config))
    down = subprocess.run(command, env=node_env(), capture_output=True, text=True, timeout=60, check=False)
    assert down.returncode == 1 and f"to retry {len(objects)}" in down.stdout, down.stderr
    with StoreSCP(tmp_path / "storescp", port=port) as scp:
        deadline = time.monotonic() + 30
        while True:  # the backoff (0.2 s) must pass before the items are due again
            up = subprocess.run(command, env=node_env(), capture_output=True, text=True, timeout=60, check=False)
            if f"sent {len(objects)}" in up.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert up.returncode == 0, up.stdout + up.stderr
        again = subprocess.run(command, env=node_env(), capture_output=True, text=True, timeout=60, check=False)
        assert "sent 0" in again.stdout
        received = [str(pydicom.dcmread(p).SOPInstanceUID) for p in scp.received()]
    assert sorted(received) == sorted(str(o.dataset.SOPInstanceUID) for o in objects)  # each exactly once


def test_queued_items_follow_a_corrected_peer_address(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=1)
    wrong = PeerSettings(ae_title="STORESCP", port=free_port())  # the address when the job ran
    enqueue(db, spool, make_job(db, sources, "STORESCP"), objects, wrong, now=T0)
    with StoreSCP(tmp_path / "storescp") as scp:
        fixed = make_settings(tmp_path, [PeerSettings(ae_title="STORESCP", port=scp.port)])
        assert len(send_due(fixed, db, spool, now=T0).sent) == len(objects)
        assert len(scp.received()) == len(objects)


def test_a_peer_removed_from_the_config_gets_nothing_and_its_items_wait(
    tmp_path: Path, node_db: tuple[Database, Spool]
) -> None:
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=1)
    with StoreSCP(tmp_path / "storescp") as scp:
        peer = PeerSettings(ae_title="STORESCP", port=scp.port)  # listening at the recorded address
        enqueue(db, spool, make_job(db, sources, "STORESCP"), objects, peer, now=T0)
        report = send_due(make_settings(tmp_path, []), db, spool, now=T0)
        assert (report.sent, len(report.retried)) == ([], len(objects))
        assert scp.received() == []  # no results to an AE that is no longer trusted
    assert all(
        i.status == OutboundStatus.PENDING and i.attempts == 1 and "no longer in [[peers]]" in i.last_error
        for i in items(db)
    )


@pytest.mark.slow
def test_sender_killed_mid_send_loses_nothing(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    """SIGKILL the sending process while a slow storescp is receiving; a new process finishes the job.

    Only the object in flight at the kill can arrive twice (acknowledged but not yet committed); the
    peer gets it with the same SOP Instance UID. Everything committed as sent is never sent again.
    """
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=3)
    peer = PeerSettings(ae_title="STORESCP", port=free_port())
    enqueue(db, spool, make_job(db, sources, "STORESCP"), objects, peer)
    config = tmp_path / "edgenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n[database]\nurl = "{db.url}"\n'
        f'[[peers]]\nae_title = "STORESCP"\nport = {peer.port}\n'
    )
    command = edgenode_cmd("outbound", "send", "--config", str(config))
    slow = ["--sleep-after", "1", "--unique-filenames"]
    with StoreSCP(tmp_path / "storescp", port=peer.port, extra_args=slow) as scp:
        sender = subprocess.Popen(command, env=node_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(scp.received()) < 2 and sender.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        sender.kill()
        sender.wait()
        with db.session() as session:
            committed = set(session.scalars(select(OutboundItem.id).where(OutboundItem.status == "sent")).all())
        assert len(committed) < len(objects), "the sender finished before it could be killed"
        done = subprocess.run(command, env=node_env(), capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        received = [str(pydicom.dcmread(p).SOPInstanceUID) for p in scp.received()]
    assert set(received) == {str(o.dataset.SOPInstanceUID) for o in objects}
    assert len(received) - len(set(received)) <= 1  # at most the one in flight at the kill
    assert {i.status for i in items(db)} == {OutboundStatus.SENT}
    assert audit_count(db, "send.ok") == len(objects)  # one acknowledgement recorded per item


def test_peer_aborting_the_association_is_retried(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    """storescp aborts on the first C-STORE: that item lost an attempt; the others were never sent, so they keep
    their count and stay due, and the next pass (the peer mended) delivers everything."""
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=1)
    with StoreSCP(tmp_path / "storescp", extra_args=["--abort-after"]) as scp:
        peer = PeerSettings(ae_title="STORESCP", port=scp.port)
        enqueue(db, spool, make_job(db, sources, "STORESCP"), objects, peer, now=T0)
        settings = make_settings(tmp_path, [peer])
        report = send_due(settings, db, spool, now=T0)
    assert not report.sent and not report.dead and len(report.retried) == 1
    assert len(report.untried) == len(objects) - 1 and report.attempted == 1
    first, *rest = items(db)
    assert first.id == report.retried[0] and first.attempts == 1 and "no response" in first.last_error
    assert first.next_attempt_at.replace(tzinfo=UTC) > T0
    assert all(i.status == OutboundStatus.PENDING and i.attempts == 0 and i.last_error == "" for i in rest)
    assert all(i.next_attempt_at.replace(tzinfo=UTC) == T0 for i in rest)  # still due: the next pass sends them
    assert audit_count(db, "send.retry") == 1

    with StoreSCP(tmp_path / "storescp-mended", port=scp.port) as mended:
        assert len(send_due(settings, db, spool, now=T0).sent) == len(objects) - 1
        report = send_due(settings, db, spool, now=first.next_attempt_at.replace(tzinfo=UTC))
        assert report.sent == [first.id]
        assert len(mended.received()) == len(objects)


def test_next_attempt_counts_from_the_attempt_not_the_start_of_the_pass(
    tmp_path: Path, node_db: tuple[Database, Spool]
) -> None:
    """A pass that waits on a slow PACS: storescp sleeps 3 s inside the C-STORE, the node gives up after its 1 s
    DIMSE timeout. That item, and the items of a second destination tried after it, fail at least 1 s into the
    pass; their next attempt is the backoff after that, not after the pass began."""
    db, spool = node_db
    sources, objects = ct_objects(heatmaps=1)
    with StoreSCP(tmp_path / "slow", aet="ASLOW", extra_args=["--sleep-during", "3"]) as slow:
        slow_peer = PeerSettings(ae_title="ASLOW", port=slow.port)
        down_peer = PeerSettings(ae_title="BDOWN", port=free_port())  # sorted after ASLOW: tried second
        settings = Settings(
            node=NodeSettings(data_dir=tmp_path / "var", acse_timeout=5, dimse_timeout=1, network_timeout=5),
            peers=[slow_peer, down_peer],
            send=SendSettings(initial_backoff_seconds=30),
        )
        enqueue(db, spool, make_job(db, sources, "ASLOW"), objects[:1], slow_peer, now=T0)
        enqueue(db, spool, items_job_id(db), objects[1:2], down_peer, now=T0)
        report = send_due(settings, db, spool, now=T0)
    assert sorted(report.retried) == [i.id for i in items(db)] and not report.sent
    for item in items(db):
        assert item.attempts == 1
        waited = item.next_attempt_at.replace(tzinfo=UTC) - (T0 + timedelta(seconds=30))
        assert waited >= timedelta(seconds=settings.node.dimse_timeout), (item.destination_ae, item.last_error)


@pytest.mark.slow
def test_retry_all_sends_everything_now_once_the_pacs_is_back(tmp_path: Path, node_db: tuple[Database, Spool]) -> None:
    """The PACS is down: one job's results dead-lettered, another's waiting out a 10-minute backoff. The operator
    mends the PACS; `edgenode outbound send` alone sends nothing (nothing is due), `outbound retry --all` makes
    every unsent item due now and `outbound send` delivers them all, once each."""
    db, spool = node_db
    port = free_port()
    peer = PeerSettings(ae_title="PACS", port=port)
    sources, objects = ct_objects(heatmaps=1)
    later_sources, later = ct_objects(heatmaps=1)
    enqueue(db, spool, make_job(db, sources, "PACS"), objects, peer)
    dead = send_due(make_settings(tmp_path, [peer], max_attempts=1), db, spool)
    assert len(dead.dead) == len(objects)
    enqueue(db, spool, make_job(db, later_sources, "PACS"), later, peer)
    waiting = send_due(make_settings(tmp_path, [peer], initial_backoff_seconds=600), db, spool)
    assert len(waiting.retried) == len(later)

    settings = make_settings(tmp_path, [peer], initial_backoff_seconds=600)
    config = tmp_path / "edgenode.toml"
    settings.database.url = db.url
    config.write_text(settings_to_toml(settings))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            edgenode_cmd("outbound", *args, "--config", str(config)),
            env=node_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    with StoreSCP(tmp_path / "pacs", aet="PACS", port=port) as pacs:
        assert cli("send").stdout.strip() == "sent 0, to retry 0, dead 0"
        assert cli("retry", "--all", "--all-dead").returncode == 2
        retried = cli("retry", "--all")
        assert retried.returncode == 0 and f"requeued {len(objects) + len(later)} item(s)" in retried.stdout
        assert all(i.status == OutboundStatus.PENDING and i.attempts == 0 for i in items(db))
        sent = cli("send")
        assert sent.returncode == 0 and sent.stdout.strip() == f"sent {len(objects) + len(later)}, to retry 0, dead 0"
        received = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in pacs.received())
    assert received == sorted(str(o.dataset.SOPInstanceUID) for o in [*objects, *later])
    assert {i.status for i in items(db)} == {OutboundStatus.SENT}
    assert audit_count(db, "send.requeued") == len(objects) + len(later)


def test_a_pass_stops_after_pass_items_and_the_next_pass_sends_the_rest(
    tmp_path: Path, node_db: tuple[Database, Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ids a pass has tried are left out of its later claims (NOT IN): a pass is bounded so that list never
    nears SQLite's parameter limit; what it leaves is due for the next pass, nothing is lost or sent twice."""
    import node.outbound

    db, spool = node_db
    sources, objects = ct_objects(heatmaps=2)  # SEG, 2 heatmaps, SR
    monkeypatch.setattr(node.outbound, "CLAIM_BATCH", 2)
    monkeypatch.setattr(node.outbound, "PASS_ITEMS", 1)
    with StoreSCP(tmp_path / "storescp") as scp:
        peer = PeerSettings(ae_title="STORESCP", port=scp.port)
        settings = make_settings(tmp_path, [peer])
        ids = enqueue(db, spool, make_job(db, sources, "STORESCP"), objects, peer)
        first = send_due(settings, db, spool)
        second = send_due(settings, db, spool)
        assert len(first.sent) == 2 and len(second.sent) == 2  # one batch of CLAIM_BATCH per pass
        assert sorted(first.sent + second.sent) == sorted(ids)
        assert send_due(settings, db, spool).attempted == 0
        assert len(scp.received()) == len(objects)
