"""End to end: a real Orthanc (the site's PACS, routing with deploy/orthanc/edgenode-routing.lua) receives a CT
and a DX study from dcmtk's storescu and routes them to `edgenode serve`; the node detects completion, infers
with a tiny model, and sends SEG + SC + SR back. The test finds them under each study through Orthanc's REST
API, and reads the job, its timings and its audit trail through `edgenode worklist|audit --format json`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from db.models import Job, JobStatus
from node.local_orthanc import Orthanc
from tests.dicomgen import make_ct_series, make_dx, make_undecodable, write_datasets
from tests.e2e_support import PACS_AET, NodeProcess, make_model, node_results_in_pacs, routing_pacs, storescu, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # Orthanc -> node -> Orthanc with inference

REQUIRED_AUDIT = {
    "instance.stored",
    "study.complete",
    "job.created",
    "job.started",
    "job.done",
    "result.created",
    "send.ok",
}
SOP_CLASS = {  # result kind -> SOP Class UID the PACS must hold it as
    "seg": "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "sr": "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
}


def delivered_job(node: NodeProcess, study_uid: str) -> Job | None:
    """The study's finished job once its delivery time is recorded (the last result was acknowledged)."""
    done = [j for j in node.jobs_of_study(study_uid) if j.status == JobStatus.DONE and "send" in (j.timings or {})]
    return done[-1] if done else None


def check_study(node: NodeProcess, pacs: Orthanc, study_uid: str, sources: int) -> None:
    job = wait_for(lambda: delivered_job(node, study_uid), 150, f"study {study_uid} processed and delivered")
    assert job.score is not None and job.model_id
    for stage in ("queue_wait", "load", "infer", "encode", "send", "total"):
        assert job.timings[stage] >= 0.0, stage

    detail = node.cli_json("audit", "--study-uid", study_uid, "--limit", "0")
    types = [row["event_type"] for row in detail]
    assert set(types) >= REQUIRED_AUDIT, REQUIRED_AUDIT - set(types)
    stored = [row for row in detail if row["event_type"] == "instance.stored"]
    assert len(stored) == sources
    assert {row["calling_ae"] for row in stored} == {PACS_AET}  # Orthanc routed them, calling as itself
    created = {row["sop_instance_uid"] for row in detail if row["event_type"] == "result.created"}
    sent = [row["sop_instance_uid"] for row in detail if row["event_type"] == "send.ok"]
    assert sorted(sent) == sorted(created)
    assert {row["called_ae"] for row in detail if row["event_type"] == "send.ok"} == {PACS_AET}
    assert types.index("study.complete") < types.index("job.created") < types.index("job.started")
    assert types.index("job.started") < types.index("job.done")

    (row,) = [r for r in node.cli_json("worklist", "--limit", "0") if r["study_instance_uid"] == study_uid]
    assert row["status"] == "done" and row["job_status"] == "done" and row["job_id"] == job.id
    assert row["score"] == pytest.approx(job.score)
    assert row["results_count"] == len(created) and row["delivery"] == "sent"

    # From the PACS's side: every result is filed under the source study, once, as the right object.
    in_pacs = node_results_in_pacs(pacs, study_uid)
    uids = [uid for series in in_pacs for uid in series["sop_instance_uids"]]
    assert sorted(uids) == sorted(created)
    modalities = {series["modality"] for series in in_pacs}
    assert {"SEG", "SR"} <= modalities and len(modalities) == 3  # SEG, SR and the heatmaps' series
    db = node.database()
    try:
        with db.session() as session:
            results = session.get(Job, job.id).results
            kinds = {r.kind: r.sop_class_uid for r in results}
            for result in results:
                (found,) = pacs.post("/tools/lookup", result.sop_instance_uid.encode())
                tags = pacs.get(f"/instances/{found['ID']}/simplified-tags")
                assert tags["SOPClassUID"] == result.sop_class_uid
                assert tags["StudyInstanceUID"] == study_uid
    finally:
        db.dispose()
    assert set(kinds) == {"seg", "sc", "sr"}
    for kind, sop_class in SOP_CLASS.items():
        assert kinds[kind] == sop_class


def test_pacs_routes_ct_and_dx_through_the_node_and_gets_results_back(tmp_path: Path) -> None:
    model = make_model(tmp_path / "tiny.safetensors")
    ct = make_ct_series(6, 64, 64, patient_id="E2E-CT", accession="E2ECT")
    dx = make_dx(96, 96, patient_id="E2E-DX", accession="E2EDX", monochrome1=True)
    ct_files = write_datasets(ct, tmp_path / "ct")
    dx_files = write_datasets([dx], tmp_path / "dx")

    node = NodeProcess(tmp_path / "node", model, pacs_port=0, sections={"results": {"empty_seg": True}})
    with routing_pacs(tmp_path / "pacs", node.port) as pacs:
        node.pacs_port = pacs.dicom_port
        with node:
            storescu(pacs.dicom_port, ct_files)
            storescu(pacs.dicom_port, dx_files)
            check_study(node, pacs, ct[0].StudyInstanceUID, len(ct_files))
            check_study(node, pacs, dx.StudyInstanceUID, 1)
            # The results were not routed back to the node: it holds only the originals.
            events = node.cli_json("audit", "--event-type", "instance.stored", "--limit", "0")
            assert len(events) == len(ct_files) + 1
        assert node.proc is not None and node.proc.returncode == 0  # SIGTERM: a clean stop


