"""Loopback ports for the servers the tests start, race-free under pytest-xdist.

A port found by binding to port 0 is in the kernel's ephemeral range: between the check and the server's own bind,
another worker's bind or any outgoing connection may take it. These ports come from below that range, from a
block of its own for each xdist worker, never handed out twice in one run, and each is checked free by binding
(without SO_REUSEADDR, so a port still in TIME_WAIT from an earlier run is skipped too).
"""

from __future__ import annotations

import itertools
import os
import socket

FIRST_PORT = 20000
BLOCK = 1000  # ports per xdist worker: 20000-20999 for gw0, 21000-21999 for gw1, ...


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def _candidates() -> itertools.cycle[int]:
    start = FIRST_PORT + BLOCK * _worker_index()
    return itertools.cycle(range(start, start + BLOCK))


_next_candidate = _candidates()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port no other worker of this run will be given, free at the time of the call."""
    for _ in range(BLOCK):
        port = next(_next_candidate)
        if _bindable(port):
            return port
    raise RuntimeError(f"no free loopback port in this worker's block of {BLOCK} from {FIRST_PORT}")
