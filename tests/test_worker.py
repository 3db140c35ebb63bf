"""A worker running real jobs (tiny U-Net, real spool, SQLite and result writers): which series it analyses,
what it does with one it cannot, and that a job taken away from it mid-way queues nothing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.ingest import IngestIndex, InstanceRecord
from db.models import AuditEvent, Job, JobStatus, OutboundItem, Result, Study
from db.session import Database
from node.config import Settings
from node.spool import Spool
from node.worker import JobRunner
from tests.dicomgen import make_ct_series, make_undecodable
from tests.engine_models import saved_unet
from tests.ingest_support import node_settings
from tests.radiograph_model import per_modality


def received_study(
    tmp_path: Path, datasets: list[Dataset], *, radiograph_model: bool = True
) -> tuple[Settings, Database]:
    """The datasets stored and indexed as the listener would, plus one queued job for the study. The tiny CT
    model serves CT and (with `radiograph_model`) the tiny trained radiograph model serves CR and DX; without
    it the CT model is configured for every modality, as `model = "bundled"` does."""
    _, _, model_path = saved_unet(tmp_path / "weights", "tiny")
    model: str | dict[str, str] = per_modality(model_path) if radiograph_model else str(model_path)
    inference = {"model": model, "ensemble": 1, "steps": 1, "device": "cpu", "backend": "torch"}
    peers = [{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}]
    settings = node_settings(tmp_path / "var", inference=inference, peers=peers)
    db, spool = Database(settings.database_url), Spool(settings.spool_dir)
    index = IngestIndex(db)
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        stored = spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buffer.getvalue())
        record = InstanceRecord(
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            path=stored.relpath,
            size_bytes=stored.size,
            sha256=stored.sha256,
            modality=ds.Modality,
            calling_ae="PACS",
        )
        assert index.add_instances([record]) == [True]
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        s.add(Job(study_id=study.id, rule="chest", destination_ae="PACS", instance_count=len(datasets)))
    return settings, db


def run_one_job(settings: Settings) -> None:
    runner = JobRunner(settings, "worker-1-0.1")  # no sender: workers only queue, the queue is what is checked
    assert runner.run_once()


def scout_beside(study_uid: str) -> list[Dataset]:
    """A two-image localizer series (AP and lateral): two orientations, so not one volume."""
    scout = make_ct_series(2, 64, 64, study_uid=study_uid, series_number=1)
    scout[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout[1].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    return scout


def queued_results(db: Database, settings: Settings, kind: str) -> list[Path]:
    with db.session() as s:
        relpaths = s.scalars(select(Result.path).join(OutboundItem).where(Result.kind == kind)).all()
    return [Spool(settings.spool_dir).path(p) for p in relpaths]


def left_out_events(db: Database) -> list[AuditEvent]:
    with db.session() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == "instance.skipped")).all())
        s.expunge_all()
        return events


def queued_series(db: Database) -> set[str]:
    with db.session() as s:
        return set(s.scalars(select(Result.series_instance_uid).join(OutboundItem)).all())


def test_a_series_that_is_no_volume_is_skipped_and_the_rest_analysed(tmp_path: Path) -> None:
    study = generate_uid()
    ct = make_ct_series(8, 64, 64, study_uid=study, series_number=2)
    scout = scout_beside(study)
    settings, db = received_study(tmp_path, ct + scout)
    run_one_job(settings)
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.DONE
        (skipped,) = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all()
        assert skipped.series_instance_uid == scout[0].SeriesInstanceUID and "Image Orientation" in skipped.detail
        assert skipped.job_id == job.id
    assert queued_series(db) and scout[0].SeriesInstanceUID not in queued_series(db)


def test_a_study_with_no_usable_series_fails_once_with_every_reason(tmp_path: Path) -> None:
    settings, db = received_study(tmp_path, scout_beside(generate_uid()))
    run_one_job(settings)
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.FAILED and job.attempts == 1  # retrying cannot help
        assert "no image series could be analysed" in job.error and "Image Orientation" in job.error
    assert queued_series(db) == set()


def test_a_job_superseded_while_it_runs_queues_no_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.results

    settings, db = received_study(tmp_path, make_ct_series(6, 64, 64))
    write_results = node.results.write_results

    def superseded_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        with db.session() as s:  # the stability scan, say: a late series arrived
            job = s.scalars(select(Job)).one()
            job.status, job.superseded_by = JobStatus.SUPERSEDED, job.id + 1
        return write_results(*args, **kwargs)

    monkeypatch.setattr(node.results, "write_results", superseded_meanwhile)
    run_one_job(settings)
    with db.session() as s:
        assert s.scalars(select(Job.status)).one() == JobStatus.SUPERSEDED
    assert queued_series(db) == set()


def test_the_heartbeat_survives_a_database_error_and_gives_up_only_after_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import node.heartbeat
    from db.jobs import claim_next_job

    settings, db = received_study(tmp_path, make_ct_series(2, 32, 32))
    settings.jobs.heartbeat_seconds, settings.jobs.lease_seconds = 0.05, 0.5
    with db.session() as s:
        job = claim_next_job(s, "w1", 60)
    calls: list[float] = []
    real = node.heartbeat.heartbeat

    def failing_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(node.heartbeat, "heartbeat", failing_once)
    with node.heartbeat.Heartbeat(db, job.id, "w1", settings) as beat:
        time.sleep(0.3)
        assert len(calls) >= 3 and not beat.lost.is_set()  # it kept beating after the error

    monkeypatch.setattr(node.heartbeat, "heartbeat", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("down")))
    with node.heartbeat.Heartbeat(db, job.id, "w1", settings) as beat:
        assert beat.lost.wait(2.0)  # no renewal for a whole lease: the job may be someone else's now


def test_a_radiograph_series_with_views_of_two_sizes_is_analysed_per_size(tmp_path: Path) -> None:
    from tests.dicomgen import make_dx

    study, series = generate_uid(), generate_uid()
    pa, lateral = make_dx(96, 96, study_uid=study, seed=1), make_dx(96, 64, study_uid=study, seed=2)
    for ds in (pa, lateral):
        ds.SeriesInstanceUID = series
    settings, db = received_study(tmp_path, [pa, lateral])
    run_one_job(settings)
    with db.session() as s:
        assert s.scalars(select(Job.status)).one() == JobStatus.DONE
        kinds = s.execute(select(Result.kind, Result.sop_instance_uid)).all()
    reports = [uid for kind, uid in kinds if kind == "sr"]
    assert len(reports) == 2 and len({uid for _, uid in kinds}) == len(kinds)  # one report per view, no UID twice


def test_a_model_trained_for_other_settings_is_refused_at_load(tmp_path: Path) -> None:
    from inference.pipeline import PipelineSettings, model_fit_problems
    from inference.weights import ablations_dir

    gaussian = ablations_dir() / "ablation-gaussian.safetensors"
    settings = node_settings(tmp_path / "var", inference={"model": str(gaussian), "device": "cpu"})
    with pytest.raises(ValueError, match="does not fit \\[inference\\]: it was trained with gaussian noise"):
        JobRunner(settings, "worker-1-0.1").model.load()
    trained = {"noise": "simplex", "conditioned": True, "t_max": 300}
    assert model_fit_problems(trained, PipelineSettings()) == []
    deep = model_fit_problems(trained, PipelineSettings(t_start={"CT": 400}))
    assert deep == ["it was trained on timesteps up to 300, t_start asks for {'CT': 400}"]
    mixed = model_fit_problems(trained, PipelineSettings(deep_t_start={"CT": 550}))  # a mixed-depth ensemble
    assert mixed == ["it was trained on timesteps up to 300, t_start asks for {'CT': 550}"]


def of_series(paths: list[Path], source_series_uid: str) -> list[Path]:
    """The result files that reference the source series (SR: in its evidence; SEG: as its source images)."""
    import pydicom

    found = []
    for path in paths:
        ds = pydicom.dcmread(path)
        sequences = [ds.get("ReferencedSeriesSequence", [])] + [
            study.ReferencedSeriesSequence for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        ]
        if any(str(series.SeriesInstanceUID) == source_series_uid for seq in sequences for series in seq):
            found.append(path)
    return found


def check_report_names(sr_path: Path, seg_paths: list[Path], analysed: list[Dataset], left: Dataset) -> None:
    """The SR names the left-out instance and passes dciodvfy; the SEG references the analysed images only."""
    import pydicom

    from tests.test_results import dciodvfy_errors, not_analysed_texts

    assert dciodvfy_errors(sr_path) == []
    assert not_analysed_texts(sr_path) == [f"SOP Instance {left.SOPInstanceUID}: pixel data cannot be decoded"]
    for seg_path in seg_paths:
        assert dciodvfy_errors(seg_path) == []
        seg = pydicom.dcmread(seg_path)
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence
        }
        assert referenced == {str(ds.SOPInstanceUID) for ds in analysed}


def test_a_ct_series_with_an_undecodable_instance_is_analysed_without_it(tmp_path: Path) -> None:
    study = generate_uid()
    ct = make_ct_series(8, 64, 64, study_uid=study, series_number=2)
    other = make_ct_series(5, 64, 64, study_uid=study, series_number=3, seed=1)  # the study's other series
    make_undecodable(ct[4])
    settings, db = received_study(tmp_path, ct + other)
    settings.results.empty_seg = True  # a SEG whatever the tiny model finds: its references are checked
    run_one_job(settings)
    with db.session() as s:
        assert s.scalars(select(Job.status)).one() == JobStatus.DONE
    reports = queued_results(db, settings, "sr")
    assert len(reports) == 2 and all(len(of_series(reports, x[0].SeriesInstanceUID)) == 1 for x in (ct, other))
    (event,) = left_out_events(db)
    assert event.sop_instance_uid == ct[4].SOPInstanceUID and event.series_instance_uid == ct[0].SeriesInstanceUID
    assert event.outcome == "warning" and "pixel data cannot be decoded" in event.detail
    assert "Synthetic" not in event.detail  # never the patient's name
    (sr_path,) = of_series(queued_results(db, settings, "sr"), ct[0].SeriesInstanceUID)
    seg_paths = of_series(queued_results(db, settings, "seg"), ct[0].SeriesInstanceUID)
    check_report_names(sr_path, seg_paths, [ds for k, ds in enumerate(ct) if k != 4], ct[4])
    from tests.test_results import not_analysed_texts

    (complete,) = of_series(queued_results(db, settings, "sr"), other[0].SeriesInstanceUID)
    with pytest.raises(ValueError):  # the complete series' report has no "not analysed" container
        not_analysed_texts(complete)


def test_a_radiograph_series_with_an_undecodable_image_is_analysed_without_it(tmp_path: Path) -> None:
    """Radiographs are analysed one image per part: the undecodable one is skipped (its event names it) and the
    other gets its own SEG and SR, which reference it alone."""
    import pydicom

    from tests.dicomgen import make_dx
    from tests.test_results import dciodvfy_errors

    study, series = generate_uid(), generate_uid()
    images = [make_dx(96, 96, study_uid=study, seed=k) for k in range(2)]
    for k, ds in enumerate(images):
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
    make_undecodable(images[0])
    settings, db = received_study(tmp_path, images)
    settings.results.empty_seg = True
    run_one_job(settings)
    with db.session() as s:
        assert s.scalars(select(Job.status)).one() == JobStatus.DONE
        (skipped,) = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all()
    assert skipped.sop_instance_uid == images[0].SOPInstanceUID and "cannot decode pixel data" in skipped.detail
    (sr_path,) = queued_results(db, settings, "sr")
    (seg_path,) = queued_results(db, settings, "seg")
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(seg_path) == []
    seg = pydicom.dcmread(seg_path)
    series_refs = seg.ReferencedSeriesSequence
    referenced = {str(i.ReferencedSOPInstanceUID) for x in series_refs for i in x.ReferencedInstanceSequence}
    assert referenced == {images[1].SOPInstanceUID}


def test_a_dx_series_of_three_same_size_images_gets_a_valid_seg_per_image(tmp_path: Path) -> None:
    """Was: one SEG for the three images, which highdicom refuses without a Frame of Reference ("Only a single
    frame is supported..."), so the job failed and was retried. Now each image is its own part with its own SEG."""
    import pydicom

    from tests.dicomgen import make_dx
    from tests.test_results import dciodvfy_errors

    study, series = generate_uid(), generate_uid()
    images = [make_dx(96, 96, study_uid=study, seed=k) for k in range(3)]
    for k, ds in enumerate(images):
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
    settings, db = received_study(tmp_path, images)
    settings.results.empty_seg = True  # a SEG whatever the tiny model finds
    run_one_job(settings)
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.DONE and job.attempts == 1, job.error
    segs = queued_results(db, settings, "seg")
    assert len(segs) == 3 and len(queued_results(db, settings, "sr")) == 3
    referenced = []
    for path in segs:
        assert dciodvfy_errors(path) == []
        seg = pydicom.dcmread(path)
        assert int(seg.NumberOfFrames) == 1 and "FrameOfReferenceUID" not in seg
        (item,) = [i for x in seg.ReferencedSeriesSequence for i in x.ReferencedInstanceSequence]
        referenced.append(str(item.ReferencedSOPInstanceUID))
    assert sorted(referenced) == sorted(str(ds.SOPInstanceUID) for ds in images)
    assert len({str(pydicom.dcmread(p).SeriesInstanceUID) for p in segs}) == 3  # one result series per image part


def source_series_results(db: Database) -> dict[str, set[str]]:
    """Source series UID -> the model ids recorded on its queued results."""
    with db.session() as s:
        rows = s.execute(select(Result.source_series_instance_uid, Result.model_id).join(OutboundItem)).all()
    found: dict[str, set[str]] = {}
    for series_uid, model_id in rows:
        found.setdefault(series_uid, set()).add(model_id)
    return found


def study_page_series(settings: Settings, db: Database, study_uid: str) -> dict[str, str]:
    """Series UID -> the text of the study page's "Analysed by" cell (and the REST API agrees)."""
    import re

    from fastapi.testclient import TestClient

    from node.web.app import create_app

    client = TestClient(create_app(settings, db, token="t"))
    auth = {"Authorization": "Bearer t"}
    page = client.get(f"/studies/{study_uid}", headers=auth)
    assert page.status_code == 200
    cells = re.findall(r'<tr data-series="([^"]+)">.*?<td class="served">(.*?)</td>', page.text, re.S)
    api = client.get(f"/api/studies/{study_uid}", headers=auth).json()
    for series in api["series"]:
        cell = dict(cells)[series["series_instance_uid"]]
        assert all(m in cell for m in series["model_ids"]) and all(w[:40] in cell for w in series["skipped"])
    return {uid: re.sub(r"<[^>]+>", " ", cell) for uid, cell in cells}


def test_a_cr_series_is_never_analysed_by_the_ct_model(tmp_path: Path) -> None:
    """`model` names the CT model for every modality (as the default "bundled" does): the CT series is analysed,
    the CR series is skipped with an audit event saying no model is trained for CR, and nothing is sent for it."""
    from inference.unet import read_model_info
    from tests.test_results import make_cr

    study = generate_uid()
    ct = make_ct_series(6, 64, 64, study_uid=study, series_number=2)
    cr = make_cr(96, 96)
    cr.StudyInstanceUID = study
    settings, db = received_study(tmp_path, ct + [cr], radiograph_model=False)
    run_one_job(settings)
    ct_model = read_model_info(Path(settings.inference.model_for("CT")))
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.DONE and job.model_id == ct_model.model_id
        (skipped,) = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all()
    assert skipped.series_instance_uid == cr.SeriesInstanceUID and skipped.outcome == "warning"
    assert "no model trained for CR" in skipped.detail and ct_model.model_id in skipped.detail
    assert source_series_results(db) == {ct[0].SeriesInstanceUID: {ct_model.model_id}}
    every = [p for kind in ("seg", "sc", "sr") for p in queued_results(db, settings, kind)]
    assert every and of_series(every, cr.SeriesInstanceUID) == []  # no object refers to the CR series
    rows = study_page_series(settings, db, study)  # the study page says which model served which series
    assert ct_model.model_id in rows[ct[0].SeriesInstanceUID]
    assert "not analysed" in rows[cr.SeriesInstanceUID] and "no model trained for CR" in rows[cr.SeriesInstanceUID]
    assert rows[cr.SeriesInstanceUID].split("not analysed")[0].strip() == ""  # no model named as serving it


def test_a_radiograph_only_study_without_a_radiograph_model_is_done_with_nothing_sent(tmp_path: Path) -> None:
    from tests.dicomgen import make_dx

    dx = make_dx(96, 96)
    settings, db = received_study(tmp_path, [dx], radiograph_model=False)
    run_one_job(settings)
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.DONE and job.score is None and job.model_id == ""
        assert s.scalars(select(Result)).all() == []
        (skipped,) = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all()
    assert skipped.series_instance_uid == dx.SeriesInstanceUID and "no model trained for DX" in skipped.detail


def test_a_cr_series_is_analysed_by_a_model_trained_for_cr(tmp_path: Path) -> None:
    """With the per-modality table naming a model whose metadata says CR, the CR series is analysed by that
    model (recorded per series), the CT series by the CT model."""
    from inference.unet import read_model_info
    from tests.test_results import make_cr

    study = generate_uid()
    ct = make_ct_series(6, 64, 64, study_uid=study, series_number=2)
    cr = make_cr(96, 96)
    cr.StudyInstanceUID = study
    settings, db = received_study(tmp_path, ct + [cr])
    run_one_job(settings)
    ct_model = read_model_info(Path(settings.inference.model_for("CT")))
    rx_model = read_model_info(Path(settings.inference.model_for("CR")))
    assert rx_model.modalities == ("CR", "DX") and ct_model.modalities == ("CT",)
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.DONE
        assert set(job.model_id.split(",")) == {ct_model.model_id, rx_model.model_id}
        assert s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all() == []
    assert source_series_results(db) == {
        ct[0].SeriesInstanceUID: {ct_model.model_id},
        cr.SeriesInstanceUID: {rx_model.model_id},
    }
    rows = study_page_series(settings, db, study)
    assert rx_model.model_id in rows[cr.SeriesInstanceUID] and ct_model.model_id in rows[ct[0].SeriesInstanceUID]
    (cr_report,) = of_series(queued_results(db, settings, "sr"), cr.SeriesInstanceUID)
    import pydicom

    equipment = pydicom.dcmread(cr_report).ContributingEquipmentSequence
    assert any(e.get("SoftwareVersions") == rx_model.model_id for e in equipment)


def test_a_mixed_depth_ensemble_for_ct_does_not_refuse_the_radiograph_model(tmp_path: Path) -> None:
    """`deep_t_start = {CT = 550}` is checked against the model serving CT only: the radiograph model, trained to
    t = 300, still serves CR, and the CT series is analysed with members at both depths."""
    from tests.test_results import make_cr

    study = generate_uid()
    ct = make_ct_series(6, 64, 64, study_uid=study, series_number=2)
    cr = make_cr(96, 96)
    cr.StudyInstanceUID = study
    settings, db = received_study(tmp_path, ct + [cr])
    settings.inference.ensemble = 2
    settings.inference.deep_t_start = {"CT": 550}
    run_one_job(settings)
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.DONE and len(job.model_id.split(",")) == 2
        assert s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all() == []


def test_a_model_without_modality_metadata_is_taken_as_ct_only() -> None:
    """Files written before edgenode recorded modalities: CT-only (radiology IT keeps its CT model working after
    an upgrade, and no radiograph is ever analysed with it)."""
    from inference.unet import PRESETS, ModelInfo
    from node.models import plan_modality

    legacy = ModelInfo(name="old", config=PRESETS["tiny"], sha256="ab" * 32)
    assert plan_modality("CT", "old.safetensors", legacy).refusal == ""
    refusal = plan_modality("DX", "old.safetensors", legacy).refusal
    assert refusal.startswith("no model trained for DX") and "no modality metadata" in refusal


def test_a_file_damaged_in_the_spool_is_named_by_the_uid_it_was_received_as(tmp_path: Path) -> None:
    ct = make_ct_series(6, 64, 64)
    settings, db = received_study(tmp_path, ct)
    with db.session() as s:
        from db.models import Instance

        relpath = s.scalars(select(Instance.path).where(Instance.sop_instance_uid == ct[2].SOPInstanceUID)).one()
    Spool(settings.spool_dir).path(relpath).write_bytes(b"overwritten by something else")
    run_one_job(settings)
    with db.session() as s:
        assert s.scalars(select(Job.status)).one() == JobStatus.DONE
    (event,) = left_out_events(db)
    assert event.sop_instance_uid == ct[2].SOPInstanceUID and "not a readable DICOM file" in event.detail
    from tests.test_results import not_analysed_texts

    (sr_path,) = queued_results(db, settings, "sr")
    assert not_analysed_texts(sr_path) == [f"SOP Instance {ct[2].SOPInstanceUID}: not a readable DICOM file"]


def test_a_ct_series_with_too_few_decodable_slices_is_skipped_with_the_reasons(tmp_path: Path) -> None:
    study = generate_uid()
    ct = make_ct_series(6, 64, 64, study_uid=study, series_number=2)
    short = make_ct_series(3, 64, 64, study_uid=study, series_number=3, seed=2)
    make_undecodable(short[1])
    settings, db = received_study(tmp_path, ct + short)
    run_one_job(settings)
    with db.session() as s:
        assert s.scalars(select(Job.status)).one() == JobStatus.DONE
        (skipped,) = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all()
    assert skipped.series_instance_uid == short[0].SeriesInstanceUID
    assert "only 2 of the series' 3 instances" in skipped.detail and short[1].SOPInstanceUID in skipped.detail
    assert left_out_events(db) == []  # the series was not analysed: its one event says why
    (report,) = queued_results(db, settings, "sr")
    assert of_series([report], ct[0].SeriesInstanceUID) == [report]


def phantom_views(seed: int, views: tuple[str, ...]) -> list[Dataset]:
    """Phantom DX radiographs of one subject, one per view, in one series (as a PA and a lateral are sent)."""
    from inference.phantoms import radiograph_dataset, synthetic_study
    from inference.radiograph_phantoms import make_radiograph

    study = synthetic_study(seed, 0)
    images = [radiograph_dataset(make_radiograph(seed, 96, 96, view=view), study, "DX") for view in views]
    for k, ds in enumerate(images):
        ds.SeriesInstanceUID, ds.InstanceNumber = images[0].SeriesInstanceUID, k + 1
    return images


def test_a_lateral_view_is_not_analysed_and_the_pa_beside_it_is(tmp_path: Path) -> None:
    """Lateral views are refused by design (the radiograph model and its lung-field condition are for PA views):
    the lateral image is audited as skipped with the reason, nothing sent refers to it, the PA is analysed."""
    import pydicom

    pa, lateral = phantom_views(9, ("PA", "LL"))
    settings, db = received_study(tmp_path, [pa, lateral])
    settings.results.empty_seg = True  # a SEG whatever the tiny model finds
    run_one_job(settings)
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.DONE and job.attempts == 1, job.error
        (skipped,) = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all()
    assert skipped.sop_instance_uid == lateral.SOPInstanceUID
    assert "LL view" in skipped.detail and "only frontal (PA/AP)" in skipped.detail
    (seg,) = queued_results(db, settings, "seg")
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for x in pydicom.dcmread(seg).ReferencedSeriesSequence
        for i in x.ReferencedInstanceSequence
    }
    assert referenced == {pa.SOPInstanceUID}
    assert len(queued_results(db, settings, "sr")) == 1


def test_a_study_of_only_a_lateral_view_is_done_with_nothing_sent(tmp_path: Path) -> None:
    (lateral,) = phantom_views(10, ("LL",))
    settings, db = received_study(tmp_path, [lateral])
    run_one_job(settings)
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.DONE and job.score is None, job.error
        assert s.scalars(select(Result)).all() == []
        (skipped,) = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "series.skipped")).all()
    assert "LL view" in skipped.detail
