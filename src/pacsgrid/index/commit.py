"""Group commit: many concurrent stores share one index transaction.

Each ingest thread calls `GroupCommitter.commit(item)`. If no commit is in progress, that thread
becomes the leader: it takes everything queued (its own item first) and commits it as one
batch. Threads that arrive while a commit is running queue their item and wait; when the
leader is done, one of them leads the next batch with everything that queued up in the
meantime. So one association pays one database fsync per instance with no hand-off to another
thread, and N busy associations pay one fsync per batch.

An index that can commit several batches at once (`Index.concurrent_batches`: PostgreSQL, one
per write connection) gets that many leaders: a store that arrives while one batch commits
starts the next at once instead of waiting a whole commit (PostgreSQL flushes its WAL for
concurrent commits together). SQLite has one.

If a batch fails, its items are retried one by one, so a single bad row cannot fail the
stores that happened to share its transaction.

An item committed with `durable=False` (its object is in a site log that replays it after a
crash, see storage/wal.py) lets the batch commit without a flush; one durable item makes the
whole batch durable.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index.base import AddResult, Catalog, NewInstance

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    item: NewInstance
    durable: bool = True
    done: bool = False
    result: AddResult | None = None
    error: BaseException | None = None


class GroupCommitter:
    def __init__(self, index: Catalog, max_batch: int = 256) -> None:
        self.index = index
        self.max_batch = max_batch
        self.max_leaders = max(1, index.concurrent_batches)
        self._cond = threading.Condition()
        self._queue: list[_Entry] = []
        self._leading = 0
        self.batches = 0
        self.committed = 0

    def commit(self, item: NewInstance, *, durable: bool = True) -> AddResult:
        """Index `item` (in a batch with whatever else is waiting); raise IndexUnavailable."""
        entry = _Entry(item, durable)
        with self._cond:
            self._queue.append(entry)
            while True:
                if entry.done:
                    break
                if self._leading < self.max_leaders and self._queue:
                    self._leading += 1
                    batch = self._queue[: self.max_batch]
                    del self._queue[: len(batch)]
                    self._cond.release()
                    try:
                        self._commit(batch)
                    finally:
                        self._cond.acquire()
                        self._leading -= 1
                        self._cond.notify_all()
                    continue
                self._cond.wait()
        if entry.error is not None:
            raise entry.error
        assert entry.result is not None
        return entry.result

    def close(self) -> None:
        """Nothing to flush: every commit finishes in the thread that asked for it."""

    def _commit(self, batch: list[_Entry]) -> None:
        try:
            durable = any(e.durable for e in batch)
            results = self.index.add_batch([e.item for e in batch], durable=durable)
        except Exception as e:
            if len(batch) > 1:
                for entry in batch:
                    self._commit([entry])
                return
            err = (
                e
                if isinstance(e, IndexUnavailable)
                else IndexUnavailable(f"index commit failed: {type(e).__name__}: {e}")
            )
            if not isinstance(e, IndexUnavailable):
                log.exception("index commit failed for %s", batch[0].item.sop_uid)
            batch[0].error, batch[0].done = err, True
            return
        self.batches += 1
        self.committed += len(batch)
        for entry, result in zip(batch, results, strict=True):
            entry.result, entry.done = result, True
