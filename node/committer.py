"""Group commit for received instances: their files and folders fsynced together, then one database commit.

Each C-STORE handler has written its file and given it its final name (`Spool.place_instance`); it then hands
the file and the index record here and waits. The committer thread takes everything queued and starts the fsyncs
of every file and each distinct folder at the same time (a thread each: the disk flushes them together, where one
after the other would cost a flush each); meanwhile it writes the rows (when no other writer holds the lock), and
commits them, in one transaction, only once their files and folders are durable; then it wakes the handlers,
which only then answer Success. With one association a batch is one instance; with several, concurrent stores
share the fsyncs' flush and the commit.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from db.ingest import IngestIndex, InstanceRecord
from node.spool import PlacedFile, Spool

log = logging.getLogger(__name__)

FSYNC_THREADS = 8  # fsyncs (files and folders of a batch) and hashes in flight at once


@dataclass
class _Pending:
    record: InstanceRecord
    placed: PlacedFile
    done: threading.Lock = field(default_factory=threading.Lock)  # held until the outcome is in (then released)
    added: bool = False
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.done.acquire()


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
        if self._thread is None:
            raise RuntimeError("committer not started")
        pending = _Pending(record, placed)
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
        settled = None
        try:
            settled = self._settle(batch)  # the fsyncs run while the rows are written (IngestIndex.add_instances)
            assert self._fsyncs is not None
            # ... and while the files are hashed for the rows: the first here, the others in the pool (hashlib runs
            # without the GIL, so they hash at the same time)
            digests = [self._fsyncs.submit(p.placed.digest) for p in batch[1:]]
            sums = [batch[0].placed.digest(), *(d.result() for d in digests)]
            records = [replace(p.record, sha256=digest) for p, digest in zip(batch, sums, strict=True)]
            results = self.index.add_instances(records, ready=settled)
            for pending, outcome in zip(batch, results, strict=True):
                if isinstance(outcome, BaseException):
                    pending.error = outcome
                else:
                    pending.added = outcome
        except BaseException as exc:  # every waiting handler gets the error and answers a failure
            log.exception("group commit of %d instance(s) failed", len(batch))
            if settled is not None:
                settled()  # the handlers close (and may remove) their files: not while an fsync runs on one
            for pending in batch:
                pending.error = pending.error or exc
        finally:
            for pending in batch:
                pending.done.release()

    def _settle(self, batch: list[_Pending]) -> Callable[[], list[BaseException | None]]:
        """Start the fsyncs of every file and folder of the batch at once; returns what waits for them and says,
        per record, which error (of its file's or its folder's fsync) keeps it from being committed."""
        assert self._fsyncs is not None
        pool = self._fsyncs
        files = [pool.submit(p.placed.settle) if p.placed.fd is not None else None for p in batch]
        folders = {p.placed.folder: pool.submit(self.spool.sync_folder, p.placed.folder) for p in batch}

        def settled() -> list[BaseException | None]:
            folder_errors = {folder: future.exception() for folder, future in folders.items()}
            return [
                (future.exception() if future is not None else None) or folder_errors[p.placed.folder]
                for p, future in zip(batch, files, strict=True)
            ]

        return settled
