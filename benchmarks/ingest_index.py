"""CPU of the listener's index statements: SQLAlchemy's execution against the driver's cursor (db/driver_statements.py).

    PYTHONPATH=. .venv/bin/python benchmarks/ingest_index.py [--calls 2000] [--folder /dev/shm]

Each statement the listener runs per stored image is run `--calls` times both ways, side by side, in one
transaction that is rolled back (so this is interpreter and SQLite CPU, no flush): through SQLAlchemy's
`Connection.execute` of the same Core statement (what the listener did before) and through `DriverStatement`
(what it does now). Then the listener's own calls, committed: `IngestIndex.add_instances` of one record (the rows
of one image and its commit), `IngestIndex.lookup` (the duplicate check before the file is written) and
`IngestIndex.record_event` (an association's audit event). The database is a SQLite file in `--folder` (default:
/dev/shm where there is one, so that the commits' fsyncs cost no disk time). Times are CPU (process_time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from db.audit import _INSERT_AUDIT  # noqa: E402
from db.driver_statements import DriverStatement  # noqa: E402
from db.ingest import IngestIndex, InstanceRecord, _IngestStatements  # noqa: E402
from db.models import AuditEventType, utcnow  # noqa: E402
from db.session import Database  # noqa: E402

SERIES = "1.2.826.0.1.3680043.2.1125.9.2"
# The instance row's columns that come from the record (the rest: series_id and received_at, set below).
INSTANCE_COLUMNS = ("sop_instance_uid", "sop_class_uid", "instance_number", "transfer_syntax_uid", "path")
INSTANCE_COLUMNS += ("size_bytes", "sha256", "calling_ae")


def record(n: int) -> InstanceRecord:
    return InstanceRecord(
        study_instance_uid="1.2.826.0.1.3680043.2.1125.9.1",
        series_instance_uid=SERIES,
        sop_instance_uid=f"1.2.826.0.1.3680043.2.1125.9.3.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"study/series/{n}.dcm",
        size_bytes=525_000,
        sha256="0" * 64,
        calling_ae="STORESCU",
        patient_id="BENCH",
        modality="CT",
    )


def cpu_us(calls: int, call: Callable[[int], Any]) -> float:
    start = time.process_time()
    for n in range(calls):
        call(n)
    return (time.process_time() - start) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--folder", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgenode-bench-index-", dir=args.folder) as folder:
        db = Database(f"sqlite:///{folder}/edgenode.db")
        index = IngestIndex(db)
        index.add_instances([record(-1)])  # the study and series the statements below refer to
        q = _IngestStatements
        with db.engine.connect() as conn:
            series_id = conn.execute(q.placement.statement, {"study": "", "series": SERIES}).one()[1]
        statements: list[tuple[str, DriverStatement, Callable[[int], dict[str, Any]]]] = [
            ("lookup (SELECT)", q.lookup, lambda n: {"uid": f"9.{n}", "series": SERIES}),
            ("placement (SELECT)", q.placement, lambda n: {"study": "9", "series": SERIES}),
            (
                "instance row (INSERT)",
                q.insert_instance,
                lambda n: {
                    **{k: v for k, v in vars(record(n)).items() if k in INSTANCE_COLUMNS},
                    "series_id": series_id,
                    "received_at": utcnow(),
                },
            ),
            ("series count (UPDATE)", q.count_series, lambda n: {"key": series_id}),
            ("audit event (INSERT)", _INSERT_AUDIT, lambda n: {"event_type": "bench", "detail": str(n)}),
        ]
        rows = [(name, *_side_by_side(db, statement, params, args.calls)) for name, statement, params in statements]
        print("| statement | SQLAlchemy execute (us) | driver cursor (us) | ratio |")
        print("|---|---:|---:|---:|")
        for name, sqlalchemy, driver in rows:
            print(f"| {name} | {sqlalchemy:.1f} | {driver:.1f} | {sqlalchemy / driver:.1f}x |")
        added = cpu_us(args.calls, lambda n: index.add_instances([record(n)]))
        looked = cpu_us(args.calls, lambda n: index.lookup(record(n).sop_instance_uid, SERIES))
        audited = cpu_us(args.calls, lambda n: index.record_event(AuditEventType.ECHO, calling_ae="BENCH"))
        index.close()
        db.dispose()
    print()
    print("| listener call (committed) | CPU per call (us) |")
    print("|---|---:|")
    print(f"| IngestIndex.add_instances (one image's rows) | {added:.1f} |")
    print(f"| IngestIndex.lookup | {looked:.1f} |")
    print(f"| IngestIndex.record_event | {audited:.1f} |")
    return 0


def _side_by_side(
    db: Database, statement: DriverStatement, params: Callable[[int], dict[str, Any]], calls: int
) -> tuple[float, float]:
    """CPU per call of `statement` through SQLAlchemy's execution, then on the driver's cursor; rolled back."""
    with db.engine.connect() as conn:
        transaction = conn.begin()
        sqlalchemy = cpu_us(calls, lambda n: conn.execute(statement.statement, params(n)).close())
        driver = cpu_us(calls, lambda n: statement.run(conn, params(calls + n)))
        transaction.rollback()
    return sqlalchemy, driver


if __name__ == "__main__":
    sys.exit(main())
