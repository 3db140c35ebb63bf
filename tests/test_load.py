"""A light load test (benchmarks/load.py is the full one): 8 studies from 4 concurrent storescu senders straight
into `edgenode serve`; every study is processed once and its results all land in a real Orthanc, once each.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Job, JobStatus, OutboundItem, OutboundStatus, Result, Study
from node.local_orthanc import Orthanc
from tests.dicomgen import make_ct_series, make_dx, write_datasets
from tests.e2e_support import PACS_AET, NodeProcess, make_model, node_results_in_pacs, storescu, wait_for
from tests.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # 8 studies through a real node and Orthanc

SENDERS = 4
STUDIES = 8


def delivery_state(node: NodeProcess) -> dict[str, tuple[str, int, list[str]]]:
    """Study UID -> (job status, job count, outbound states of its results)."""
    db = node.database()
    try:
        with db.session() as session:
            out = {}
            for study in session.scalars(select(Study)):
                jobs = list(session.scalars(select(Job).where(Job.study_id == study.id)))
                states = list(
                    session.scalars(
                        select(OutboundItem.status)
                        .join(Result, Result.id == OutboundItem.result_id)
                        .join(Job, Job.id == Result.job_id)
                        .where(Job.study_id == study.id)
                    )
                )
                out[study.study_instance_uid] = (jobs[-1].status if jobs else "", len(jobs), states)
            return out
    finally:
        db.dispose()


def test_concurrent_senders_every_study_processed_once(tmp_path: Path) -> None:
    model = make_model(tmp_path / "tiny.safetensors")
    studies: list[tuple[str, list[Path]]] = []
    for k in range(STUDIES):
        ids = {"patient_id": f"LOAD{k}", "accession": f"L{k}"}
        if k % 4 == 3:
            ds = make_dx(96, 96, seed=k, **ids)
            studies.append((ds.StudyInstanceUID, write_datasets([ds], tmp_path / f"s{k}")))
        else:
            series = make_ct_series(4, 64, 64, seed=k, **ids)
            studies.append((series[0].StudyInstanceUID, write_datasets(series, tmp_path / f"s{k}")))
    senders = [f"MODALITY{k + 1}" for k in range(SENDERS)]
    node = NodeProcess(
        tmp_path / "node",
        model,
        pacs_port=0,
        sections={"routing": [{"name": "chest", "destination": PACS_AET}], "results": {"empty_seg": True}},
    )
    errors: list[BaseException] = []

    def send(k: int) -> None:
        for _, files in studies[k::SENDERS]:
            try:
                storescu(node.port, files, calling_ae=senders[k], called_ae="EDGENODE")
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

    with Orthanc(tmp_path / "pacs", aet=PACS_AET, dicom_port=free_port(), http_port=free_port()) as pacs:
        node.sections["peers"] = [
            {"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.dicom_port},
            *({"ae_title": ae, "host": "127.0.0.1", "port": free_port()} for ae in senders),
        ]
        with node:
            threads = [threading.Thread(target=send, args=(k,)) for k in range(SENDERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not errors, errors

            def all_delivered() -> bool:
                state = delivery_state(node)
                return len(state) == STUDIES and all(
                    status == JobStatus.DONE and states and set(states) == {OutboundStatus.SENT}
                    for status, _, states in state.values()
                )

            wait_for(all_delivered, 180, "every study processed and delivered", interval=0.5)
            state = delivery_state(node)

        assert {count for _, count, _ in state.values()} == {1}  # one job per study: none split, none repeated
        for uid, _ in studies:
            held = Counter(u for series in node_results_in_pacs(pacs, uid) for u in series["sop_instance_uids"])
            assert len(held) == len(state[uid][2]) and set(held.values()) == {1}, uid