def test_an_undecodable_instance_is_left_out_and_the_report_in_the_pacs_names_it(tmp_path: Path) -> None:
    """One CT slice whose compressed frame is damaged (well formed: the listener stores it) goes through Orthanc
    and the node with its series; the rest is analysed, and the SR and SEG that reach the PACS show it."""
    import urllib.request

    import pydicom

    from tests.test_results import dciodvfy_errors, not_analysed_texts

    model = make_model(tmp_path / "tiny.safetensors")
    ct = make_ct_series(6, 64, 64, patient_id="E2E-BAD", accession="E2EBAD")
    make_undecodable(ct[2])
    files = write_datasets(ct, tmp_path / "ct")
    study_uid, bad_uid = ct[0].StudyInstanceUID, ct[2].SOPInstanceUID

    node = NodeProcess(tmp_path / "node", model, pacs_port=0, sections={"results": {"empty_seg": True}})
    with routing_pacs(tmp_path / "pacs", node.port) as pacs:
        node.pacs_port = pacs.dicom_port
        with node:
            storescu(pacs.dicom_port, files, options=["-xr"])  # the damaged RLE slice travels as it is
            check_study(node, pacs, study_uid, len(files))
            skipped = node.cli_json("audit", "--event-type", "instance.skipped", "--limit", "0")
            assert [(r["sop_instance_uid"], r["outcome"]) for r in skipped] == [(bad_uid, "warning")]
            assert "pixel data cannot be decoded" in skipped[0]["detail"]

            def from_pacs(sop_uid: str, folder: Path) -> Path:
                (found,) = pacs.post("/tools/lookup", sop_uid.encode())
                with urllib.request.urlopen(f"{pacs.url}/instances/{found['ID']}/file", timeout=30) as response:
                    path = folder / f"{sop_uid}.dcm"
                    path.write_bytes(response.read())
                return path

            (tmp_path / "from-pacs").mkdir()
            db = node.database()
            try:
                with db.session() as session:
                    job = session.get(Job, delivered_job(node, study_uid).id)
                    kinds = {r.sop_instance_uid: r.kind for r in job.results}
            finally:
                db.dispose()
            (sr_uid,) = [uid for uid, kind in kinds.items() if kind == "sr"]
            (seg_uid,) = [uid for uid, kind in kinds.items() if kind == "seg"]
            sr_path = from_pacs(sr_uid, tmp_path / "from-pacs")
            assert dciodvfy_errors(sr_path) == []
            assert not_analysed_texts(sr_path) == [f"SOP Instance {bad_uid}: pixel data cannot be decoded"]
            seg = pydicom.dcmread(from_pacs(seg_uid, tmp_path / "from-pacs"))
            referenced = {
                str(item.ReferencedSOPInstanceUID)
                for series in seg.ReferencedSeriesSequence
                for item in series.ReferencedInstanceSequence
            }
            assert referenced == {str(ds.SOPInstanceUID) for ds in ct} - {bad_uid}
        assert node.proc is not None and node.proc.returncode == 0


def test_without_a_radiograph_model_the_dx_series_is_skipped_and_nothing_is_sent_for_it(tmp_path: Path) -> None:
    """The node's default: one model (CT-only) for every modality. A study with a CT series and a DX image goes
    through Orthanc and the node: the CT series' results reach the PACS; the DX image is audited as skipped ("no
    model trained for DX") and no object made from it is created or sent."""
    from sqlalchemy import select

    from db.models import Result

    model = make_model(tmp_path / "tiny.safetensors")
    ct = make_ct_series(6, 64, 64, patient_id="E2E-MIX", accession="E2EMIX")
    dx = make_dx(96, 96, study_uid=ct[0].StudyInstanceUID, patient_id="E2E-MIX", accession="E2EMIX")
    files = write_datasets([*ct, dx], tmp_path / "study")
    study_uid = ct[0].StudyInstanceUID

    node = NodeProcess(tmp_path / "node", model, pacs_port=0, radiograph_model=False)
    with routing_pacs(tmp_path / "pacs", node.port) as pacs:
        node.pacs_port = pacs.dicom_port
        with node:
            storescu(pacs.dicom_port, files)
            job = wait_for(lambda: delivered_job(node, study_uid), 150, "the study processed and delivered")
            skipped = node.cli_json("audit", "--event-type", "series.skipped", "--limit", "0")
            assert [e["series_instance_uid"] for e in skipped] == [dx.SeriesInstanceUID]
            assert "no model trained for DX" in skipped[0]["detail"] and skipped[0]["job_id"] == job.id
            db = node.database()
            try:
                with db.session() as session:
                    sources = set(session.scalars(select(Result.source_series_instance_uid)).all())
                    created = set(session.scalars(select(Result.sop_instance_uid)).all())
            finally:
                db.dispose()
            assert sources == {ct[0].SeriesInstanceUID}
            in_pacs = [uid for series in node_results_in_pacs(pacs, study_uid) for uid in series["sop_instance_uids"]]
            assert created and sorted(in_pacs) == sorted(created)  # the CT series' results, and nothing else
