"""Helpers for the ingest tests: a node in this process or as an `edgenode serve` child, and a sender."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydicom import dcmread
from pynetdicom import AE

from node.app import EdgeNode
from node.config import Settings, load_settings
from node.local_orthanc import wait_for_port
from tests.conftest import edgenode_cmd, free_port, node_env

SENDER_AE = "SENDER"


def node_settings(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for a test node on a free port that accepts SENDER (and STORESCU) from 127.0.0.1.

    One listener, in the node's own process (tests that reach into it use `node.scp`), unless `node` says otherwise
    (`{"listeners": 2}`: listener processes, node/listeners.py)."""
    node = {
        "port": free_port(),
        "data_dir": str(data_dir),
        "min_free_disk_mb": 1,
        "shutdown_grace_seconds": 1.0,
        "listeners": 1,
    }
    node.update(sections.pop("node", {}))
    peers = sections.pop(
        "peers",
        [
            {"ae_title": SENDER_AE, "host": "127.0.0.1", "port": free_port()},
            {"ae_title": "STORESCU", "host": "127.0.0.1", "port": free_port()},
        ],
    )
    # Ingest tests exercise the listener and completion only: no inference workers, no dashboard.
    sections.setdefault("inference", {"workers": 0})
    sections.setdefault("web", {"enabled": False})
    return load_settings(None, node=node, peers=peers, **sections)


@contextmanager
def running_node(settings: Settings) -> Iterator[EdgeNode]:
    node = EdgeNode(settings)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def write_toml(settings: Settings, path: Path) -> Path:
    from node.config import settings_to_toml

    path.write_text(settings_to_toml(settings))
    return path


@dataclass
class ServeProcess:
    """`edgenode serve` as a child process (the real CLI), stdout+stderr captured to a log file."""

    config: Path
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServeProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                edgenode_cmd("serve", "--config", str(self.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=node_env(**self.env),
            )
        wait_for_port("127.0.0.1", self.port, timeout, self.proc)
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        """The exit code; on a timeout serve is asked for its threads' stacks (SIGUSR2) first, so the log the
        failing test shows says where it hung."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGUSR2)
                time.sleep(1.0)
            raise AssertionError(f"serve did not exit within {timeout:.0f} s; its log:\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 20_000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def spawned(self) -> list[psutil.Process]:
        """The processes serve started through multiprocessing (workers, listener processes): its own children only.

        Why not their descendants too: a worker (or a library in it) that runs a program forks first, and until the
        fork's exec its copy shows the worker's command line: a busy machine counted one such copy as a third
        worker (seen 2026-12-04 in the slow tier)."""
        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children(recursive=False)
        return [p for p in children if "spawn_main" in " ".join(p.cmdline())]

    def kill_and_expect_descendants_to_end(self, descendants: list[psutil.Process], timeout: float) -> None:
        """SIGKILL serve (no clean stop): every process it started must notice and end within `timeout`."""
        self.signal(signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL
        assert poll(lambda: not any(alive(p) for p in descendants), timeout), [p.pid for p in descendants if alive(p)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sender_ae(paths: list[Path] | None = None, ae_title: str = SENDER_AE) -> AE:
    """A pynetdicom SCU proposing the SOP class/transfer syntax pairs of the given files (or CT)."""
    ae = AE(ae_title=ae_title)
    pairs: dict[str, set[str]] = {}
    for path in paths or []:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        pairs.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    if not pairs:
        pairs = {"1.2.840.10008.5.1.4.1.1.2": {"1.2.840.10008.1.2.1"}}
    for sop_class, syntaxes in pairs.items():
        for ts in sorted(syntaxes):  # one context per pair, so each file goes out in its own syntax
            ae.add_requested_context(sop_class, [ts])
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (everything after the File Meta Information)."""
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    # File meta group length + its 12-byte element + 132 bytes of preamble and 'DICM'
    return raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]


def poll(condition: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
    """Wait until `condition()` holds (True) or `timeout` seconds pass (its last value)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return condition()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_orphans(procs: list[psutil.Process]) -> None:
    """Never leave a test's processes behind, also when it fails."""
    for proc in procs:
        if alive(proc):
            proc.kill()
