"""The DICOM listener against real peers: dcmtk storescu/echoscu and pynetdicom as senders."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pynetdicom._config
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import func, select

from db.models import AuditEvent, Instance, Series, Study
from node.app import EdgeNode
from node.scp import REJECT_CALLED_AE, REJECT_CALLING_AE, REJECT_LOCAL_LIMIT
from node.spool import SPOOL_ID_FILE
from tests.conftest import DCMTK, peer_env
from tests.dicomgen import make_ct_series, make_dx, write_datasets
from tests.ingest_support import SENDER_AE, dataset_bytes, node_settings, running_node, sender_ae


def storescu(
    port: int, files: list[Path], *extra: str, aet: str = "STORESCU", aec: str = "EDGENODE"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK["storescu"]), "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def audit(node, event_type: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with node.db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)).all())


def instance_count(node) -> int:  # type: ignore[no-untyped-def]
    with node.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def assert_stored_identically(node, files: list[Path]) -> None:  # type: ignore[no-untyped-def]
    """Every file's data set bytes are on disk unchanged, and the index row matches the file."""
    with node.db.session() as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance)).all()}
    for path in files:
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row = rows[sop]
        on_disk = node.spool.path(row.path)
        assert dataset_bytes(on_disk) == dataset_bytes(path)
        assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == row.sha256
        assert on_disk.stat().st_size == row.size_bytes


@pytest.fixture(autouse=True)
def send_files_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are (no decode/re-encode), like a PACS would."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    return write_datasets(make_ct_series(100, 64, 64, patient_id="PAT-SCP", accession="ACC-SCP"), tmp_path / "ct")


@pytest.mark.parametrize("listeners", [1, 2])
def test_ct_series_stored_byte_for_byte_and_resend_is_idempotent(
    tmp_path: Path, ct_files: list[Path], dcmtk, listeners: int
) -> None:
    with running_node(node_settings(tmp_path / "var", node={"listeners": listeners})) as node:
        done = storescu(node.port, ct_files)
        assert done.returncode == 0, done.stderr
        assert instance_count(node) == 100
        assert_stored_identically(node, ct_files)
        with node.db.session() as s:
            study = s.scalars(select(Study)).one()
            series = s.scalars(select(Series)).one()
            assert (study.patient_id, study.accession_number, study.calling_ae) == ("PAT-SCP", "ACC-SCP", "STORESCU")
            assert (series.modality, series.body_part, series.series_number, series.instance_count) == (
                "CT",
                "CHEST",
                1,
                100,
            )
            numbers = sorted(s.scalars(select(Instance.instance_number)).all())
            assert numbers == list(range(1, 101))
            assert {i.transfer_syntax_uid for i in s.scalars(select(Instance))} == {"1.2.840.10008.1.2.1"}
        before = sorted(p for p in node.spool.root.rglob("*") if p.is_file())

        again = storescu(node.port, ct_files)
        assert again.returncode == 0, again.stderr
        assert instance_count(node) == 100
        assert sorted(p for p in node.spool.root.rglob("*") if p.is_file()) == before
        assert len(audit(node, "instance.duplicate")) == 100
        assert len(audit(node, "instance.stored")) == 100
        assert len(audit(node, "association.accepted")) == 2


