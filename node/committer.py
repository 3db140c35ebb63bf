"""Group commit for received instances: their files and folders fsynced together, then one database commit.

Each C-STORE handler has written its file and given it its final name (`Spool.place_instance`); it then hands
the file and the index record here and waits. The committer thread takes everything queued, fsyncs every file
and each distinct folder at the same time (a thread each: the disk flushes them together, where one after the
other would cost a flush each), commits the rows of the files that are now durable in one transaction, and
wakes the handlers, which only then answer Success. With one association a batch is one instance; with several,
concurrent stores share the fsyncs' flush and the commit.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from db.ingest import IngestIndex, InstanceRecord
from node.spool import PlacedFile, Spool

log = logging.getLogger(__name__)

FSYNC_THREADS = 8  # fsyncs in flight at once (files and folders of a batch)


@dataclass
class _Pending:
    record: InstanceRecord
    placed: PlacedFile
    done: threading.Event = field(default_factory=threading.Event)
    added: bool = False
    error: BaseException | None = None


class GroupCommitter:
    def __init__(self, index: IngestIndex, spool: Spool, max_batch: int = 64) -> None:
        self.index = index
        self.spool = spool
        self.max_batch = max_batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
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
        """Make the record's file durable and index it; blocks until committed. False if a duplicate."""
        if self._thread is None:
            raise RuntimeError("committer not started")
        pending = _Pending(record, placed)
        self._queue.put(pending)
        pending.done.wait()
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
        try:
            self._settle(batch)
            durable = [p for p in batch if p.error is None]
            if durable:
                results = self.index.add_instances([p.record for p in durable])
                for pending, outcome in zip(durable, results, strict=True):
                    if isinstance(outcome, Exception):
                        pending.error = outcome
                    else:
                        pending.added = outcome
        except BaseException as exc:  # every waiting handler gets the error and answers a failure
            log.exception("group commit of %d instance(s) failed", len(batch))
            for pending in batch:
                pending.error = pending.error or exc
        finally:
            for pending in batch:
                pending.done.set()

    def _settle(self, batch: list[_Pending]) -> None:
        """fsync every file and folder of the batch at once; a record whose file or folder failed gets the error."""
        assert self._fsyncs is not None
        files: list[tuple[_Pending, Future[None]]] = [
            (p, self._fsyncs.submit(p.placed.settle)) for p in batch if p.placed.fd is not None
        ]
        folders: dict[Path, BaseException | None] = {p.placed.folder: None for p in batch}
        inline, *others = folders  # one folder in this thread: a batch of one needs one hand-off, not two
        futures = {folder: self._fsyncs.submit(self.spool.sync_folder, folder) for folder in others}
        try:
            self.spool.sync_folder(inline)
        except OSError as exc:
            folders[inline] = exc
        for folder, future in futures.items():
            folders[folder] = future.exception()
        for pending, future in files:
            pending.error = future.exception()
        for pending in batch:
            pending.error = pending.error or folders[pending.placed.folder]
