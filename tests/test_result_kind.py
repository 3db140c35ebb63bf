"""Result kinds are an enum in the code and the same plain strings in the database, the CLI and the REST API."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, text

from db.models import Job, Result, ResultKind, Study
from db.outbound import add_outbound, upsert_result
from db.session import Database
from tests.conftest import edgenode_cmd, node_env

STORED = {  # what existing databases hold and what sites' scripts read: never change these
    "SEG": "seg",
    "SEG_ANOMALY": "seg-anomaly",
    "SEG_UNCERTAINTY": "seg-uncertainty",
    "SC": "sc",
    "SR": "sr",
}


def test_kinds_keep_their_stored_values() -> None:
    assert {kind.name: kind.value for kind in ResultKind} == STORED
    assert all(str(kind) == kind.value and f"{kind}" == kind.value for kind in ResultKind)


def add_one_result_per_kind(db: Database) -> None:
    """A job with one queued result of each kind, through db.outbound as the node's writer queues them."""
    with db.session() as session:
        job = Job(study=Study(study_instance_uid="1.2.3"), destination_ae="PACS", status="done")
        session.add(job)
        session.flush()
        for n, kind in enumerate(ResultKind):
            result = upsert_result(
                session,
                job_id=job.id,
                kind=kind,
                sop_instance_uid=f"1.2.3.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                series_instance_uid="1.2.3.9",
                path=f"results/{n}.dcm",
                size_bytes=1,
            )
            add_outbound(session, result, "PACS", "127.0.0.1", 4242, datetime.now(UTC))


def test_the_column_holds_the_plain_strings_and_reads_back_as_kinds(database_url: str) -> None:
    db = Database(database_url)
    try:
        add_one_result_per_kind(db)
        with db.engine.connect() as conn:
            raw = conn.execute(text("SELECT kind FROM results ORDER BY id")).scalars().all()
        assert raw == list(STORED.values()) and all(type(value) is str for value in raw)
        with db.session() as session:
            kinds = session.scalars(select(Result.kind).order_by(Result.id)).all()
            assert kinds == list(ResultKind) and all(isinstance(kind, ResultKind) for kind in kinds)
            assert session.scalars(select(Result.sop_instance_uid).where(Result.kind == "sc")).all() == ["1.2.3.3"]
    finally:
        db.dispose()


def test_outbound_list_prints_the_same_strings_in_every_format(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'var' / 'edgenode.db'}")
    add_one_result_per_kind(db)
    db.dispose()
    config = tmp_path / "edgenode.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')

    def listed(fmt: str) -> str:
        command = edgenode_cmd("outbound", "list", "--format", fmt, "--config", str(config))
        proc = subprocess.run(command, env=node_env(), capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert sorted(row["kind"] for row in json.loads(listed("json"))) == sorted(STORED.values())
    assert sorted(row["kind"] for row in csv.DictReader(io.StringIO(listed("csv")))) == sorted(STORED.values())
    table = [line.split() for line in listed("table").splitlines()[1:]]
    assert sorted(cells[3] for cells in table) == sorted(STORED.values())  # id status destination kind ...
