"""Workers end with their node: after `kill -9` of a real `edgenode serve`, its worker processes exit on their own
(no orphan goes on claiming jobs, e.g. those of the next node started on the same data)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.ingest_support import ServeProcess, kill_orphans, node_settings, poll, write_toml

WORKERS = 2


@pytest.mark.slow
def test_workers_exit_when_serve_is_killed(tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "var", inference={"workers": WORKERS, "device": "cpu", "backend": "torch"})
    config = write_toml(settings, tmp_path / "edgenode.toml")
    log = tmp_path / "serve.log"
    serve = ServeProcess(config, settings.node.port, log).start()
    assert serve.proc is not None
    descendants: list[psutil.Process] = []
    try:
        # Idle workers waiting for jobs, as the node leaves them when nothing arrives.
        assert poll(lambda: log.read_text().count("started (pid") >= WORKERS, 300), log.read_text()[-3000:]
        assert len(serve.spawned()) == WORKERS
        descendants = psutil.Process(serve.proc.pid).children(recursive=True)
        # Everything the node started ends (workers first; multiprocessing's resource tracker follows them).
        serve.kill_and_expect_descendants_to_end(descendants, 120)
        assert log.read_text().count("is gone: stopping") == WORKERS
    finally:
        serve.stop()
        kill_orphans(descendants)
