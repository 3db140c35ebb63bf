"""Chaos across two nodes: two real `edgenode serve` (each its own data folder and ports) on one real PostgreSQL and
one shared spool, a real Orthanc as the PACS they both send their results to, 20 studies split across them.

Node A is killed with `kill -9` (the serve process; its workers end on their own, node/parent_watch.py) first while
one of its workers is analysing a study, and, after a restart, again while its sender holds claims on results it is
sending. Each time the test checks in the database, right before the kill, that A is in that state, and afterwards
that the kill took it there (the killed attempt made no results; the claims were still A's when it died). The
nodes' link to the PACS is slow (tests/slow_link.py: a TCP relay that delays each chunk) so that a sending pass
lasts long enough to be interrupted. After A's last restart: every study analysed once (one job, done, one result
set), every result object at Orthanc exactly once (its SOP Instance UIDs against the results table: duplicates 0,
lost 0), and each study's audit trail complete (received, job, sent).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.models import AuditEvent, AuditEventType, Job, JobStatus, OutboundItem, OutboundStatus, Result, Study
from db.session import Database
from node.identity import boot_id, node_identity
from node.local_orthanc import Orthanc
from tests.dicomgen import make_ct_series, write_datasets
from tests.e2e_support import NODE_AET, PACS_AET, NodeProcess, make_model, storescu, wait_for
from tests.ports import free_port
from tests.slow_link import SlowLink

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]  # two real nodes, one killed twice during a real run

STUDIES = 20
SLICES = 4
OBJECTS = SLICES + 2  # per study: one heatmap SC per slice (heatmap_slices = 0), a SEG (empty_seg) and the SR
LINK_DELAY = 0.03  # seconds each chunk spends on the node <-> PACS link: ~0.1 s per result object
SEND_LEASE = 30.0  # [send] lease_seconds: longer than A's restart, so nobody else takes A's claims meanwhile


@dataclass(frozen=True)
class Claim:
    """What a node held in the database at one moment: a running job or an outbound item, and by whom."""

    id: int
    owner: str
    study_instance_uid: str


LISTENERS = 2  # listener processes per node (fixed: `auto` depends on the machine's cores)


def two_nodes(tmp_path: Path, model: Path, database_url: str, pacs_port: int) -> tuple[NodeProcess, NodeProcess]:
    """Nodes A and B: own data folders (fixed instance ids, so the test knows their identities), one database, one
    spool, results to the PACS through `pacs_port`."""
    shared = {
        "node": {
            "spool_dir": str(tmp_path / "shared-spool"),
            "acse_timeout": 5.0,
            "dimse_timeout": 10.0,
            "network_timeout": 10.0,
            "listeners": LISTENERS,
        },
        "database": {"url": database_url},
        "inference": {"ensemble": 2, "steps": 6},  # seconds of analysis per study: room to kill a worker mid-way
        "results": {"heatmap_slices": 0, "empty_seg": True},
        "send": {"lease_seconds": SEND_LEASE},
        "jobs": {"heartbeat_seconds": 1.0, "lease_seconds": 10.0, "retry_backoff_seconds": 1.0},
    }
    nodes = []
    for name, instance in (("a", "aaaaaaaa"), ("b", "bbbbbbbb")):
        node = NodeProcess(tmp_path / f"node-{name}", model, pacs_port, sections=shared, radiograph_model=False)
        node.data_dir.mkdir(parents=True)
        (node.data_dir / "node-id").write_text(instance + "\n")
        nodes.append(node)
    return nodes[0], nodes[1]


def start_together(*nodes: NodeProcess) -> None:
    marks = [node.launch() for node in nodes]
    for node, mark in zip(nodes, marks, strict=True):
        node.wait_ready(mark, timeout=180)


def running_without_results(db: Database, identity: str) -> list[Claim]:
    """Jobs a worker of the node `identity` is running that have made no result yet (it is analysing)."""
    with db.session() as s:
        rows = s.execute(
            select(Job.id, Job.lease_owner, Study.study_instance_uid)
            .join(Study, Study.id == Job.study_id)
            .where(
                Job.status == JobStatus.RUNNING,
                Job.lease_owner.startswith(identity + "/"),
                ~select(Result.id).where(Result.job_id == Job.id).exists(),
            )
        ).all()
    return [Claim(job_id, str(owner), uid) for job_id, owner, uid in rows]


def pending_claimed_by(db: Database, owner: str) -> list[Claim]:
    """Outbound items still unsent that the sender `owner` has claimed (it is sending them)."""
    with db.session() as s:
        rows = s.execute(
            select(OutboundItem.id, OutboundItem.lease_owner, Study.study_instance_uid)
            .join(Result, Result.id == OutboundItem.result_id)
            .join(Job, Job.id == Result.job_id)
            .join(Study, Study.id == Job.study_id)
            .where(OutboundItem.status == OutboundStatus.PENDING, OutboundItem.lease_owner == owner)
        ).all()
    return [Claim(item_id, str(owner), uid) for item_id, owner, uid in rows]


def all_delivered(db: Database) -> bool:
    """Every study has a done job and every result of the run is acknowledged by the PACS."""
    with db.session() as s:
        done = s.scalars(select(Job.study_id).where(Job.status == JobStatus.DONE)).all()
        states = s.scalars(select(OutboundItem.status)).all()
    return len(set(done)) == STUDIES and len(states) == STUDIES * OBJECTS and set(states) == {OutboundStatus.SENT}


def events_of(db: Database) -> list[AuditEvent]:
    with db.session() as s:
        events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())
        s.expunge_all()
    return events


def attempt_made_results(events: list[AuditEvent], job_id: int, owner: str) -> list[str]:
    """The events the attempt of `job_id` by `owner` produced after it started, up to the job's next start: what a
    worker killed mid-analysis must not have got to (results, done)."""
    ours = [e for e in events if e.job_id == job_id]
    start = next(i for i, e in enumerate(ours) if e.event_type == AuditEventType.JOB_STARTED and owner in e.detail)
    made = []
    for event in ours[start + 1 :]:
        if event.event_type == AuditEventType.JOB_STARTED:
            break
        if event.event_type in (AuditEventType.RESULT_CREATED, AuditEventType.JOB_DONE):
            made.append(event.event_type)
    return made


def test_two_nodes_one_killed_mid_analysis_and_mid_send_every_study_once_every_result_once(
    tmp_path: Path, postgres_url: str
) -> None:
    model = make_model(tmp_path / "tiny.safetensors")
    studies = [
        make_ct_series(SLICES, 64, 64, patient_id=f"CHAOS{n:02d}", accession=f"CHAOS{n:02d}", seed=n)
        for n in range(STUDIES)
    ]
    files = [write_datasets(ct, tmp_path / "studies" / f"{n:02d}") for n, ct in enumerate(studies)]
    study_uids = {str(ct[0].StudyInstanceUID) for ct in studies}
    waves = [files[: STUDIES // 2], files[STUDIES // 2 :]]  # half before the first kill, half after the restart

    with (
        Orthanc(tmp_path / "pacs", aet=PACS_AET, dicom_port=free_port(), http_port=free_port()) as pacs,
        SlowLink(pacs.dicom_port, LINK_DELAY) as link,
    ):
        a, b = two_nodes(tmp_path, model, postgres_url, link.port)
        a_id, b_id = node_identity(a.data_dir), node_identity(b.data_dir)
        db: Database | None = None
        try:
            start_together(a, b)
            db = Database(postgres_url, run_migrations=False)

            def send_wave(wave: list[list[Path]]) -> None:
                """Each study to one node in turn (as the PACS would route them), as the PACS: results go back to it."""
                half = len(wave) // 2
                for node, part in ((a, wave[:half]), (b, wave[half:])):
                    storescu(node.port, [f for study in part for f in study], calling_ae=PACS_AET, called_ae=NODE_AET)

            # 1. Kill A while one of its workers analyses a study (running, no result yet), checked right before.
            send_wave(waves[0])
            analysing = wait_for(lambda: running_without_results(db, a_id), 120, "node A analysing a study", 0.05)
            a.wait_gone(a.kill_serve())
            # The parent watch ends A's worker and each of its listener processes, one log line each.
            gone = a.log_text().count("is gone: stopping")
            assert gone == 1 + LISTENERS, f"A's worker and listeners did not all end through the parent watch ({gone})"

            # 2. Restarted, A gets the second half; killed while its sender holds claims on unsent results.
            a.start(timeout=180)
            send_wave(waves[1])
            assert a.proc is not None
            a_sender = f"{a_id}/{boot_id()}.{a.proc.pid}-send"  # node.identity.sender_owner of A's serve process
            wait_for(lambda: len(pending_claimed_by(db, a_sender)) >= 2, 120, "node A sending results", 0.02)
            sending_claims = pending_claimed_by(db, a_sender)
            workers = a.kill_serve()
            # Its claims outlive it (nobody takes them before [send] lease_seconds; A's restart gives them back), so
            # what it still holds now is what it held when it died: the kill came while A was sending, not after.
            held_at_kill = pending_claimed_by(db, a_sender)
            assert held_at_kill, f"A's sender had finished its claims {sending_claims} before the kill"
            a.wait_gone(workers)
            gone = a.log_text().count("is gone: stopping")
            assert gone == 2 * (1 + LISTENERS), (
                f"A's worker and listeners did not all end through the parent watch ({gone})"
            )

            # 3. Restarted again: everything is analysed and delivered.
            a.start(timeout=180)
            wait_for(lambda: all_delivered(db), 240, "every study analysed and every result delivered", 0.5)
        finally:
            for node in (a, b):
                node.stop()
        assert db is not None
        events = events_of(db)
        with db.session() as s:
            jobs = list(s.execute(select(Job.id, Study.study_instance_uid, Job.status).join(Study)).all())
            results = list(
                s.execute(
                    select(
                        Result.sop_instance_uid,
                        Result.series_instance_uid,
                        Result.kind,
                        Job.id,
                        Study.study_instance_uid,
                    )
                    .join(Job, Job.id == Result.job_id)
                    .join(Study, Study.id == Job.study_id)
                ).all()
            )
        db.dispose()
        at_pacs: list[dict[str, Any]] = pacs.get("/instances?expand")
        series_of = {
            i: s["MainDicomTags"]["SeriesInstanceUID"] for s in pacs.get("/series?expand") for i in s["Instances"]
        }

    # The kills happened in the intended states.
    killed_job = analysing[0]
    made = attempt_made_results(events, killed_job.id, killed_job.owner)
    assert made == [], f"the attempt killed 'mid-analysis' had already made {made}"

    # Every study analysed exactly once: one job, done, and all its results from that job.
    jobs_per_study = Counter(uid for _, uid, _ in jobs)
    assert set(jobs_per_study) == study_uids and set(jobs_per_study.values()) == {1}
    assert {status for *_, status in jobs} == {JobStatus.DONE}
    done_job = {uid: job_id for job_id, uid, _ in jobs}
    result_sets = {uid: Counter(kind for *_, kind, _, u in results if u == uid) for uid in study_uids}
    assert all(kinds == {"seg": 1, "sr": 1, "sc": SLICES} for kinds in result_sets.values()), result_sets
    assert all(job_id == done_job[uid] for *_, job_id, uid in results)

    # Every result object at the PACS exactly once, in the series the node wrote it in.
    held = Counter(i["MainDicomTags"]["SOPInstanceUID"] for i in at_pacs)
    ours = {sop for sop, *_ in results}
    duplicates = sum(n - 1 for n in held.values()) + len(set(held) - ours)
    lost = len(ours - set(held))
    assert (duplicates, lost) == (0, 0), f"duplicates {duplicates}, lost {lost}"
    assert {(i["MainDicomTags"]["SOPInstanceUID"], series_of[i["ID"]]) for i in at_pacs} == {
        (sop, series) for sop, series, *_ in results
    }

    # The audit trail: each study received, completed, analysed and every result created and delivered once.
    per_study = Counter((e.study_instance_uid, e.event_type) for e in events)
    for uid in study_uids:
        assert per_study[uid, AuditEventType.INSTANCE_STORED] == SLICES, uid
        assert per_study[uid, AuditEventType.STUDY_COMPLETE] == 1, uid
        assert per_study[uid, AuditEventType.JOB_CREATED] == 1, uid
        assert per_study[uid, AuditEventType.JOB_STARTED] >= 1, uid
        assert per_study[uid, AuditEventType.JOB_DONE] == 1, uid
        assert per_study[uid, AuditEventType.RESULT_CREATED] == OBJECTS, uid
        assert per_study[uid, AuditEventType.SEND_OK] == OBJECTS, uid

    # Who analysed what: the owner of each done job's last start.
    analysed_by: Counter[str] = Counter()
    for job_id in done_job.values():
        starts = [e for e in events if e.job_id == job_id and e.event_type == AuditEventType.JOB_STARTED]
        analysed_by["A" if a_id + "/" in starts[-1].detail else "B" if b_id + "/" in starts[-1].detail else "?"] += 1
    print(
        f"\nchaos 2 nodes: studies {len(jobs_per_study)}, each analysed once (A {analysed_by['A']}, "
        f"B {analysed_by['B']}), results {len(ours)}, at Orthanc {sum(held.values())}, "
        f"duplicates {duplicates}, lost {lost}; kill 1: A running job {killed_job.id} (no results yet, the attempt "
        f"made none); kill 2: A held {len(sending_claims)} unsent item claim(s), {len(held_at_kill)} still its at "
        f"the kill; link connections {link.connections}"
    )
