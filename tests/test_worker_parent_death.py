"""Workers end with their node: after `kill -9` of a real `edgenode serve`, its worker processes exit on their own
(no orphan goes on claiming jobs, e.g. those of the next node started on the same data)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.ingest_support import ServeProcess, node_settings, write_toml

WORKERS = 2


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def poll(condition, timeout: float, every: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


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
        descendants = psutil.Process(serve.proc.pid).children(recursive=True)
        workers = [p for p in descendants if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == WORKERS

        serve.signal(signal.SIGKILL)
        assert serve.wait() == -signal.SIGKILL
        # Everything the node started ends (workers first; multiprocessing's resource tracker follows them).
        assert poll(lambda: not any(alive(p) for p in descendants), 120), [p.pid for p in descendants if alive(p)]
        assert log.read_text().count("is gone: stopping") == WORKERS
    finally:
        serve.stop()
        for proc in descendants:  # never leave orphans behind, also when the test fails
            if alive(proc):
                proc.kill()
