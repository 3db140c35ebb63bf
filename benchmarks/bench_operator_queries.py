"""How long the operator surfaces take on a large database: worklist, audit search, study page, /metrics.

Fills a fresh SQLite database with N studies (rows only: 3 instances, a done job with timings, 2 SC
results each delivered; every event audited), then times each read path several times and prints a table.

    PYTHONPATH=. python benchmarks/bench_operator_queries.py --studies 5000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from prometheus_client import generate_latest
from tqdm import tqdm

from db.models import (
    AuditEvent,
    Instance,
    Job,
    JobStatus,
    OutboundItem,
    OutboundStatus,
    Result,
    Series,
    Study,
    StudyStatus,
    utcnow,
)
from db.queries import AuditFilter, WorklistFilter, audit_events, study_detail, worklist
from db.session import Database
from node.config import load_settings
from node.metrics import build_registry


def fill(db: Database, n: int, batch: int = 500) -> list[str]:
    now = utcnow()
    uids = []
    for start in tqdm(range(0, n, batch), desc="filling", unit="batch"):
        with db.session() as session:
            for k in range(start, min(n, start + batch)):
                at = now - timedelta(minutes=k)
                uid = f"1.2.3.{k}"
                uids.append(uid)
                study = Study(
                    study_instance_uid=uid,
                    patient_id=f"P{k % 997}",
                    accession_number=f"A{k}",
                    status=StudyStatus.DONE,
                    first_received_at=at,
                    last_received_at=at,
                    instance_count=3,
                )
                series = Series(study=study, series_instance_uid=f"{uid}.1", modality="CT" if k % 3 else "DX")
                session.add_all([study, series])
                for i in range(3):
                    sop = f"{uid}.1.{i}"
                    session.add(
                        Instance(
                            series=series,
                            sop_instance_uid=sop,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path=f"{uid}/{uid}.1/{sop}.dcm",
                            size_bytes=1000,
                            sha256="0" * 64,
                        )
                    )
                    session.add(
                        AuditEvent(event_type="instance.stored", study_instance_uid=uid, patient_id=f"P{k % 997}")
                    )
                job = Job(
                    study=study,
                    status=JobStatus.DONE,
                    score=(k * 7919 % 1000) / 1000,
                    uncertainty=0.01,
                    timings={"queue_wait": 0.5, "infer": 2.0 + k % 5, "infer.reconstruct": 1.9 + k % 5, "encode": 0.2},
                )
                session.add(job)
                for r in range(2):
                    res = Result(
                        job=job,
                        kind="sc",
                        sop_instance_uid=f"{uid}.9.{r}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                        series_instance_uid=f"{uid}.9",
                        path=f"results/{uid}/{r}.dcm",
                    )
                    session.add(res)
                    session.add(
                        OutboundItem(
                            result=res, destination_ae="PACS", host="127.0.0.1", port=4242, status=OutboundStatus.SENT
                        )
                    )
                    session.add(AuditEvent(event_type="send.ok", study_instance_uid=uid))
    return uids


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(None, node={"data_dir": folder})
        db = Database(settings.database_url)
        uids = fill(db, args.studies)
        registry = build_registry(settings, db)

        def in_session(fn: Callable[..., object], *a: object) -> Callable[[], object]:
            def run() -> object:
                with db.session() as session:
                    return fn(session, *a)

            return run

        cases = [
            ("worklist, default limit 500", in_session(worklist, WorklistFilter())),
            (
                "worklist, --modality DX --min-score 0.9",
                in_session(worklist, WorklistFilter(modality="DX", min_score=0.9)),
            ),
            ("worklist, --since 24h", in_session(worklist, WorklistFilter(since=utcnow() - timedelta(hours=24)))),
            ("audit, --patient-id (indexed + study join)", in_session(audit_events, AuditFilter(patient_id="P5"))),
            ("audit, --event-type send. (latest 1000)", in_session(audit_events, AuditFilter(event_type="send."))),
            ("study detail (study page / API)", in_session(study_detail, uids[len(uids) // 2])),
            ("/metrics scrape", lambda: generate_latest(registry)),
        ]
        print(f"\n{args.studies} studies, {args.studies * 5} audit events, median/max of {args.repeats} runs\n")
        print(f"| {'query':<44} | median ms | max ms |")
        print(f"|{'-' * 46}|-----------|--------|")
        for name, fn in cases:
            median, worst = timed(fn, args.repeats)
            print(f"| {name:<44} | {median * 1000:9.1f} | {worst * 1000:6.1f} |")
        db.dispose()
        Path(folder)


if __name__ == "__main__":
    main()
