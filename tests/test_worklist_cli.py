"""`edgenode worklist` and `edgenode audit` on a database filled by a REAL run of the node.

`edgenode serve` runs as a child process; dcmtk's storescu sends CT and DX studies (one from ER_CT,
which a routing rule makes STAT, one from an AE that is not allowed); the stability scan creates the
jobs. The inference/results/send path belongs to other issues, so scores, heatmaps and deliveries of
finished jobs are added through the db models (tests/opsdata.record_inference_outcome) ON TOP of the
real run, after the node has stopped.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess

import pytest

from db.models import OutboundStatus
from db.queries import AUDIT_FIELDS, WORKLIST_FIELDS
from db.session import Database
from tests.conftest import edgenode_cmd, node_env
from tests.opsdata import ServedNode, record_inference_outcome, served_node, store


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, dcmtk) -> ServedNode:
    node = served_node(tmp_path_factory.mktemp("real-run"))
    node.start()
    try:
        node.send("ACC-HIGH", "PAT-HIGH")
        node.send("ACC-LOW", "PAT-LOW")
        node.send("ACC-WAIT", "PAT-WAIT")
        node.send("ACC-DX", "PAT-DX", modality="DX")
        node.send("ACC-STAT", "PAT-STAT", calling_ae="ER_CT", modality="DX")
        rogue = node.config.parent / "outgoing" / "ACC-HIGH"
        with pytest.raises(subprocess.CalledProcessError):
            store(node.settings.node.port, sorted(rogue.iterdir())[:1], calling_ae="ROGUE")
        db = Database(node.settings.database_url)
        node.wait_until_judged(db)
    finally:
        node.stop()
    spool = node.settings.spool_dir
    outcome = {"ACC-HIGH": 0.91, "ACC-LOW": 0.15, "ACC-DX": 0.42, "ACC-STAT": 0.05}
    for accession, score in outcome.items():
        delivery = OutboundStatus.DEAD if accession == "ACC-DX" else OutboundStatus.SENT
        uid = node.studies[accession].study_uid
        record_inference_outcome(db, spool, uid, score=score, uncertainty=score / 10, delivery=delivery)
    db.dispose()
    return node


def cli(node: ServedNode, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        edgenode_cmd(*args, "--config", str(node.config)),
        env=node_env(),
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def worklist_json(node: ServedNode, *args: str) -> list[dict]:
    return json.loads(cli(node, "worklist", "--format", "json", *args).stdout)


def test_order_and_fields_from_the_real_run(real_run: ServedNode) -> None:
    rows = worklist_json(real_run)
    accessions = [r["accession_number"] for r in rows]
    assert accessions == ["ACC-STAT", "ACC-HIGH", "ACC-DX", "ACC-LOW", "ACC-WAIT"]
    assert all(list(r) == list(WORKLIST_FIELDS) for r in rows)
    by_acc = {r["accession_number"]: r for r in rows}
    stat, waiting = by_acc["ACC-STAT"], by_acc["ACC-WAIT"]
    assert stat["priority"] == "stat" and stat["calling_ae"] == "ER_CT" and stat["modality"] == "DX"
    # What the listener stored and the stability scan decided, untouched by the test helper:
    assert waiting["study_instance_uid"] == real_run.studies["ACC-WAIT"].study_uid
    assert waiting["patient_id"] == "PAT-WAIT" and waiting["modality"] == "CT" and waiting["instance_count"] == 3
    assert waiting["status"] == "queued" and waiting["job_status"] == "queued" and waiting["score"] is None
    assert waiting["received_at"].endswith("Z") and waiting["completed_at"] is not None
    assert by_acc["ACC-HIGH"]["delivery"] == "sent" and by_acc["ACC-HIGH"]["results_destination"] == "STORESCU"
    assert by_acc["ACC-DX"]["delivery"] == "dead"


def test_filters_and_formats(real_run: ServedNode) -> None:
    assert [r["accession_number"] for r in worklist_json(real_run, "--status", "queued")] == ["ACC-WAIT"]
    assert [r["accession_number"] for r in worklist_json(real_run, "--modality", "dx")] == ["ACC-STAT", "ACC-DX"]
    assert [r["accession_number"] for r in worklist_json(real_run, "--min-score", "0.4")] == ["ACC-HIGH", "ACC-DX"]
    assert len(worklist_json(real_run, "--since", "1h")) == 5
    assert worklist_json(real_run, "--until", "1h") == []

    table = cli(real_run, "worklist").stdout.splitlines()
    assert table[0].split()[:3] == ["PRIORITY", "SCORE", "UNCERTAINTY"] and table[-1] == "(5 rows)"
    assert "ACC-STAT" in table[1] and "ACC-HIGH" in table[2]

    rows = list(csv.DictReader(io.StringIO(cli(real_run, "worklist", "--format", "csv").stdout)))
    assert rows and list(rows[0]) == list(WORKLIST_FIELDS)
    assert rows[1]["accession_number"] == "ACC-HIGH" and float(rows[1]["score"]) == pytest.approx(0.91)

    bad = cli(real_run, "worklist", "--status", "nonsense", check=False)
    assert bad.returncode == 2 and "--status" in bad.stderr
    bad = cli(real_run, "worklist", "--since", "last tuesday", check=False)
    assert bad.returncode == 2 and "ISO date" in bad.stderr


def audit_json(node: ServedNode, *args: str) -> list[dict]:
    return json.loads(cli(node, "audit", "--format", "json", *args).stdout)


def test_audit_trail_of_the_real_run(real_run: ServedNode) -> None:
    high = real_run.studies["ACC-HIGH"]
    events = audit_json(real_run, "--accession", "ACC-HIGH")
    assert all(list(e) == list(AUDIT_FIELDS) for e in events)
    types = [e["event_type"] for e in events]
    assert types.count("instance.stored") == high.instances
    assert {"study.complete", "job.created", "job.done", "result.created", "send.ok"} <= set(types)
    stored = [e for e in events if e["event_type"] == "instance.stored"]
    assert {e["calling_ae"] for e in stored} == {"STORESCU"} and {e["peer_address"] for e in stored} == {"127.0.0.1"}
    assert all(e["study_instance_uid"] == high.study_uid and e["dimse_status"] == 0 for e in stored)
    sent = next(e for e in events if e["event_type"] == "send.ok")
    assert sent["called_ae"] == "STORESCU"  # results go back to the sender (the rule has no destination)

    assert {e["study_instance_uid"] for e in audit_json(real_run, "--patient-id", "PAT-STAT")} == {
        real_run.studies["ACC-STAT"].study_uid
    }
    by_uid = audit_json(real_run, "--study-uid", high.study_uid, "--event-type", "instance.")
    assert {e["event_type"] for e in by_uid} == {"instance.stored"} and len(by_uid) == high.instances
    rejected = audit_json(real_run, "--ae", "ROGUE")
    assert [e["event_type"] for e in rejected] == ["association.rejected"]
    assert rejected[0]["outcome"] == "failure" and "ROGUE" in rejected[0]["detail"]
    assert {e["calling_ae"] for e in audit_json(real_run, "--ae", "ER_CT", "--event-type", "instance.stored")} == {
        "ER_CT"
    }
    assert audit_json(real_run, "--until", "1h") == []
    dead = audit_json(real_run, "--event-type", "send.dead")
    assert [e["study_instance_uid"] for e in dead] == [real_run.studies["ACC-DX"].study_uid]

    rows = list(csv.DictReader(io.StringIO(cli(real_run, "audit", "--format", "csv", "--ae", "ROGUE").stdout)))
    assert list(rows[0]) == list(AUDIT_FIELDS) and rows[0]["event_type"] == "association.rejected"
    table = cli(real_run, "audit", "--accession", "ACC-LOW").stdout
    assert table.startswith("AT") and "instance.stored" in table
    bad = cli(real_run, "audit", "--since", "whenever", check=False)
    assert bad.returncode == 2 and "ISO date" in bad.stderr
