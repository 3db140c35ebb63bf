"""`edgenode demo`: the whole loop on one machine, from a fresh checkout, in one command.

A synthetic chest CT with a lesion goes into a real Orthanc (started here, or one you run), Orthanc
routes it to the node with the deploy/ Lua script, the node infers and sends SEG, heatmaps and SR back,
and the demo prints where they landed, the score and the timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from node.config import PeerSettings, Settings

log = logging.getLogger(__name__)

ROUTING_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "edgenode-routing.lua"
DEMO_PACS_AET = "DEMOPACS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None, help="demo data folder (default: a temp dir)")
    parser.add_argument("--lesions", default="nodule", choices=["nodule", "ggo", "consolidation", "reticular", "mixed"])
    parser.add_argument("--modality", default="ct", choices=["ct", "dx"])
    parser.add_argument("--size", type=int, default=256, help="image rows and columns (default 256)")
    parser.add_argument("--slices", type=int, default=40, help="CT slices (default 40)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument(
        "--orthanc-url",
        default="",
        help="use this running Orthanc (REST URL) instead of starting one; it must route to the node as in deploy/",
    )
    parser.add_argument("--orthanc-aet", default="ORTHANC", help="AE title of the Orthanc given with --orthanc-url")
    parser.add_argument("--orthanc-dicom-port", type=int, default=4242, help="DICOM port of that Orthanc")


def demo_settings(base: Settings, workdir: Path, pacs: PeerSettings) -> Settings:
    """The operator's settings with what the demo needs: its own data dir, free ports, the PACS as peer."""
    from node.local_orthanc import free_port

    data = base.model_dump()
    data["node"].update(port=free_port(), data_dir=str(workdir / "node"), min_free_disk_mb=64)
    data["database"]["url"] = ""  # its own SQLite beside its own spool: never the site's database
    data["peers"] = [pacs.model_dump()]
    data["stability"].update(stable_seconds=2.0, max_wait_seconds=120.0, scan_interval_seconds=0.5)
    data["send"].update(interval_seconds=0.5, initial_backoff_seconds=2.0)
    data["web"].update(port=free_port())
    data["routing"] = [{"name": "demo", "modalities": ["CT", "CR", "DX"]}]
    return Settings.model_validate(data)


