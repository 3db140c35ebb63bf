"""Chaos: SIGKILL the whole node (serve and its worker processes) during inference and again while it sends the
results; after each restart it carries on. From the PACS's side the study is processed exactly once: every
result object present, each once, and no object or series beyond what one run of the job produces.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from db.models import JobStatus, OutboundStatus
from tests.dicomgen import make_ct_series, write_datasets
from tests.e2e_support import NodeProcess, make_model, node_results_in_pacs, routing_pacs, storescu, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a real node killed twice during a real run

SLICES = 24  # one heatmap per slice: 26 result objects, so sending lasts long enough to be interrupted


def result_rows(node: NodeProcess) -> list[tuple[str, str, str, list[str]]]:
    """(kind, SOP Instance UID, series UID, outbound states) of every result the node's database holds."""
    from sqlalchemy import select

    from db.models import Result

    db = node.database()
    try:
        with db.session() as session:
            return [
                (r.kind, r.sop_instance_uid, r.series_instance_uid, [o.status for o in r.outbound])
                for r in session.scalars(select(Result).order_by(Result.id))
            ]
    finally:
        db.dispose()


def test_sigkill_during_inference_and_sending_processes_the_study_exactly_once(tmp_path: Path) -> None:
    model = make_model(tmp_path / "tiny.safetensors")
    ct = make_ct_series(SLICES, 64, 64, patient_id="CHAOS", accession="CHAOS1")
    study_uid = ct[0].StudyInstanceUID
    files = write_datasets(ct, tmp_path / "ct")
    node = NodeProcess(
        tmp_path / "node",
        model,
        pacs_port=0,
        inference={"ensemble": 3, "steps": 10},  # a few seconds of inference: room to kill it mid-way
        sections={"results": {"heatmap_slices": 0, "empty_seg": True}},
    )
    with routing_pacs(tmp_path / "pacs", node.port) as pacs:
        node.pacs_port = pacs.dicom_port
        node.start()
        try:
            storescu(pacs.dicom_port, files)

            # 1. Killed during inference: the job is claimed (running) and has produced nothing yet.
            wait_for(
                lambda: any(j.status == JobStatus.RUNNING for j in node.jobs()), 120, "the job to start", interval=0.05
            )
            node.kill()
            (job,) = node.jobs()
            assert job.status == JobStatus.RUNNING and job.attempts == 1
            assert node.count_events("result.created") == 0, "the kill came after inference, not during it"

            # 2. Restarted: the job goes back to the queue and runs again; killed at the first acknowledged result.
            node.start()
            wait_for(lambda: node.count_events("send.ok") > 0, 120, "the first result to be sent", interval=0.01)
            node.kill()
            rows = result_rows(node)
            sent = sum(OutboundStatus.SENT in states for *_, states in rows)
            assert len(rows) == SLICES + 2 and 0 < sent < len(rows), f"{sent} of {len(rows)} sent at the kill"
            assert len(node_results_in_pacs(pacs, study_uid)) >= 1

            # 3. Restarted again: the rest is delivered.
            node.start()
            wait_for(
                lambda: all(states == [OutboundStatus.SENT] for *_, states in result_rows(node)),
                120,
                "every result delivered",
            )
        finally:
            node.stop()

        # The node: one job, done on its second attempt, one set of results, each delivered once.
        (job,) = node.jobs()
        assert job.status == JobStatus.DONE and job.attempts == 2
        rows = result_rows(node)
        kinds = Counter(kind for kind, *_ in rows)
        assert kinds == {"seg": 1, "sr": 1, "sc": SLICES}
        assert node.count_events("job.started") == 2 and node.count_events("job.done") == 1
        assert node.count_events("result.created") == len(rows)  # the killed attempt never got as far as results

        # The PACS: exactly those objects, once each, in exactly those series (nothing missing, nothing extra).
        in_pacs = node_results_in_pacs(pacs, study_uid)
        held = Counter(uid for series in in_pacs for uid in series["sop_instance_uids"])
        assert set(held) == {uid for _, uid, _, _ in rows}
        assert max(held.values()) == 1
        per_series = {s["series_instance_uid"]: len(s["sop_instance_uids"]) for s in in_pacs}
        assert per_series == Counter(series for _, _, series, _ in rows)
        assert sorted(per_series.values()) == [1, 1, SLICES]
        # and the originals, untouched: the node's results were not routed back to it, nor its sources resent
        originals = [s for s in pacs.post("/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}})]
        assert len(originals) == 1 + len(in_pacs)
        assert node.count_events("instance.stored") == SLICES
