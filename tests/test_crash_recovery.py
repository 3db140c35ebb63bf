"""`edgenode serve` as a real process: SIGKILL during transfers loses nothing acknowledged; SIGTERM is graceful."""

from __future__ import annotations

import hashlib
import signal
import threading
from pathlib import Path

import psutil
import pynetdicom._config
import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.models import Instance
from db.session import Database
from node.app import CLEAN_STOP_MARKER
from node.spool import SPOOL_ID_FILE, TEMP_SUFFIX, Spool
from tests.dicomgen import make_ct_series, write_datasets
from tests.ingest_support import ServeProcess, dataset_bytes, node_settings, sender_ae, write_toml

SENDERS = 4
PER_SENDER = 40


@pytest.fixture(autouse=True)
def send_files_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)


def send_concurrently(
    port: int, batches: list[list[Path]], acked: dict[str, Path], enough: threading.Event, threshold: int
) -> list[threading.Thread]:
    """One association per batch; records every instance the node answered Success for."""
    lock = threading.Lock()

    def run(files: list[Path]) -> None:
        assoc = sender_ae(files[:1]).associate("127.0.0.1", port, ae_title="EDGENODE")
        if not assoc.is_established:
            return
        for path in files:
            try:
                status = assoc.send_c_store(path)
            except Exception:
                break
            if not assoc.is_established or "Status" not in status:
                break
            if int(status.Status) == 0:
                with lock:
                    acked[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
                    if len(acked) >= threshold:
                        enough.set()
        if assoc.is_established:
            assoc.release()

    threads = [threading.Thread(target=run, args=(batch,), daemon=True) for batch in batches]
    for thread in threads:
        thread.start()
    return threads


def make_batches(tmp_path: Path) -> list[list[Path]]:
    return [
        write_datasets(make_ct_series(PER_SENDER, 128, 128, seed=k, patient_id=f"PAT{k}"), tmp_path / f"src{k}")
        for k in range(SENDERS)
    ]


def check_spool_against_index(data_dir: Path, acked: dict[str, Path]) -> None:
    db = Database(f"sqlite:///{data_dir / 'edgenode.db'}")
    spool = Spool(data_dir / "spool")
    try:
        with db.session() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance)).all()}
    finally:
        db.dispose()
    for sop, source in acked.items():
        assert sop in rows, f"acknowledged instance {sop} is not indexed"
        stored = spool.path(rows[sop].path)
        assert dataset_bytes(stored) == dataset_bytes(source)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == rows[sop].sha256
    files = {p.relative_to(spool.root).as_posix() for p in spool.root.rglob("*") if p.is_file()} - {SPOOL_ID_FILE}
    assert not [f for f in files if f.endswith(TEMP_SUFFIX)], "temp files left in the spool"
    assert files == {r.path for r in rows.values()}, "spool and index disagree"


@pytest.mark.slow  # `edgenode serve` processes killed and restarted
@pytest.mark.parametrize("listeners", [1, 2])
def test_sigkill_during_transfers_loses_nothing_acknowledged(tmp_path: Path, listeners: int) -> None:
    batches = make_batches(tmp_path)
    settings = node_settings(tmp_path / "var", node={"listeners": listeners})
    config = write_toml(settings, tmp_path / "edgenode.toml")
    serve = ServeProcess(config, settings.node.port, tmp_path / "serve.log").start()
    acked: dict[str, Path] = {}
    enough = threading.Event()
    try:
        threads = send_concurrently(settings.node.port, batches, acked, enough, threshold=SENDERS * PER_SENDER // 4)
        assert enough.wait(120), "the node acknowledged too little before the kill"
        assert serve.proc is not None
        listener_processes = psutil.Process(serve.proc.pid).children()  # (none with one listener)
        for proc in listener_processes:  # a power cut: every process of the node at once
            proc.kill()
        serve.signal(signal.SIGKILL)
        assert serve.wait() == -signal.SIGKILL
        for thread in threads:
            thread.join(60)
    finally:
        serve.stop()
    total = SENDERS * PER_SENDER
    assert len(acked) < total, "the kill came after the transfer had finished"
    snapshot = dict(acked)

    restarted = ServeProcess(config, settings.node.port, tmp_path / "serve2.log").start()  # recovers the spool
    restarted.signal(signal.SIGTERM)
    assert restarted.wait() == 0
    check_spool_against_index(settings.data_dir, snapshot)
    log = (tmp_path / "serve2.log").read_text()
    assert "Traceback" not in log


@pytest.mark.slow  # `edgenode serve` processes killed and restarted
@pytest.mark.parametrize("listeners", [1, 2])
def test_sigterm_finishes_in_flight_stores_and_exits_zero(tmp_path: Path, listeners: int) -> None:
    batches = make_batches(tmp_path)
    settings = node_settings(tmp_path / "var", node={"listeners": listeners})
    config = write_toml(settings, tmp_path / "edgenode.toml")
    serve = ServeProcess(config, settings.node.port, tmp_path / "serve.log").start()
    acked: dict[str, Path] = {}
    enough = threading.Event()
    try:
        threads = send_concurrently(settings.node.port, batches, acked, enough, threshold=20)
        assert enough.wait(120)
        serve.signal(signal.SIGTERM)
        assert serve.wait(120) == 0
        for thread in threads:
            thread.join(60)
    finally:
        serve.stop()
    assert (settings.data_dir / CLEAN_STOP_MARKER).exists()
    check_spool_against_index(settings.data_dir, acked)
    # and a restart after a clean stop serves again with everything still there
    again = ServeProcess(config, settings.node.port, tmp_path / "serve2.log").start()
    again.signal(signal.SIGTERM)
    assert again.wait() == 0
    check_spool_against_index(settings.data_dir, acked)


@pytest.mark.slow  # an `edgenode serve` process
def test_sigusr2_writes_every_threads_stack_to_the_log_and_serve_goes_on(tmp_path: Path) -> None:
    """What an operator (and a test whose serve will not stop) asks a hung node: where each thread waits."""
    import time

    settings = node_settings(tmp_path / "var")
    serve = ServeProcess(write_toml(settings, tmp_path / "edgenode.toml"), settings.node.port, tmp_path / "serve.log")
    serve.start()
    try:
        serve.signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while "Current thread" not in serve.log_tail() and time.monotonic() < deadline:
            time.sleep(0.1)
        dump = serve.log_tail()
        assert "Current thread" in dump and "Thread 0x" in dump and 'File "' in dump, dump[-3000:]
        assert serve.proc is not None and serve.proc.poll() is None  # still serving
    finally:
        serve.signal(signal.SIGTERM)
    assert serve.wait() == 0


def test_a_component_that_fails_to_stop_leaves_no_clean_stop_marker(tmp_path: Path) -> None:
    from node.app import EdgeNode

    stopped: list[str] = []

    class Stubborn:  # a component whose stop() fails (a thread that will not end, say)
        name = "stubborn"

        def start(self) -> None:
            pass

        def stop(self) -> None:
            stopped.append(self.name)
            raise RuntimeError("would not stop")

    node = EdgeNode(node_settings(tmp_path / "var"))
    node.components.append(Stubborn())
    node.start()
    listener_stop = node.scp.stop

    def recording_listener_stop(grace: float = 5.0) -> None:
        stopped.append("listener")
        listener_stop(grace)

    node.scp.stop = recording_listener_stop  # type: ignore[method-assign]
    node.stop()
    assert stopped == ["listener", "stubborn"]  # the listener drains first, whatever follows
    assert not (tmp_path / "var" / CLEAN_STOP_MARKER).exists()  # so the next start checks the spool again
