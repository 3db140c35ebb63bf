"""Issue 13, items 1 and 5, against real senders (dcmtk storescu; pynetdicom where the status must be read
exactly): pixel data that does not match its header is refused before Success and leaves nothing behind,
and a SOP Instance UID resent with other content keeps the first copy, is audited as a conflict and is
answered with a warning.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pynetdicom._config
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless
from sqlalchemy import select

from db.models import AuditEvent, Instance, JobStatus
from node.web.app import create_app
from tests.conftest import DCMTK, free_port, peer_env
from tests.dicomgen import make_ct_series, write_datasets
from tests.e2e_support import NODE_AET, PACS_AET, NodeProcess, make_model, wait_for
from tests.ingest_support import dataset_bytes, node_settings, running_node, sender_ae

TOKEN = "integrity-token-0123456789"
REFUSED_A900 = "Received Store Response (Error: DataSetDoesNotMatchSOPClass)"  # how storescu -v shows 0xA900


@pytest.fixture(autouse=True)
def send_files_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are (no decode/re-encode), like a PACS would."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)


def storescu(port: int, files: list[Path], *extra: str, aet: str = "STORESCU") -> str:
    """dcmtk storescu (verbose: it prints each C-STORE response it receives); returns its output."""
    done = subprocess.run(
        [str(DCMTK["storescu"]), "-v", "-aet", aet, "-aec", NODE_AET, *extra, "127.0.0.1", str(port), *map(str, files)],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.stdout + done.stderr


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def sop_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def events(db, event_type: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with db.session() as s:
        found = list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type).order_by(AuditEvent.id)))
        s.expunge_all()
        return found


def indexed(db, sop: str) -> Instance | None:  # type: ignore[no-untyped-def]
    with db.session() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one_or_none()
        s.expunge_all()
        return row


def spool_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if p.is_file())


# --- item 1: pixel data checked against the header ------------------------------------------------------


@pytest.mark.slow
def test_short_pixel_slice_is_refused_and_the_good_series_then_stores_and_is_analysed(tmp_path: Path) -> None:
    series = make_ct_series(8, 64, 64, patient_id="PAT-SHORT", accession="ACC-SHORT")
    study_uid = str(series[0].StudyInstanceUID)
    good = write_datasets(series, tmp_path / "good")
    short = dcmread(good[3])
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]  # half of Rows x Columns x 16 bits
    bad = save(short, tmp_path / "bad" / "short.dcm")
    model = make_model(tmp_path / "tiny.safetensors")
    with NodeProcess(tmp_path / "node", model, pacs_port=free_port()) as node:
        out = storescu(node.port, [bad], aet=PACS_AET)
        assert REFUSED_A900 in out, out
        db = node.database()
        try:
            assert indexed(db, sop_of(bad)) is None
            assert spool_files(node.data_dir) == []  # no spool file, no temp file left either
            assert not [p for p in node.data_dir.rglob("*.part")]

            out = storescu(node.port, good, aet=PACS_AET)
            assert REFUSED_A900 not in out and out.count("Received Store Response (Success)") == 8, out
            assert indexed(db, sop_of(bad)) is not None  # the good copy of the refused UID is stored normally
            jobs = wait_for(
                lambda: [j for j in node.jobs_of_study(study_uid) if j.status in (JobStatus.DONE, JobStatus.FAILED)],
                600,
                "the study's job to finish",
                interval=0.5,
            )
            assert jobs[-1].status == JobStatus.DONE, jobs[-1].error
            (rejected,) = events(db, "instance.rejected")
            assert (rejected.sop_instance_uid, rejected.dimse_status, rejected.outcome) == (
                sop_of(bad),
                0xA900,
                "failure",
            )
            assert rejected.detail == (
                "Pixel Data is 4096 bytes; 64 rows x 64 columns x 1 samples x 16 bits x 1 frame(s)"
                " (MONOCHROME2) need 8192"
            )
            assert len(events(db, "instance.stored")) == 8 and events(db, "instance.duplicate") == []
            with db.session() as s:
                details = " ".join(s.scalars(select(AuditEvent.detail)))
            assert "Synthetic" not in details  # the patient's name is never in the trail
        finally:
            db.dispose()
        assert "Synthetic" not in node.log_text()


@pytest.mark.parametrize("listeners", [1, 2])
def test_an_absurd_size_claim_is_refused_then_the_real_copy_stores(tmp_path: Path, dcmtk, listeners: int) -> None:
    ds = make_ct_series(1, 32, 32)[0]
    real = save(ds, tmp_path / "real.dcm")
    claim = dcmread(real)
    claim.Rows = claim.Columns = 60000
    claim.PixelData = b"\0" * 8
    absurd = save(claim, tmp_path / "absurd.dcm")
    with running_node(node_settings(tmp_path / "var", node={"listeners": listeners})) as node:
        out = storescu(node.port, [absurd])
        assert REFUSED_A900 in out, out
        assert indexed(node.db, sop_of(absurd)) is None and spool_files(node.spool.root) == []
        (rejected,) = events(node.db, "instance.rejected")
        assert rejected.dimse_status == 0xA900 and "60000 rows x 60000 columns" in rejected.detail
        assert rejected.sop_instance_uid == sop_of(absurd)
        out = storescu(node.port, [real])
        assert "Received Store Response (Success)" in out, out
        assert indexed(node.db, sop_of(real)) is not None


def _j2k_multiframe(tmp_path: Path, frames: int, keep: int) -> Path:
    """A 3-frame JPEG 2000 Lossless CT whose encapsulated data holds only `keep` frames (no offset table)."""
    ds = make_ct_series(1, 64, 64)[0]
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([frame] * keep, has_bot=False)
    return save(ds, tmp_path / f"j2k-{keep}-of-{frames}.dcm")


def test_encapsulated_data_missing_frames_is_refused(tmp_path: Path, dcmtk) -> None:
    missing = _j2k_multiframe(tmp_path / "missing", frames=3, keep=2)
    complete = _j2k_multiframe(tmp_path / "complete", frames=3, keep=3)
    with running_node(node_settings(tmp_path / "var")) as node:
        out = storescu(node.scp.port, [missing], "--required", "-xv")  # propose JPEG 2000 Lossless only
        assert REFUSED_A900 in out, out
        (rejected,) = events(node.db, "instance.rejected")
        assert rejected.detail == "encapsulated Pixel Data has 2 fragment(s) for 3 frame(s)"
        assert (rejected.sop_instance_uid, rejected.dimse_status) == (sop_of(missing), 0xA900)
        assert spool_files(node.spool.root) == []
        out = storescu(node.scp.port, [complete], "--required", "-xv")
        assert "Received Store Response (Success)" in out, out
        row = indexed(node.db, sop_of(complete))
        assert row is not None and row.transfer_syntax_uid == JPEG2000Lossless


# --- item 5: same SOP Instance UID, other content -------------------------------------------------------


@pytest.mark.parametrize("listeners", [1, 2])
def test_a_resend_with_other_content_is_a_conflict_answered_with_a_warning(
    tmp_path: Path, dcmtk, listeners: int
) -> None:
    series = make_ct_series(3, 32, 32, patient_id="PAT-CONFLICT", accession="ACC-CONFLICT")
    study_uid = str(series[0].StudyInstanceUID)
    originals = write_datasets(series, tmp_path / "first")
    changed = dcmread(originals[1])
    changed.WindowCenter = 40  # same SOP Instance UID, other content
    changed.PixelData = bytes(len(changed.PixelData))
    other = save(changed, tmp_path / "second" / "changed.dcm")
    sop = sop_of(other)
    first_hash = hashlib.sha256(dataset_bytes(originals[1])).hexdigest()
    other_hash = hashlib.sha256(dataset_bytes(other)).hexdigest()
    settings = node_settings(tmp_path / "var", node={"listeners": listeners}, web={"enabled": False, "token": TOKEN})
    with running_node(settings) as node:
        out = storescu(node.port, originals)
        assert out.count("Received Store Response (Success)") == 3, out
        kept = node.spool.path(indexed(node.db, sop).path)
        kept_bytes = kept.read_bytes()

        out = storescu(node.port, originals)  # an identical resend: plain idempotent success
        assert out.count("Received Store Response (Success)") == 3, out
        assert len(events(node.db, "instance.duplicate")) == 3 and events(node.db, "instance.conflict") == []

        out = storescu(node.port, [other])  # dcmtk shows the warning it received
        assert "Received Store Response (Warning: CoercionOfDataElements)" in out, out
        assoc = sender_ae([other]).associate("127.0.0.1", node.port, ae_title=NODE_AET)
        status = assoc.send_c_store(other)  # and pynetdicom the exact status and comment
        assoc.release()
        assert int(status.Status) == 0xB000
        assert str(status.ErrorComment) == "SOP Instance UID stored with other content; first copy kept"

        assert kept.read_bytes() == kept_bytes  # the first copy is what stays
        conflicts = events(node.db, "instance.conflict")
        assert len(conflicts) == 2
        for event in conflicts:
            assert (event.sop_instance_uid, event.study_instance_uid, event.outcome, event.dimse_status) == (
                sop,
                study_uid,
                "warning",
                0xB000,
            )
            assert f"kept the first copy (sha256 {first_hash})" in event.detail
            assert f"discarded this one (sha256 {other_hash})" in event.detail
        assert len(events(node.db, "instance.duplicate")) == 3  # the conflicts are not counted as duplicates

        client = TestClient(create_app(node.settings, node.db))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        page = client.get(f"/studies/{study_uid}", headers=auth)
        assert page.status_code == 200
        section = page.text[
            page.text.index('id="conflicts"') : page.text.index("</table>", page.text.index('id="conflicts"'))
        ]
        assert "2 resend(s) carried other content" in section
        assert section.count(sop) == 2 and first_hash in section and other_hash in section
        api = client.get(f"/api/studies/{study_uid}", headers=auth).json()
        assert [c["sop_instance_uid"] for c in api["conflicts"]] == [sop, sop]


def test_a_resend_in_another_transfer_syntax_is_a_duplicate_not_a_conflict(tmp_path: Path) -> None:
    ds = make_ct_series(1, 32, 32)[0]
    explicit = save(ds, tmp_path / "explicit.dcm")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = save(ds, tmp_path / "implicit.dcm")
    with running_node(node_settings(tmp_path / "var")) as node:
        assoc = sender_ae([explicit, implicit]).associate("127.0.0.1", node.scp.port, ae_title=NODE_AET)
        assert [int(assoc.send_c_store(p).Status) for p in (explicit, implicit)] == [0, 0]
        assoc.release()
        (duplicate,) = events(node.db, "instance.duplicate")
        assert "1.2.840.10008.1.2.1, this one in 1.2.840.10008.1.2" in duplicate.detail
        assert events(node.db, "instance.conflict") == []
