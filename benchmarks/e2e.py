"""End-to-end latency: from the last instance the node receives to the last result stored in the PACS, by stage.

A real Orthanc (the PACS, routing with deploy/orthanc/edgenode-routing.lua) gets each study from storescu and
routes it to `edgenode serve`; the node's job timings and audit timestamps split the latency into:

  quiet      the stability quiet period (`[stability] stable_seconds`, a site setting, not overhead)
  scan lag   quiet period over -> job created (the scan at quiet end, or the periodic scan's interval)
  queue      job created -> claimed by a worker (`queue_wait`)
  load       model (first job only) + reading the series (`load`)
  u-net      the reverse diffusion: U-Net calls, noise, ensemble (`infer.reconstruct`)
  pre/post   mask, model grid, threshold, back to the source grid (`infer` - `infer.reconstruct`), split
             into the pipeline's own sub-stages (`infer.mask`, `infer.resample`, `infer.postprocess`,
             `infer.map_back`) and the rest (result assembly)
  encode     SEG / SC / SR objects (`encode`), spool + database (`enqueue`), job bookkeeping
  send       job done -> last C-STORE acknowledged by the PACS (`send`, audit send.ok)

Node overhead = total - quiet - u-net. One warm-up study of each kind runs first (engine export, lazy imports).
Run: PYTHONPATH=. python benchmarks/e2e.py [--repeats 3] [--ct-slices 80]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select  # noqa: E402

from db.models import AuditEvent, Job, JobStatus, Study  # noqa: E402
from tests.dicomgen import make_ct_series, make_dx, write_datasets  # noqa: E402
from tests.e2e_support import NodeProcess, make_model, routing_pacs, storescu, wait_for  # noqa: E402

STAGES = ("quiet", "scan lag", "queue", "load", "u-net", "pre/post", "encode", "send", "total", "overhead")
# Sub-stages printed under their stage (indented): the pipeline's and the worker's own timings.
SUBSTAGES = {
    "pre/post": ("- mask", "- model grid", "- threshold", "- map back", "- other"),
    "encode": ("- writers", "- enqueue", "- bookkeeping"),
}
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_cr(rows: int, cols: int, seed: int) -> Any:
    """A CR Image Storage chest radiograph (MONOCHROME1, as CR plates usually are) from the DX generator."""
    ds = make_dx(rows, cols, monochrome1=True, seed=seed, patient_id=f"BENCH-CR{seed}", accession=f"CR{seed}")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.Modality = "CR"
    ds.SeriesDescription = "CR CHEST"
    for keyword in ("PresentationIntentType", "DetectorType", "ImagerPixelSpacing"):
        delattr(ds, keyword)
    return ds


def stages_of(node: NodeProcess, study_uid: str, quiet: float) -> dict[str, float] | None:
    """The study's latency split, once its last result is acknowledged (None until then)."""
    db = node.database()
    try:
        with db.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is None:
                return None
            job = session.scalar(
                select(Job).where(Job.study_id == study.id, Job.status == JobStatus.DONE).order_by(Job.id.desc())
            )
            if job is None or "send" not in (job.timings or {}):
                return None
            last_ack = session.scalar(
                select(func.max(AuditEvent.at)).where(AuditEvent.job_id == job.id, AuditEvent.event_type == "send.ok")
            )
            t = job.timings
            total = (last_ack - study.last_received_at).total_seconds()
            unet = t.get("infer.reconstruct", 0.0)
            worker_rest = t["total"] - t["load"] - t["infer"] - t["encode"]  # enqueue + bookkeeping
            pipeline = [t.get(f"infer.{k}", 0.0) for k in ("mask", "resample", "postprocess", "map_back")]
            return {
                "quiet": quiet,
                "scan lag": (job.created_at - study.last_received_at).total_seconds() - quiet,
                "queue": t["queue_wait"],
                "load": t["load"],
                "u-net": unet,
                "pre/post": t["infer"] - unet,
                "- mask": pipeline[0],
                "- model grid": pipeline[1],
                "- threshold": pipeline[2],
                "- map back": pipeline[3],
                "- other": t["infer"] - unet - sum(pipeline),
                "encode": t["encode"] + worker_rest,
                "- writers": t["encode"],
                "- enqueue": t.get("enqueue", 0.0),
                "- bookkeeping": worker_rest - t.get("enqueue", 0.0),
                "send": t["send"],
                "total": total,
                "overhead": total - quiet - unet,
            }
    finally:
        db.dispose()


