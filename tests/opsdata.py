"""Test data for the operator surfaces.

- `served_node` / `ServedNode`: a REAL run. `edgenode serve` as a child process infers with a tiny
  random-weight U-Net in its worker process and sends SEG, SC heatmaps and SR to real dcmtk receivers;
  dcmtk's storescu sends the studies. The CLI and browser tests use only this.
- `record_received_study` and `record_inference_outcome`: hand-made rows through the db models, for the
  query-level unit tests whose point is an edge case a real run cannot produce on demand (ties and
  ordering of scores chosen by the test, STAT on an old job, superseded jobs, dead or pending deliveries
  of a given age for retention, a stored result under another study for the web's access checks).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from sqlalchemy import select

from db.audit import record_audit
from db.jobs import inference_seconds, queue_wait_seconds
from db.models import (
    PRIORITY_ROUTINE,
    PRIORITY_STAT,
    AuditEventType,
    Instance,
    Job,
    JobDuration,
    JobStatus,
    OutboundItem,
    OutboundStatus,
    Result,
    Series,
    Study,
    StudyStatus,
    utcnow,
)
from db.session import Database
from node.config import Settings, load_settings, settings_to_toml
from node.local_orthanc import wait_for_port
from tests.conftest import DCMTK, edgenode_cmd, free_port, node_env, peer_env
from tests.dicomgen import make_ct_series, make_dx, write_datasets
from tests.engine_models import saved_unet
from tests.peers import StoreSCP
from tests.radiograph_model import per_modality


def heatmap_sc(study_uid: str, patient_id: str, size: int = 64, hot: tuple[int, int] = (20, 40)) -> Dataset:
    """An RGB Secondary Capture: grey chest-like background with a red/yellow blob at `hot`."""
    yy, xx = np.mgrid[0:size, 0:size]
    grey = (((xx + yy) % size) * 2 + 40).astype(np.uint8)
    rgb = np.stack([grey, grey, grey], axis=-1)
    blob = np.exp(-(((yy - hot[0]) ** 2 + (xx - hot[1]) ** 2) / (2 * (size / 10) ** 2)))
    rgb[..., 0] = np.clip(rgb[..., 0] + blob * 255, 0, 255).astype(np.uint8)
    rgb[..., 1] = np.clip(rgb[..., 1] + blob * 120, 0, 255).astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    return ds


def record_inference_outcome(
    db: Database,
    spool_dir: Path,
    study_uid: str,
    *,
    score: float,
    uncertainty: float,
    destination: str = "",
    delivery: OutboundStatus | None = OutboundStatus.SENT,
    timings: dict[str, float] | None = None,
    heatmaps: int = 1,
    stat: bool = False,
) -> int:
    """Hand-made: mark the study's job done with this score and SC heatmap results; returns the job id.

    For edge-case unit tests only (see the module docstring). Timings use the worker's keys.
    """
    now = utcnow()
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None, f"study {study_uid} was not received"
        job = next((j for j in sorted(study.jobs, key=lambda j: -j.id) if j.status != JobStatus.SUPERSEDED), None)
        if job is None:
            job = Job(study=study, rule="chest", destination_ae=destination, instance_count=study.instance_count)
            session.add(job)
        if stat:
            job.priority = PRIORITY_STAT  # as a STAT routing rule does
        job.status = JobStatus.DONE
        job.attempts = max(job.attempts, 1)
        job.started_at = now - timedelta(seconds=5)
        job.finished_at = now
        job.score, job.uncertainty = score, uncertainty
        job.model_id = "edgenode-ddpm-tiny-0123abcd"
        job.timings = timings or {"queue_wait": 1.5, "infer": 3.5, "infer.reconstruct": 3.1, "encode": 0.5}
        destination = destination or job.destination_ae or "PACS"  # the real job's destination when there is one
        job.destination_ae = destination
        study.status = StudyStatus.DONE
        session.flush()
        record_audit(session, AuditEventType.JOB_DONE, study_instance_uid=study_uid, job_id=job.id)
        session.add(  # what complete_job appends for /metrics
            JobDuration(
                job_id=job.id,
                finished_at=now,
                worker_seconds=inference_seconds(job.timings),
                queue_wait_seconds=queue_wait_seconds(job.timings),
            )
        )
        for k in range(heatmaps):
            ds = heatmap_sc(study_uid, study.patient_id, hot=(16 + 8 * k, 40 - 6 * k))
            relative = f"results/{study_uid}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
            path = spool_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            result = Result(
                job=job,
                kind="sc",
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=ds.SeriesInstanceUID,
                path=relative,
                size_bytes=path.stat().st_size,
            )
            session.add(result)
            record_audit(
                session,
                AuditEventType.RESULT_CREATED,
                study_instance_uid=study_uid,
                sop_instance_uid=ds.SOPInstanceUID,
                job_id=job.id,
                detail="sc",
            )
            if delivery is None:
                continue
            item = OutboundItem(
                result=result,
                destination_ae=destination,
                host="127.0.0.1",
                port=4242,
                status=delivery,
                attempts=1,
                sent_at=now if delivery == OutboundStatus.SENT else None,
                last_status=0 if delivery == OutboundStatus.SENT else 0xA700,
                last_error="" if delivery == OutboundStatus.SENT else "Out of resources",
            )
            session.add(item)
            event = {
                OutboundStatus.SENT: AuditEventType.SEND_OK,
                OutboundStatus.PENDING: AuditEventType.SEND_RETRY,
                OutboundStatus.DEAD: AuditEventType.SEND_DEAD,
            }[delivery]
            record_audit(
                session,
                event,
                outcome="success" if delivery == OutboundStatus.SENT else "failure",
                called_ae=destination,
                study_instance_uid=study_uid,
                sop_instance_uid=ds.SOPInstanceUID,
                job_id=job.id,
                dimse_status=item.last_status,
            )
        return job.id


def record_received_study(
    db: Database,
    spool_dir: Path,
    *,
    patient_id: str,
    accession: str,
    modality: str = "CT",
    instances: int = 2,
    received_at: datetime | None = None,
    calling_ae: str = "PACS",
    status: StudyStatus = StudyStatus.QUEUED,
) -> str:
    """A received study with spool files and rows (unit tests only; CLI tests receive for real)."""
    at = received_at or utcnow()
    study_uid, series_uid = generate_uid(), generate_uid()
    with db.session() as session:
        study = Study(
            study_instance_uid=study_uid,
            patient_id=patient_id,
            accession_number=accession,
            study_date="20261101",
            study_description="CHEST",
            calling_ae=calling_ae,
            status=status,
            priority=PRIORITY_ROUTINE,
            first_received_at=at,
            last_received_at=at,
            completed_at=at,
            instance_count=instances,
            completed_instance_count=instances,
        )
        series = Series(study=study, series_instance_uid=series_uid, modality=modality, body_part="CHEST")
        series.instance_count = instances
        session.add_all([study, series])
        for n in range(instances):
            sop = generate_uid()
            relative = f"{study_uid}/{series_uid}/{sop}.dcm"
            path = spool_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = f"not a real image {sop}".encode()
            path.write_bytes(payload)
            session.add(
                Instance(
                    series=series,
                    sop_instance_uid=sop,
                    sop_class_uid=CTImageStorage,
                    instance_number=n + 1,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    path=relative,
                    size_bytes=len(payload),
                    sha256=hashlib.sha256(payload).hexdigest(),
                    calling_ae=calling_ae,
                    received_at=at,
                )
            )
            record_audit(
                session,
                AuditEventType.INSTANCE_STORED,
                at=at,
                calling_ae=calling_ae,
                called_ae="EDGENODE",
                peer_address="127.0.0.1",
                patient_id=patient_id,
                accession_number=accession,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                sop_instance_uid=sop,
                dimse_status=0,
            )
        if status == StudyStatus.QUEUED:
            session.add(Job(study=study, rule="chest", destination_ae=calling_ae, instance_count=instances))
    return study_uid


# --- A real run: `edgenode serve` infers with a tiny model and sends results to real dcmtk receivers ----


TINY_INFERENCE = {"ensemble": 2, "steps": 3, "backend": "torch", "device": "cpu", "workers": 1, "max_batch": 8}
OFFLINE_AE = "OFFLINE"  # an allowed sender whose result port has no listener: its deliveries dead-letter
SETTLED_JOBS = (JobStatus.DONE, JobStatus.FAILED)


@dataclass
class SentStudy:
    study_uid: str
    patient_id: str
    accession: str
    modality: str
    calling_ae: str
    instances: int
    body_part: str = "CHEST"


@dataclass
class ServedNode:
    """`edgenode serve` as a child process, with a dcmtk storescp per peer that receives results."""

    config: Path
    settings: Settings
    log: Path
    receivers: dict[str, StoreSCP] = field(default_factory=dict)  # by peer AE title
    studies: dict[str, SentStudy] = field(default_factory=dict)  # by accession
    proc: subprocess.Popen[bytes] | None = None

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.web.port}"

    def start(self, timeout: float = 90.0) -> None:
        for receiver in self.receivers.values():
            receiver.start()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                edgenode_cmd("serve", "--config", str(self.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=node_env(),
            )
        # The dashboard starts after the listener: probing it leaves no half-open DICOM association behind
        # (a bare TCP probe of the DICOM port holds the listener's shutdown for its grace period).
        if self.settings.web.enabled:
            wait_for_port("127.0.0.1", self.settings.web.port, timeout, self.proc)
        else:
            wait_for_port("127.0.0.1", self.settings.node.port, timeout, self.proc)

    def send(
        self,
        accession: str,
        patient_id: str,
        *,
        calling_ae: str = "STORESCU",
        modality: str = "CT",
        body_part: str = "CHEST",
        lesion: tuple[int, int] | None = None,
    ) -> SentStudy:
        """Send one synthetic study with /usr/bin/storescu; each accession gets its own pixels (seed).

        `lesion` (stored-value increase, radius in pixels) adds a bright disc in the right lung of every image,
        so the studies differ by more than their noise.
        """
        seed = zlib.crc32(accession.encode())
        if modality == "CT":
            datasets = make_ct_series(
                n_slices=3, rows=32, cols=32, patient_id=patient_id, accession=accession, seed=seed
            )
        else:
            datasets = [make_dx(rows=64, cols=64, patient_id=patient_id, accession=accession, seed=seed)]
        for ds in datasets:
            ds.BodyPartExamined = body_part
            if lesion is not None:
                add_lesion(ds, *lesion)
        files = write_datasets(datasets, self.config.parent / "outgoing" / accession)
        store(self.settings.node.port, files, calling_ae=calling_ae, called_ae=self.settings.node.ae_title)
        sent = SentStudy(
            str(datasets[0].StudyInstanceUID), patient_id, accession, modality, calling_ae, len(files), body_part
        )
        self.studies[accession] = sent
        return sent

    def wait_until_settled(self, db: Database, timeout: float = 150.0) -> None:
        """Block until every sent study is settled: no job made (routing declined), or its newest job done or
        failed with no delivery still pending (each result sent, or dead-lettered)."""
        wanted = {s.study_uid for s in self.studies.values()}
        deadline = time.monotonic() + timeout
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            state = self._states(db, wanted)
            if all(s == "settled" for s in state.values()) and set(state) == wanted:
                return
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.25)
        raise TimeoutError(f"not settled in {timeout} s: {state}; log:\n{self.log.read_text()[-4000:]}")

    @staticmethod
    def _states(db: Database, wanted: set[str]) -> dict[str, str]:
        state: dict[str, str] = {}
        with db.session() as session:
            for study in session.scalars(select(Study).where(Study.study_instance_uid.in_(wanted))):
                jobs = sorted(study.jobs, key=lambda j: j.id)
                if study.status == StudyStatus.RECEIVING:
                    state[study.study_instance_uid] = "receiving"
                elif not jobs:
                    state[study.study_instance_uid] = "settled" if study.status == StudyStatus.COMPLETE else "no job"
                elif jobs[-1].status not in SETTLED_JOBS:
                    state[study.study_instance_uid] = f"job {jobs[-1].status}"
                else:
                    pending = [o for r in jobs[-1].results for o in r.outbound if o.status == OutboundStatus.PENDING]
                    state[study.study_instance_uid] = f"{len(pending)} pending" if pending else "settled"
        return state

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for receiver in self.receivers.values():
            receiver.stop()


def add_lesion(ds: Dataset, increase: int, radius: int) -> None:
    """Raise the stored values of a disc centred in the image's right lung (patient right = image left)."""
    pixels = ds.pixel_array.astype(np.int32)
    rows, cols = pixels.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    disc = (yy - 0.47 * rows) ** 2 + (xx - 0.29 * cols) ** 2 <= radius**2
    pixels[disc] += increase
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()