def test_unknown_ae_wrong_address_and_wrong_called_ae_are_rejected(tmp_path: Path, dcmtk) -> None:
    peers = [{"ae_title": SENDER_AE, "host": "127.0.0.2", "port": 104}]
    with running_node(node_settings(tmp_path / "var", peers=peers)) as node:
        port = node.scp.port
        echo = subprocess.run(
            [str(DCMTK["echoscu"]), "-aet", "STRANGER", "-aec", "EDGENODE", "127.0.0.1", str(port)],
            env=peer_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert echo.returncode != 0
        assert "Calling AE Title Not Recognized" in echo.stdout + echo.stderr

        def rejection(ae_title: str, bind: str, called: str = "EDGENODE") -> tuple[int, int, int] | None:
            assoc = sender_ae(ae_title=ae_title).associate("127.0.0.1", port, ae_title=called, bind_address=(bind, 0))
            if assoc.is_established:
                assert assoc.send_c_echo().Status == 0
                assoc.release()
                return None
            assert assoc.is_rejected
            rsp = assoc.acceptor.primitive
            return int(rsp.result), int(rsp.result_source), int(rsp.diagnostic)

        assert rejection(SENDER_AE, "127.0.0.1") == REJECT_CALLING_AE  # right AE, wrong source address
        assert rejection(SENDER_AE, "127.0.0.2", called="OTHER") == REJECT_CALLED_AE
        assert rejection(SENDER_AE, "127.0.0.2") is None  # right AE from the right address
        reasons = [e.detail for e in audit(node, "association.rejected")]
        assert any("'STRANGER' is not a configured peer" in r for r in reasons)
        assert any("not allowed from 127.0.0.1" in r for r in reasons)
        assert any("called AE 'OTHER'" in r for r in reasons)
        assert len(audit(node, "echo")) == 1


def test_no_peers_means_nobody_may_send(tmp_path: Path, ct_files: list[Path], dcmtk) -> None:
    with running_node(node_settings(tmp_path / "var", peers=[])) as node:
        done = storescu(node.scp.port, ct_files[:1])
        assert done.returncode != 0
        assert instance_count(node) == 0


PROPOSE = {"jpeg-lossless": "-xs", "rle": "-xr", "jpeg-ls": "-xt", "jpeg-2000": "-xv"}


def _compressed(tmp_path: Path, source: Path) -> dict[str, Path]:
    out = {}
    for name, tool, args in [
        ("jpeg-lossless", "dcmcjpeg", ["+e1"]),  # JPEG Lossless, first-order prediction (SV1)
        ("rle", "dcmcrle", []),
        ("jpeg-ls", "dcmcjpls", []),
    ]:
        target = tmp_path / f"{name}.dcm"
        ds = dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        staged = tmp_path / f"{name}-src.dcm"
        ds.save_as(staged, enforce_file_format=True)
        subprocess.run([str(DCMTK[tool]), *args, str(staged), str(target)], check=True, env=peer_env())
        out[name] = target
    ds = dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    out["jpeg-2000"] = tmp_path / "jpeg-2000.dcm"
    ds.save_as(out["jpeg-2000"], enforce_file_format=True)
    return out


def test_compressed_transfer_syntaxes_are_accepted_unchanged(tmp_path: Path, ct_files: list[Path], dcmtk) -> None:
    files = _compressed(tmp_path, ct_files[0])
    syntaxes = {name: str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for name, p in files.items()}
    assert syntaxes == {
        "jpeg-lossless": "1.2.840.10008.1.2.4.70",
        "rle": "1.2.840.10008.1.2.5",
        "jpeg-ls": "1.2.840.10008.1.2.4.80",
        "jpeg-2000": "1.2.840.10008.1.2.4.90",
    }
    with running_node(node_settings(tmp_path / "var")) as node:
        for name, path in files.items():  # storescu proposes (only) each file's own transfer syntax
            done = storescu(node.scp.port, [path], "--required", PROPOSE[name])
            assert done.returncode == 0, done.stdout + done.stderr
        assert_stored_identically(node, list(files.values()))
        with node.db.session() as s:
            assert set(s.scalars(select(Instance.transfer_syntax_uid)).all()) == set(syntaxes.values())
        for path in files.values():  # and they decode to the original pixels
            sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            with node.db.session() as s:
                rel = s.scalars(select(Instance.path).where(Instance.sop_instance_uid == sop)).one()
            assert np.array_equal(dcmread(node.spool.path(rel)).pixel_array, dcmread(ct_files[0]).pixel_array)


def _garbage_files(tmp_path: Path, source: Path) -> dict[str, Path]:
    """Files whose File Meta is fine (so the sender can send them) but whose data set is not."""
    raw = source.read_bytes()
    header_len = len(raw) - len(dataset_bytes(source))
    ds = dcmread(source)
    out = {}
    for name, mutate in [
        ("truncated", lambda body: body[: len(body) - 1000]),
        ("cut-before-pixels", lambda body: body[: body.rfind(b"\xe0\x7f\x10\x00")]),
        ("garbage", lambda body: np.random.default_rng(1).bytes(len(body))),
    ]:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        staged = tmp_path / f"{name}-full.dcm"
        ds.save_as(staged, enforce_file_format=True)
        full = staged.read_bytes()
        out[name] = tmp_path / f"{name}.dcm"
        out[name].write_bytes(full[:header_len] + mutate(full[header_len:]))
    no_study = dcmread(source)
    no_study.SOPInstanceUID = no_study.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del no_study.StudyInstanceUID
    out["no-study-uid"] = tmp_path / "no-study-uid.dcm"
    no_study.save_as(out["no-study-uid"], enforce_file_format=True)
    return out


def test_truncated_or_garbage_data_sets_fail_and_leave_nothing(tmp_path: Path, ct_files: list[Path]) -> None:
    files = _garbage_files(tmp_path, ct_files[0])
    with running_node(node_settings(tmp_path / "var")) as node:
        assoc = sender_ae([ct_files[0]]).associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
        assert assoc.is_established
        statuses = {name: int(assoc.send_c_store(path).Status) for name, path in files.items()}
        assert int(assoc.send_c_store(ct_files[1]).Status) == 0  # the association is still usable
        assoc.release()
        assert statuses == {"truncated": 0xC210, "cut-before-pixels": 0xA900, "garbage": 0xC210, "no-study-uid": 0xA900}
        assert instance_count(node) == 1
        assert len([p for p in node.spool.root.rglob("*") if p.is_file() and p.name != SPOOL_ID_FILE]) == 1
        rejected = audit(node, "instance.rejected")
        assert len(rejected) == 4
        assert all(e.outcome == "failure" and e.sop_instance_uid and e.detail for e in rejected)
        assert {e.dimse_status for e in rejected} == {0xC210, 0xA900}
        assert any("truncated" in e.detail for e in rejected)


def test_full_disk_answers_out_of_resources_and_refuses_associations(tmp_path: Path, ct_files: list[Path]) -> None:
    with running_node(node_settings(tmp_path / "var")) as node:
        assoc = sender_ae([ct_files[0]]).associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
        assert assoc.is_established
        # Simulate a full disk: require more free space than the file system has.
        node.scp.min_free_bytes = node.spool.free_bytes() + 10 * 1024**3
        status = assoc.send_c_store(ct_files[0])
        assoc.release()
        assert int(status.Status) == 0xA700
        assert instance_count(node) == 0
        assert not [p for p in node.spool.root.rglob("*") if p.is_file() and p.name != SPOOL_ID_FILE]
        refused = sender_ae().associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
        assert refused.is_rejected
        rsp = refused.acceptor.primitive
        assert (rsp.result, rsp.result_source, rsp.diagnostic) == REJECT_LOCAL_LIMIT
        node.scp.min_free_bytes = 0  # space is back: storing works again
        assoc = sender_ae([ct_files[0]]).associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
        assert int(assoc.send_c_store(ct_files[0]).Status) == 0
        assoc.release()
        assert instance_count(node) == 1


@pytest.mark.parametrize("listeners", [1, 2])
def test_full_disk_threshold_from_configuration(tmp_path: Path, ct_files: list[Path], dcmtk, listeners: int) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    limits = {"min_free_disk_mb": free_mb + 10240, "listeners": listeners}
    with running_node(node_settings(tmp_path / "var", node=limits)) as node:
        done = storescu(node.port, ct_files[:2])
        assert done.returncode != 0
        assert instance_count(node) == 0
        assert "free disk space" in audit(node, "association.rejected")[0].detail


def test_mismatched_sop_instance_uid_is_refused(tmp_path: Path) -> None:
    dx = make_dx(32, 32)
    with running_node(node_settings(tmp_path / "var")) as node:
        ae = sender_ae()
        ae.add_requested_context(dx.SOPClassUID, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
        assert assoc.is_established
        assert int(assoc.send_c_store(dx).Status) == 0
        # A data set whose SOP Instance UID is not the one in the request (pynetdicom takes it from the data
        # set, so change the data set after encoding by sending a second copy under a new UID in the meta).
        other = make_dx(32, 32)
        path = tmp_path / "mismatch.dcm"
        other.save_as(path, enforce_file_format=True)
        raw = bytearray(path.read_bytes())
        old = str(other.SOPInstanceUID).encode()
        new = generate_uid().encode()[: len(old)].ljust(len(old), b"1")
        meta_end = len(raw) - len(dataset_bytes(path))
        raw[:meta_end] = raw[:meta_end].replace(old, new)
        path.write_bytes(bytes(raw))
        assert int(assoc.send_c_store(path).Status) == 0xA900
        assoc.release()
        assert instance_count(node) == 1


def test_a_store_arriving_while_the_node_drains_is_refused_and_audited(tmp_path: Path, ct_files: list[Path]) -> None:
    with running_node(node_settings(tmp_path / "var")) as node:
        assoc = sender_ae([ct_files[0]]).associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
        assert assoc.is_established
        with node.scp._cond:
            node.scp._draining = True  # what stop() sets once the grace period is over
        status = assoc.send_c_store(ct_files[0])
        assoc.abort()
        assert int(status.Status) == 0xA700 and "shutting down" in str(status.ErrorComment)
        assert instance_count(node) == 0
        (event,) = audit(node, "instance.rejected")
        sop = str(dcmread(ct_files[0], stop_before_pixels=True).SOPInstanceUID)
        assert (event.sop_instance_uid, event.dimse_status, event.calling_ae) == (sop, 0xA700, SENDER_AE)


def test_a_stop_ends_though_an_open_associations_abort_never_returns(
    tmp_path: Path, ct_files: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom's blocking abort has no limit of its own; the stop gives each open association's the ARTIM time
    and a margin, says which peer it left, and ends."""
    node = EdgeNode(node_settings(tmp_path / "var", node={"acse_timeout": 1.0}))
    node.start()
    assoc = sender_ae([ct_files[0]]).associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
    stuck = threading.Event()
    try:
        assert assoc.is_established and int(assoc.send_c_store(ct_files[0]).Status) == 0
        (acceptor,) = [a for a in node.scp.ae.active_associations if a.is_acceptor]
        monkeypatch.setattr(acceptor, "abort", lambda block=True: stuck.wait(120))  # pynetdicom sets it per instance
        stop = threading.Thread(target=node.stop, daemon=True)
        stop.start()
        stop.join(60)
        assert not stop.is_alive(), "the stop waited on an abort without a bound"
        assert "did not end within" in caplog.text and SENDER_AE in caplog.text
        assert instance_count(node) == 1
    finally:
        stuck.set()
        monkeypatch.undo()
        assoc.abort()


def test_a_series_uid_reused_by_another_study_is_refused(tmp_path: Path) -> None:
    first = make_ct_series(2, 32, 32, patient_id="PAT-A")
    second = make_ct_series(2, 32, 32, patient_id="PAT-B", series_uid=str(first[0].SeriesInstanceUID))
    files = write_datasets(first + second, tmp_path / "ct")
    with running_node(node_settings(tmp_path / "var")) as node:
        ae = sender_ae(files)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="EDGENODE")
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
        assoc.release()
        assert statuses == [0, 0, 0xA900, 0xA900]
        assert instance_count(node) == 2
        assert {e.detail for e in audit(node, "instance.rejected")} == {
            "Series Instance UID already belongs to another study"
        }


def test_sequences_nested_absurdly_deep_are_cannot_understand_not_a_crash() -> None:
    import struct

    from node.received import InvalidDataSet, parse_index_fields

    def sequence(inner: bytes) -> bytes:  # (0008,1115) SQ of undefined length holding one item
        return (
            struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + inner
            + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
            + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        )

    body = b""
    for _ in range(2000):
        body = sequence(body)
    with pytest.raises(InvalidDataSet) as caught:
        parse_index_fields(body, "1.2.840.10008.1.2.1")
    assert caught.value.status == 0xC210 and "nested too deeply" in caught.value.reason
