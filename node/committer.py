"""Group commit for received instances: one folder fsync per folder and one database commit per batch.

Each C-STORE handler has already written and fsynced its file and renamed it into place; it then
hands the index record here and waits. The committer thread takes everything queued, fsyncs each
distinct folder once (making the renames durable), commits all rows in one transaction, and wakes
the handlers, which only then answer Success. With one association a batch is one instance (same
cost as doing it inline); with several, concurrent stores share the folder fsync and the commit.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from db.ingest import IngestIndex, InstanceRecord
from node.spool import Spool

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    record: InstanceRecord
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

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, record: InstanceRecord) -> bool:
        """Make the record's file durable and index it; blocks until committed. False if a duplicate."""
        if self._thread is None:
            raise RuntimeError("committer not started")
        pending = _Pending(record)
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
            one_file_per_folder = {p.record.path.rsplit("/", 1)[0]: p.record.path for p in batch}
            for relpath in one_file_per_folder.values():
                self.spool.sync_parent(relpath)
            results = self.index.add_instances([p.record for p in batch])
            for pending, outcome in zip(batch, results, strict=True):
                if isinstance(outcome, Exception):
                    pending.error = outcome
                else:
                    pending.added = outcome
        except BaseException as exc:  # every waiting handler gets the error and answers a failure
            log.exception("group commit of %d instance(s) failed", len(batch))
            for pending in batch:
                pending.error = exc
        finally:
            for pending in batch:
                pending.done.set()