def run_study(node: NodeProcess, pacs_port: int, files: list[Path], study_uid: str, quiet: float) -> dict[str, float]:
    storescu(pacs_port, files)
    return wait_for(lambda: stages_of(node, study_uid, quiet), 900, f"study {study_uid} delivered", interval=0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ct-slices", type=int, default=80)
    parser.add_argument("--ct-size", type=int, default=512)
    parser.add_argument("--cr-size", type=int, default=2048)
    parser.add_argument("--preset", default="small", help="random-weight U-Net preset (no bundled model yet)")
    parser.add_argument("--model", default="", help="a .safetensors model instead of a random-weight preset")
    parser.add_argument("--ensemble", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stable-seconds", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, database)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgenode-e2e-"))
    model = Path(args.model) if args.model else make_model(work / f"{args.preset}.safetensors", args.preset)
    node = NodeProcess(
        work / "node",
        model,
        pacs_port=0,
        inference={"ensemble": args.ensemble, "steps": args.steps, "backend": args.backend, "device": args.device},
        # the product's defaults for everything that adds latency, except the quiet period
        sections={
            "stability": {"stable_seconds": args.stable_seconds, "scan_interval_seconds": 1.0},
            "send": {"interval_seconds": 2.0},
            "jobs": {"heartbeat_seconds": 10.0, "lease_seconds": 120.0},
        },
    )
    cases: dict[str, list[tuple[list[Path], str]]] = {"CR": [], "CT": []}
    for k in range(args.repeats + 1):  # the first of each is the warm-up
        cr = make_cr(args.cr_size, args.cr_size, seed=k)
        cases["CR"].append((write_datasets([cr], work / f"cr{k}"), cr.StudyInstanceUID))
        ct = make_ct_series(
            args.ct_slices, args.ct_size, args.ct_size, seed=k, patient_id=f"BENCH-CT{k}", accession=f"CT{k}"
        )
        cases["CT"].append((write_datasets(ct, work / f"ct{k}"), ct[0].StudyInstanceUID))

    measured: dict[str, list[dict[str, float]]] = {"CR": [], "CT": []}
    with routing_pacs(work / "pacs", node.port) as pacs:
        node.pacs_port = pacs.dicom_port
        with node:
            runs = [(kind, k) for k in range(args.repeats + 1) for kind in ("CR", "CT")]
            for kind, k in tqdm(runs, desc="studies", unit="study"):
                files, uid = cases[kind][k]
                stages = run_study(node, pacs.dicom_port, files, uid, args.stable_seconds)
                if k > 0:
                    measured[kind].append(stages)
                tqdm.write(
                    f"{kind} #{k}{' (warm-up)' if k == 0 else ''}: "
                    + ", ".join(f"{s} {v:.2f}" for s, v in stages.items() if not s.startswith("-"))
                )
    print()
    print(
        f"model: {model.name} ({'given' if args.model else f'{args.preset} preset, random weights'}), "
        f"ensemble {args.ensemble}, steps {args.steps}, backend {args.backend}, device {args.device}; "
        f"CR {args.cr_size}x{args.cr_size}, CT {args.ct_slices} x {args.ct_size}x{args.ct_size}; "
        f"median of {args.repeats} (seconds)"
    )
    print("| stage | " + " | ".join(measured) + " |")
    print("|---|" + "---:|" * len(measured))
    for stage in STAGES:
        for row in (stage, *SUBSTAGES.get(stage, ())):
            cells = [f"{statistics.median(r[row] for r in rows):.2f}" for rows in measured.values()]
            print(f"| {row} | " + " | ".join(cells) + " |")
    print(f"\nworking folder: {work}" if args.keep else "")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
