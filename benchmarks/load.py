"""Bounded load: N studies from S concurrent senders straight into `edgenode serve`, results to a real Orthanc.

Each sender is a dcmtk storescu process (one association per study, its own calling AE, all allowed peers);
a routing rule sends every study's results to the PACS (Orthanc). The script waits until every study's job is
done and every result is in Orthanc, sampling the resident memory (RSS) of serve and its worker processes
with psutil every 0.25 s. Bounded means: the peak does not grow with the number of studies processed (the
slope of RSS against studies done, after the first few, is ~0).

Run: PYTHONPATH=. python benchmarks/load.py [--studies 20] [--senders 4] [--preset tiny]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select  # noqa: E402

from db.models import Job, JobStatus, OutboundItem, OutboundStatus, Result  # noqa: E402
from node.local_orthanc import Orthanc, free_port  # noqa: E402
from tests.dicomgen import make_ct_series, make_dx, write_datasets  # noqa: E402
from tests.e2e_support import PACS_AET, NodeProcess, make_model, node_results_in_pacs, storescu  # noqa: E402


def make_studies(work: Path, count: int, ct_slices: int, ct_size: int, dx_size: int) -> list[tuple[str, list[Path]]]:
    """Every fourth study a DX radiograph, the others CT series; (study UID, files)."""
    studies = []
    for k in range(count):
        if k % 4 == 3:
            ds = make_dx(dx_size, dx_size, seed=k, patient_id=f"LOAD{k:03d}", accession=f"L{k:03d}")
            studies.append((str(ds.StudyInstanceUID), write_datasets([ds], work / f"s{k:03d}")))
        else:
            series = make_ct_series(
                ct_slices, ct_size, ct_size, seed=k, patient_id=f"LOAD{k:03d}", accession=f"L{k:03d}"
            )
            studies.append((str(series[0].StudyInstanceUID), write_datasets(series, work / f"s{k:03d}")))
    return studies


class RssSampler:
    """Samples the summed RSS of a process and its descendants, with the number of studies done at the time."""

    def __init__(self, pid: int, done: list[int], interval: float = 0.25) -> None:
        self.root = psutil.Process(pid)
        self.done = done  # done[0] is updated by the main thread
        self.interval = interval
        self.samples: list[tuple[float, int, float, int]] = []  # (t, studies done, total MB, processes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval):
            procs = [self.root, *self.root.children(recursive=True)]
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.samples.append((time.monotonic() - start, self.done[0], total / 2**20, len(procs)))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def progress(node: NodeProcess) -> tuple[int, int, int]:
    """(jobs done, jobs failed, outbound items still pending)."""
    db = node.database()
    try:
        with db.session() as session:
            done = session.scalar(select(func.count(Job.id)).where(Job.status == JobStatus.DONE)) or 0
            failed = session.scalar(select(func.count(Job.id)).where(Job.status == JobStatus.FAILED)) or 0
            pending = (
                session.scalar(select(func.count(OutboundItem.id)).where(OutboundItem.status != OutboundStatus.SENT))
                or 0
            )
            return done, failed, pending
    finally:
        db.dispose()


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--ct-slices", type=int, default=40)
    parser.add_argument("--ct-size", type=int, default=256)
    parser.add_argument("--dx-size", type=int, default=1024)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--ensemble", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgenode-load-"))
    model = make_model(work / f"{args.preset}.safetensors", args.preset)
    studies = make_studies(work / "studies", args.studies, args.ct_slices, args.ct_size, args.dx_size)
    senders = [f"MODALITY{k + 1}" for k in range(args.senders)]
    node = NodeProcess(
        work / "node",
        model,
        pacs_port=0,
        inference={"ensemble": args.ensemble, "steps": args.steps, "backend": args.backend},
        sections={"routing": [{"name": "chest", "destination": PACS_AET}], "results": {"empty_seg": True}},
    )
    with Orthanc(work / "pacs", aet=PACS_AET) as pacs:
        node.pacs_port = pacs.dicom_port
        node.sections["peers"] = [
            {"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.dicom_port},
            *({"ae_title": ae, "host": "127.0.0.1", "port": free_port()} for ae in senders),
        ]
        with node:
            done = [0]
            assert node.proc is not None
            errors: list[str] = []

            def send(k: int) -> None:
                for uid, files in studies[k :: args.senders]:
                    try:
                        storescu(node.port, files, calling_ae=senders[k], called_ae="EDGENODE")
                    except Exception as exc:  # noqa: BLE001 - reported below
                        errors.append(f"{senders[k]} study {uid}: {exc}")

            with RssSampler(node.proc.pid, done) as sampler:
                started = time.monotonic()
                threads = [threading.Thread(target=send, args=(k,)) for k in range(args.senders)]
                for thread in threads:
                    thread.start()
                with tqdm(total=args.studies, desc="studies done", unit="study") as bar:
                    while True:
                        jobs_done, failed, pending = progress(node)
                        bar.update(jobs_done - done[0])
                        done[0] = jobs_done
                        if (
                            jobs_done + failed >= args.studies
                            and pending == 0
                            and not any(t.is_alive() for t in threads)
                        ):
                            break
                        if time.monotonic() - started > args.timeout:
                            raise TimeoutError(f"{jobs_done} of {args.studies} studies done after {args.timeout} s")
                        time.sleep(0.5)
                elapsed = time.monotonic() - started
                time.sleep(2)  # a few idle samples after the last study
            for thread in threads:
                thread.join()
            db = node.database()
            try:
                with db.session() as session:
                    results = session.scalar(select(func.count(Result.id))) or 0
                    timings = [t for t in session.scalars(select(Job.timings).where(Job.status == JobStatus.DONE))]
            finally:
                db.dispose()
        missing = 0
        in_pacs = 0
        for uid, _ in studies:
            held = sum(len(s["sop_instance_uids"]) for s in node_results_in_pacs(pacs, uid))
            in_pacs += held
            missing += held == 0

    samples = sampler.samples
    peak = max(s[2] for s in samples)
    warm = [(s[1], s[2]) for s in samples if s[1] >= min(3, args.studies)]
    per_study = slope(warm) if len(warm) > 2 else float("nan")
    by_done: dict[int, float] = {}
    for _, n, mb, _ in samples:
        by_done[n] = max(by_done.get(n, 0.0), mb)
    print()
    print(
        f"{args.studies} studies ({args.ct_slices}-slice {args.ct_size}^2 CT, every 4th a {args.dx_size}^2 DX) from "
        f"{args.senders} concurrent storescu senders; {args.preset} preset (random weights), ensemble "
        f"{args.ensemble}, steps {args.steps}, backend {args.backend}; 1 worker"
    )
    print(
        f"send errors: {len(errors)}; jobs done: {done[0]}, failed: {failed}; results: {results} in the node, "
        f"{in_pacs} in Orthanc; studies without results in Orthanc: {missing}"
    )
    print(
        f"wall time {elapsed:.1f} s ({args.studies / elapsed * 60:.1f} studies/min); "
        f"median job time {statistics.median(t['total'] for t in timings):.2f} s, "
        f"median queue wait {statistics.median(t['queue_wait'] for t in timings):.2f} s"
    )
    print(
        f"RSS of serve + workers: peak {peak:.0f} MB over {len(samples)} samples; slope after study 3: "
        f"{per_study:+.2f} MB/study"
    )
    print("| studies done | peak RSS (MB) |")
    print("|---:|---:|")
    for n in sorted(by_done):
        if n in (0, 1, 2, 3) or n % 5 == 0 or n == max(by_done):
            print(f"| {n} | {by_done[n]:.0f} |")
    for error in errors:
        print("ERROR", error)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not errors and missing == 0 and failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