class _RemoteOrthanc:
    """An Orthanc the operator runs, reached through its REST API."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def post(self, path: str, body: Any) -> Any:
        import urllib.request

        request = urllib.request.Request(self.url + path, data=body, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def instances_of_study(self, uid: str) -> list[dict[str, Any]]:
        body = json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": uid}, "Expand": True}).encode()
        return list(self.post("/tools/find", body))


def run(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from inference.phantoms import write_study
    from node.app import EdgeNode
    from node.local_orthanc import Orthanc
    from node.models import modality_plans

    modality = args.modality.upper()
    plan = next(p for p in modality_plans(settings) if p.modality == modality)
    if plan.refusal:  # the node would receive the study, skip it and send nothing: say so instead of waiting
        print(
            f"edgenode demo: a {modality} study would not be analysed: {plan.refusal}; configure a {modality} model "
            f'in [inference] model (e.g. model = {{ {modality} = "/path/to/model.safetensors" }})'
        )
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgenode-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] generating a synthetic chest {args.modality.upper()} with a {args.lesions} in {workdir / 'study'}")
    folder = write_study(workdir / "study", args.modality, args.seed, 0, args.lesions, args.size, args.slices)
    files = sorted(folder.glob("*.dcm"))
    with np.load(folder / "ground_truth.npz") as truth:
        study_uid = str(truth["study_instance_uid"])

    started_orthanc: Orthanc | None = None
    if args.orthanc_url:
        pacs: Any = _RemoteOrthanc(args.orthanc_url)
        peer = PeerSettings(ae_title=args.orthanc_aet, host="127.0.0.1", port=args.orthanc_dicom_port)
        node_settings = demo_settings(settings, workdir, peer)
        print(
            f"[2/5] using the Orthanc at {pacs.url} (it must route to {node_settings.node.ae_title} "
            f"on port {node_settings.node.port})"
        )
    else:
        peer_orthanc = Orthanc(
            workdir / "pacs",
            aet=DEMO_PACS_AET,
            extra_config={"StableAge": 2},
            lua_scripts=[ROUTING_SCRIPT] if ROUTING_SCRIPT.exists() else [],
        )
        peer = PeerSettings(ae_title=DEMO_PACS_AET, host="127.0.0.1", port=peer_orthanc.dicom_port)
        node_settings = demo_settings(settings, workdir, peer)
        peer_orthanc.modalities = {"edgenode": (node_settings.node.ae_title, "127.0.0.1", node_settings.node.port)}
        print(
            f"[2/5] starting Orthanc as the PACS ({DEMO_PACS_AET}, DICOM {peer_orthanc.dicom_port}, {peer_orthanc.url})"
        )
        started_orthanc = pacs = peer_orthanc.start()

    node = EdgeNode(node_settings)
    try:
        print(
            f"[3/5] starting edgenode ({node_settings.node.ae_title} on port {node_settings.node.port}, "
            f"dashboard http://127.0.0.1:{node_settings.web.port}, data in {node_settings.data_dir})"
        )
        node.start()
        print(f"[4/5] storing {len(files)} image(s) in the PACS; it routes them to the node when the study is stable")
        for path in files:
            pacs.post("/instances", path.read_bytes())
        sent_at = time.monotonic()
        result = _wait_for_results(node, pacs, study_uid, args.timeout)
        elapsed = time.monotonic() - sent_at
        if result is None:
            print(f"edgenode demo: no results in the PACS after {args.timeout:.0f} s; see the log above")
            return 1
        _report(result, elapsed, pacs, study_uid)  # while the PACS still runs: it is asked where things are
        return 0
    finally:
        node.stop()
        if started_orthanc is not None:
            started_orthanc.stop()


def _wait_for_results(node: Any, pacs: Any, study_uid: str, timeout: float) -> dict[str, Any] | None:
    """Poll the node's database until the study's job is done and all its results are delivered."""
    from db.models import JobStatus, OutboundStatus
    from db.queries import job_deliveries, latest_job_of_study

    deadline = time.monotonic() + timeout
    last_state = ""
    while time.monotonic() < deadline:
        with node.db.session() as session:
            job = latest_job_of_study(session, study_uid)
            state = "waiting for the study to arrive and settle" if job is None else f"job {job.id} {job.status}"
            if job is not None and job.status == JobStatus.FAILED:
                print(f"      job failed: {job.error}")
                return None
            if job is not None and job.status == JobStatus.DONE:
                items = job_deliveries(session, job.id)
                pending = [i for i in items if i[0] != OutboundStatus.SENT]
                state = f"job {job.id} done; {len(items) - len(pending)}/{len(items)} result(s) delivered"
                if items and not pending:
                    return {
                        "job_id": job.id,
                        "score": job.score,
                        "uncertainty": job.uncertainty,
                        "model_id": job.model_id,
                        "timings": dict(job.timings or {}),
                        "results": [(kind, uid) for _, kind, uid in items],
                    }
        if state != last_state:
            print(f"      {state}")
            last_state = state
        time.sleep(0.5)
    return None


def _report(result: dict[str, Any], elapsed: float, pacs: Any, study_uid: str) -> None:
    in_pacs = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in pacs.instances_of_study(study_uid)}
    print(f"[5/5] results in the PACS under study {study_uid}:")
    for kind, uid in result["results"]:
        found = in_pacs.get(uid)
        where = f"{pacs.url}/instances/{found['ID']}" if found else "NOT FOUND in the PACS"
        print(f"      {kind:<4} {uid}  {where}")
    print(
        f"      study anomaly score {result['score']:.3f} (uncertainty {result['uncertainty']:.3f}), "
        f"model {result['model_id']}"
    )
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in result["timings"].items() if "." not in k)
    print(f"      timings: {timings}; stored in the PACS {elapsed:.1f} s after upload (includes the quiet periods)")
