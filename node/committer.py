"""Group commit for received instances: their files and folders fsynced together, then one database commit.

Each C-STORE handler has written its file and given it its final name (`Spool.place_instance`); it then hands
the file and the index record here, which starts the fsyncs of the file and of its folder and the file's SHA-256
at once, in a pool of threads (the disk flushes concurrent fsyncs together, where one after the other would cost a
flush each), and waits. The committer thread takes everything queued, writes the rows (when no other writer holds
the lock) and commits them, in one transaction, only once their files and folders are durable; then it wakes the
handlers, which only then answer Success. With one association a batch is one instance; with several, concurrent
stores share the commit, and a store that arrives while a commit runs has its fsyncs under way meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from db.ingest import IngestIndex, InstanceRecord
from node.spool import PlacedFile, Spool

log = logging.getLogger(__name__)

FSYNC_THREADS = 8  # pool threads for the stores in flight: each puts its file fsync, folder fsync and digest here


@dataclass
class _Pending:
    record: InstanceRecord
    placed: PlacedFile
    file_synced: Future[None] | None  # None: fsynced before it got its name
    folder_synced: Future[None]
    digest: Future[str]
    done: threading.Lock = field(default_factory=threading.Lock)  # held until the outcome is in (then released)
    added: bool = False
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.done.acquire()

    def durable(self) -> BaseException | None:
        """Wait for the file's and the folder's fsync; the error that keeps the record from being committed."""
        file_error = self.file_synced.exception() if self.file_synced is not None else None
        return file_error or self.folder_synced.exception()


class GroupCommitter:
    def __init__(self, index: IngestIndex, spool: Spool, max_batch: int = 64) -> None:
        self.index = index
        self.spool = spool
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fsyncs: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._fsyncs = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="ingest-fsync")
        self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._fsyncs is not None:
            self._fsyncs.shutdown()
            self._fsyncs = None

    def submit(self, record: InstanceRecord, placed: PlacedFile) -> bool:
        """Make the record's file durable and index it (with the file's SHA-256, computed here: the record's own
        `sha256` is not used); blocks until committed. False if a duplicate."""
        pool = self._fsyncs
        if self._thread is None or pool is None:
            raise RuntimeError("committer not started")
        pending = _Pending(
            record,
            placed,
            pool.submit(placed.settle) if placed.fd is not None else None,
            pool.submit(self.spool.sync_folder, placed.folder),
            pool.submit(placed.digest),
        )
        self._queue.put(pending)
        pending.done.acquire()  # until the committer releases it
        if pending.error is not None:
            raise pending.error
        return pending.added

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        def settled() -> list[BaseException | None]:
            return [pending.durable() for pending in batch]

        try:
            # the fsyncs run while the rows are written (IngestIndex.add_instances)
            records = [replace(p.record, sha256=p.digest.result()) for p in batch]
            results = self.index.add_instances(records, ready=settled)
            for pending, outcome in zip(batch, results, strict=True):
                if isinstance(outcome, BaseException):
                    pending.error = outcome
                else:
                    pending.added = outcome
        except BaseException as exc:  # every waiting handler gets the error and answers a failure
            log.exception("group commit of %d instance(s) failed", len(batch))
            settled()  # the handlers close (and may remove) their files: not while an fsync runs on one
            for pending in batch:
                pending.error = pending.error or exc
        finally:
            for pending in batch:
                pending.done.release()
