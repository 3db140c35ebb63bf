"""One sender, in the serve process: a real worker process queues results and wakes the sender, but never opens
an association itself; the sender, woken by the worker's event (its periodic pass is an hour away), delivers them
to a real dcmtk storescp."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Job, JobStatus, OutboundItem, OutboundStatus
from node.sender import ResultSender
from node.spool import Spool
from node.supervisor import WorkerSupervisor, shared_event
from tests.dicomgen import make_ct_series
from tests.ingest_support import poll
from tests.peers import StoreSCP
from tests.test_worker import received_study


@pytest.mark.slow  # a worker process loads torch and the model
def test_workers_only_queue_and_the_serve_process_sender_delivers_when_woken(tmp_path: Path) -> None:
    settings, db = received_study(tmp_path, make_ct_series(3, 32, 32))
    settings.inference.workers = 1
    settings.send.interval_seconds = 3600.0  # only the workers' event can wake the sender within this test
    with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs:
        settings.peers[0].port = pacs.port
        results_queued = shared_event()

        def job_status() -> str:
            with db.session() as s:
                return s.scalars(select(Job.status)).one()

        workers = WorkerSupervisor(settings, results_queued=results_queued)
        workers.start()
        try:
            assert poll(lambda: job_status() in (JobStatus.DONE, JobStatus.FAILED), 300), job_status()
        finally:
            workers.stop()  # a worker that sent would have finished its send by now
        assert job_status() == JobStatus.DONE
        with db.session() as s:
            queued = s.scalars(select(OutboundItem.status)).all()
        assert queued and set(queued) == {OutboundStatus.PENDING}
        assert pacs.received() == []  # the worker opened no association
        assert results_queued.is_set()  # it woke the sender instead

        sender = ResultSender(settings, db, Spool(settings.spool_dir), results_queued)
        sender.start()
        try:
            assert poll(lambda: len(pacs.received()) == len(queued), 60), pacs.received()
        finally:
            sender.stop()
        with db.session() as s:
            assert set(s.scalars(select(OutboundItem.status)).all()) == {OutboundStatus.SENT}
