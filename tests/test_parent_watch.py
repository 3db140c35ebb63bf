"""ParentWatch with real processes: a SIGKILLed parent is noticed, also when it died before the child started
watching; the end of the thread that started the child (the Linux parent-death signal fires then too) is not."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import node_env
from tests.ingest_support import alive, poll


def start_parent(marker: Path, delay: float, how: str) -> tuple[subprocess.Popen[str], psutil.Process]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.parent_watch_support", str(marker), str(delay), how],
        stdout=subprocess.PIPE,
        text=True,
        env=node_env(),
    )
    assert proc.stdout is not None
    return proc, psutil.Process(int(proc.stdout.readline()))


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)


def test_child_stops_when_its_parent_is_killed_while_the_thread_that_started_it_ended_long_ago(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "child"
    parent, child = start_parent(marker, 0, "thread")
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "thread ended"
        time.sleep(1.0)  # the parent-death signal for the ended thread has been handled by now
        assert alive(child) and not Path(f"{marker}.stopped").exists()  # the parent lives: nothing to do
        kill(parent)
        assert poll(lambda: Path(f"{marker}.stopped").exists(), 60)
        assert poll(lambda: not alive(child), 60)
    finally:
        parent.kill()
        if alive(child):
            child.kill()


def test_child_stops_when_its_parent_died_before_the_watch_started(tmp_path: Path) -> None:
    marker = tmp_path / "child"
    parent, child = start_parent(marker, 3.0, "main")  # the child waits 3 s before it watches
    try:
        kill(parent)
        assert poll(lambda: Path(f"{marker}.stopped").exists(), 60)
        assert poll(lambda: not alive(child), 60)
    finally:
        if alive(child):
            child.kill()
