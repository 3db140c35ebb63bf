"""A parent and a child process for tests/test_parent_watch.py (`python -m tests.parent_watch_support ...`).

The parent starts one child with multiprocessing's spawn, as WorkerSupervisor starts workers, optionally from a
thread that ends once the child watches (as a restart from a scheduler thread would), then sleeps until killed.
The child waits `delay` seconds (the parent may die meanwhile), starts a ParentWatch and writes marker files:
`<marker>.watching` once watched, `<marker>.stopped` when told its parent is gone.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from pathlib import Path

from node.parent_watch import ParentWatch


def child(marker: str, delay: float) -> None:
    time.sleep(delay)
    stop = threading.Event()
    ParentWatch(stop.set, grace_seconds=60).start()
    Path(marker + ".watching").write_text("")
    if stop.wait(120):
        Path(marker + ".stopped").write_text("")


def parent(marker: str, delay: float, from_thread: bool) -> None:
    def start() -> None:
        proc = multiprocessing.get_context("spawn").Process(target=child, args=(marker, delay))
        proc.start()
        print(proc.pid, flush=True)
        while from_thread and not Path(marker + ".watching").exists():
            time.sleep(0.05)

    if from_thread:
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        print("thread ended", flush=True)
    else:
        start()
    time.sleep(3600)  # until the test kills this process


if __name__ == "__main__":
    parent(sys.argv[1], float(sys.argv[2]), sys.argv[3] == "thread")
