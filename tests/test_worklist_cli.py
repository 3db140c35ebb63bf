"""`edgenode worklist` and `edgenode audit` on a database filled by a REAL run of the node.

`edgenode serve` runs as a child process with a tiny random-weight U-Net; dcmtk's storescu sends CT and DX
studies: three routine CTs, one DX from ER_CT (a routing rule makes it STAT), one DX from OFFLINE (its result
port has no listener, so its deliveries dead-letter), one abdomen CT (the chest rule declines it) and one
association from an AE that is not allowed. The node infers, writes SEG, SC and SR and sends them back to
each sender's dcmtk storescp. Nothing is written by hand: scores are whatever the model produced, so the
tests compare the CLI's order with the scores in the database, never with fixed values.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Job, Study
from db.queries import AUDIT_FIELDS, WORKLIST_FIELDS
from db.session import Database
from tests.conftest import edgenode_cmd, node_env
from tests.opsdata import OFFLINE_AE, ServedNode, served_node, store
from tests.peers import StoreSCP

SCORED = ("ACC-A", "ACC-B", "ACC-C", "ACC-OFF")  # routine studies with a job; ACC-STAT is STAT, ACC-ABD has none
SOP_CLASS_KIND = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.7": "sc",
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR
}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, dcmtk) -> Iterator[ServedNode]:
    node = served_node(tmp_path_factory.mktemp("real-run"), web={"enabled": False}, results={"empty_seg": True})
    node.start()
    try:
        for accession, lesion in (("ACC-A", None), ("ACC-B", (600, 2)), ("ACC-C", (900, 6))):
            node.send(accession, f"PAT-{accession[4:]}", lesion=lesion)
        node.send("ACC-OFF", "PAT-OFF", calling_ae=OFFLINE_AE, modality="DX")
        node.send("ACC-STAT", "PAT-STAT", calling_ae="ER_CT", modality="DX")
        node.send("ACC-ABD", "PAT-ABD", body_part="ABDOMEN")
        rogue = node.config.parent / "outgoing" / "ACC-A"
        with pytest.raises(subprocess.CalledProcessError):
            store(node.settings.node.port, sorted(rogue.iterdir())[:1], calling_ae="ROGUE")
        db = Database(node.settings.database_url)
        node.wait_until_settled(db)
        db.dispose()
    finally:
        node.stop()
    yield node


def db_scores(node: ServedNode) -> dict[str, float | None]:
    """Accession -> the score the node's worker stored (read straight from the jobs table)."""
    db = Database(node.settings.database_url)
    try:
        with db.session() as session:
            rows = session.execute(select(Study.accession_number, Job.score).outerjoin(Job, Job.study_id == Study.id))
            return {accession: score for accession, score in rows}
    finally:
        db.dispose()


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


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_worklist_order_follows_the_real_scores(real_run: ServedNode) -> None:
    scores = db_scores(real_run)
    assert all(isinstance(scores[a], float) for a in (*SCORED, "ACC-STAT")) and scores["ACC-ABD"] is None
    assert len({scores[a] for a in SCORED}) == len(SCORED), f"tied scores make the order test weak: {scores}"
    by_score = sorted(SCORED, key=lambda a: -scores[a])  # type: ignore[operator]

    rows = worklist_json(real_run)
    assert [r["accession_number"] for r in rows] == ["ACC-STAT", *by_score, "ACC-ABD"]
    assert all(list(r) == list(WORKLIST_FIELDS) for r in rows)
    assert [r["score"] for r in rows] == [scores[r["accession_number"]] for r in rows]
    by_acc = {r["accession_number"]: r for r in rows}
    stat = by_acc["ACC-STAT"]
    assert stat["priority"] == "stat" and stat["calling_ae"] == "ER_CT" and stat["modality"] == "DX"
    a = by_acc["ACC-A"]
    assert a["study_instance_uid"] == real_run.studies["ACC-A"].study_uid and a["patient_id"] == "PAT-A"
    assert a["status"] == "done" and a["job_status"] == "done" and a["instance_count"] == 3
    assert a["model_id"].startswith("test-tiny-") and a["uncertainty"] is not None and a["uncertainty"] >= 0
    assert a["delivery"] == "sent" and a["results_destination"] == "STORESCU"
    assert a["results_count"] == 3 + 1 + 1  # an SC per slice (3 slices), the SEG (empty_seg) and the SR
    assert by_acc["ACC-OFF"]["delivery"] == "dead" and by_acc["ACC-OFF"]["results_destination"] == OFFLINE_AE
    abdomen = by_acc["ACC-ABD"]  # the chest rule declined it: complete, no job, no score
    assert abdomen["status"] == "complete" and abdomen["job_id"] is None and abdomen["delivery"] == "none"
    assert abdomen["received_at"].endswith("Z") and abdomen["completed_at"] is not None


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_results_really_reached_the_receivers(real_run: ServedNode) -> None:
    """What the worklist calls `sent` is in the sender's storescp: SEG, SC and SR of each study it sent."""
    received: dict[str, dict[str, list[str]]] = {}
    for ae, receiver in real_run.receivers.items():
        for path in receiver.received():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            kinds = received.setdefault(str(ds.AccessionNumber), {})
            kinds.setdefault(SOP_CLASS_KIND.get(str(ds.SOPClassUID), str(ds.SOPClassUID)), []).append(ae)
            assert ds.Manufacturer == "edgenode"
    assert set(received) == {"ACC-A", "ACC-B", "ACC-C", "ACC-STAT"}  # not ACC-OFF (dead), not ACC-ABD (no job)
    for accession in ("ACC-A", "ACC-B", "ACC-C"):
        assert received[accession] == {"seg": ["STORESCU"], "sc": ["STORESCU"] * 3, "sr": ["STORESCU"]}
    assert received["ACC-STAT"] == {"seg": ["ER_CT"], "sc": ["ER_CT"], "sr": ["ER_CT"]}


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_filters_and_formats(real_run: ServedNode) -> None:
    scores = db_scores(real_run)
    by_score = sorted(SCORED, key=lambda a: -scores[a])  # type: ignore[operator]
    assert [r["accession_number"] for r in worklist_json(real_run, "--status", "complete")] == ["ACC-ABD"]
    assert [r["accession_number"] for r in worklist_json(real_run, "--modality", "dx")] == ["ACC-STAT", "ACC-OFF"]
    cut = scores[by_score[1]]
    above = [r["accession_number"] for r in worklist_json(real_run, "--min-score", repr(cut))]
    assert above == [a for a in ("ACC-STAT", *by_score) if scores[a] >= cut]  # type: ignore[operator]
    assert len(worklist_json(real_run, "--since", "1h")) == 6
    assert worklist_json(real_run, "--until", "1h") == []

    table = cli(real_run, "worklist").stdout.splitlines()
    assert table[0].split()[:3] == ["PRIORITY", "SCORE", "UNCERTAINTY"] and table[-1] == "(6 rows)"
    assert "ACC-STAT" in table[1] and by_score[0] in table[2]

    rows = list(csv.DictReader(io.StringIO(cli(real_run, "worklist", "--format", "csv").stdout)))
    assert rows and list(rows[0]) == list(WORKLIST_FIELDS)
    assert rows[1]["accession_number"] == by_score[0] and float(rows[1]["score"]) == pytest.approx(scores[by_score[0]])

    bad = cli(real_run, "worklist", "--status", "nonsense", check=False)
    assert bad.returncode == 2 and "--status" in bad.stderr
    bad = cli(real_run, "worklist", "--since", "last tuesday", check=False)
    assert bad.returncode == 2 and "ISO date" in bad.stderr
    too_far = ("worklist", "--since", "99999999999d")
    for args in (too_far, ("worklist", "--limit", "9" * 23), ("audit", "--limit", "-1")):
        bad = cli(real_run, *args, check=False)  # out of range: a usage error, not a traceback
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, args