def store(port: int, files: list[Path], *, calling_ae: str, called_ae: str = "EDGENODE") -> subprocess.CompletedProcess:
    """C-STORE files with dcmtk's storescu (absolute path, TCP_NODELAY); raises if storescu fails."""
    return subprocess.run(
        [str(DCMTK["storescu"]), "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        env=peer_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )


def served_node(folder: Path, **sections: Any) -> ServedNode:
    """A node on free ports that infers with tiny U-Nets (CT: random weights; CR/DX: tests/radiograph_model.py) and
    sends results back to the sender.

    Allowed senders: STORESCU and ER_CT (a routing rule makes its studies STAT), each with a real dcmtk
    storescp receiving results, and OFFLINE, whose result port has no listener (3 tries, then dead letter).
    The "chest" rule only takes BodyPartExamined CHEST, so a study of another body part stays `complete`.
    The dashboard listens on a free port of 127.0.0.1 with a generated token (<data_dir>/web-token).
    """
    folder.mkdir(parents=True, exist_ok=True)
    _, _, model = saved_unet(folder)
    receivers = {ae: StoreSCP(folder / "received" / ae, aet=ae) for ae in ("STORESCU", "ER_CT")}
    sections.setdefault("web", {"port": free_port()})
    # The tiny CT model for CT, the tiny trained radiograph model for the DX studies (CR/DX need a CR/DX model).
    sections.setdefault("inference", {**TINY_INFERENCE, "model": per_modality(model)})
    sections.setdefault(
        "send", {"interval_seconds": 0.5, "initial_backoff_seconds": 0.5, "max_backoff_seconds": 1, "max_attempts": 3}
    )
    settings = load_settings(
        None,
        node={"port": free_port(), "data_dir": str(folder / "var"), "min_free_disk_mb": 1},
        peers=[
            *({"ae_title": ae, "host": "127.0.0.1", "port": r.port} for ae, r in receivers.items()),
            {"ae_title": OFFLINE_AE, "host": "127.0.0.1", "port": free_port()},
        ],
        stability={"stable_seconds": 1.0, "max_wait_seconds": 60.0, "scan_interval_seconds": 0.2},
        routing=[
            {"name": "emergency", "calling_ae": ["ER_CT"], "priority": "stat"},
            {"name": "chest", "body_parts": ["CHEST"]},
        ],
        **sections,
    )
    config = folder / "edgenode.toml"
    config.write_text(settings_to_toml(settings))
    return ServedNode(config=config, settings=settings, log=folder / "serve.log", receivers=receivers)