def test_read_commands_refuse_a_data_dir_without_a_database(tmp_path: Path) -> None:
    for args in (("worklist",), ("audit",), ("outbound", "list")):
        env = node_env(EDGENODE_NODE__DATA_DIR=str(tmp_path / "typo"))
        done = subprocess.run(edgenode_cmd(*args), env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "no edgenode database at" in done.stderr, args
    assert not (tmp_path / "typo" / "edgenode.db").exists()  # nothing created that would then show "0 rows"


def audit_json(node: ServedNode, *args: str) -> list[dict]:
    return json.loads(cli(node, "audit", "--format", "json", *args).stdout)


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_audit_trail_of_the_real_run(real_run: ServedNode) -> None:
    a = real_run.studies["ACC-A"]
    events = audit_json(real_run, "--accession", "ACC-A")
    assert all(list(e) == list(AUDIT_FIELDS) for e in events)
    types = [e["event_type"] for e in events]
    assert types.count("instance.stored") == a.instances
    assert types.count("result.created") == types.count("send.ok") == 5
    lifecycle = ["study.complete", "job.created", "job.started", "job.done"]
    assert [t for t in types if t in lifecycle] == lifecycle
    assert types.index("job.done") < types.index("send.ok")
    stored = [e for e in events if e["event_type"] == "instance.stored"]
    assert {e["calling_ae"] for e in stored} == {"STORESCU"} and {e["peer_address"] for e in stored} == {"127.0.0.1"}
    assert all(e["study_instance_uid"] == a.study_uid and e["dimse_status"] == 0 for e in stored)
    sent = [e for e in events if e["event_type"] == "send.ok"]
    assert {e["called_ae"] for e in sent} == {"STORESCU"}  # results go back to the sender (no rule destination)
    assert {e["dimse_status"] for e in sent} == {0}

    assert {e["study_instance_uid"] for e in audit_json(real_run, "--patient-id", "PAT-STAT")} == {
        real_run.studies["ACC-STAT"].study_uid
    }
    by_uid = audit_json(real_run, "--study-uid", a.study_uid, "--event-type", "instance.")
    assert {e["event_type"] for e in by_uid} == {"instance.stored"} and len(by_uid) == a.instances
    rejected = audit_json(real_run, "--ae", "ROGUE")
    assert [e["event_type"] for e in rejected] == ["association.rejected"]
    assert rejected[0]["outcome"] == "failure" and "ROGUE" in rejected[0]["detail"]
    assert {e["calling_ae"] for e in audit_json(real_run, "--ae", "ER_CT", "--event-type", "instance.stored")} == {
        "ER_CT"
    }
    assert audit_json(real_run, "--until", "1h") == []
    dead = audit_json(real_run, "--event-type", "send.dead")
    assert {e["study_instance_uid"] for e in dead} == {real_run.studies["ACC-OFF"].study_uid}
    assert len(dead) == 3  # SEG, SC and SR of the one DX image
    retried = audit_json(real_run, "--event-type", "send.retry", "--ae", OFFLINE_AE)
    assert len(retried) == 3 * (real_run.settings.send.max_attempts - 1)  # every try but the last, per object
    assert all(e["outcome"] == "failure" for e in retried)

    rows = list(csv.DictReader(io.StringIO(cli(real_run, "audit", "--format", "csv", "--ae", "ROGUE").stdout)))
    assert list(rows[0]) == list(AUDIT_FIELDS) and rows[0]["event_type"] == "association.rejected"
    table = cli(real_run, "audit", "--accession", "ACC-B").stdout
    assert table.startswith("AT") and "instance.stored" in table and "send.ok" in table
    bad = cli(real_run, "audit", "--since", "whenever", check=False)
    assert bad.returncode == 2 and "ISO date" in bad.stderr


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_dead_letters_retried_once_the_destination_is_back(real_run: ServedNode) -> None:
    """The operator guide's fix for dead letters, for real: start a receiver on OFFLINE's port, then
    `edgenode outbound retry --all-dead` and `edgenode outbound send`. Runs last: it changes the delivery state."""
    assert worklist_json(real_run, "--modality", "dx")[1]["delivery"] == "dead"
    peer = real_run.settings.peer(OFFLINE_AE)
    assert peer is not None
    with StoreSCP(real_run.config.parent / "received" / OFFLINE_AE, aet=OFFLINE_AE, port=peer.port) as receiver:
        assert cli(real_run, "outbound", "retry", "--all-dead").stdout.startswith("requeued 3 item(s)")
        assert cli(real_run, "outbound", "send").stdout.strip() == "sent 3, to retry 0, dead 0"
        received = receiver.received()
    off = next(r for r in worklist_json(real_run) if r["accession_number"] == "ACC-OFF")
    assert off["delivery"] == "sent" and len(received) == off["results_count"] == 3
    requeued = audit_json(real_run, "--event-type", "send.requeued", "--accession", "ACC-OFF")
    assert len(requeued) == 3
