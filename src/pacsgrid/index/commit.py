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

An index whose every batch has a fixed cost far above its cost per instance
(`Index.gather_seconds`: PostgreSQL, where a batch is two round trips and a transaction on
the server) also gathers: a store announces itself when it starts writing its object
(`on_the_way`), and a leader about to take a batch while such stores are under way waits,
for at most that long, for them to reach the queue. A single writer on
an idle archive has nobody on the way and never waits. A store that did not reach the queue
within a whole gathering (a large object, a slow site) is not waited for again: it would
otherwise hold every batch of its process back for as long as it writes.

An item committed with `durable=False` (its object is in a site log that replays it after a
crash, see storage/wal.py) lets the batch commit without a flush; one durable item makes the
whole batch durable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


class Slot:
    """A store on its way to the committer (see `GroupCommitter.on_the_way`)."""

    arrived = False
    slow = False  # it missed a whole gathering: no longer counted in `_coming`


class GroupCommitter:
    def __init__(self, index: Catalog, max_batch: int = 256) -> None:
        self.index = index
        self.max_batch = max_batch
        self.max_leaders = max(1, index.concurrent_batches)
        self.gather = index.gather_seconds
        self._cond = threading.Condition()
        self._queue: list[_Entry] = []
        self._leading = 0
        self._gathering = False
        self._coming = 0  # announced stores not queued yet (and not slow)
        self._on_the_way: set[Slot] = set()
        self.batches = 0
        self.committed = 0

    @contextmanager
    def on_the_way(self) -> Iterator[Slot]:
        """Around a store from the start of its object's write to its `commit(slot=...)`:
        a gathering leader waits for it. A store that fails before committing leaves."""
        slot = Slot()
        with self._cond:
            self._coming += 1
            self._on_the_way.add(slot)
        try:
            yield slot
        finally:
            if not slot.arrived:
                with self._cond:
                    self._arrive(slot)

    def _arrive(self, slot: Slot) -> None:
        slot.arrived = True
        self._on_the_way.discard(slot)
        if slot.slow:
            return
        self._coming -= 1
        if self._gathering:
            self._cond.notify_all()

    def commit(
        self, item: NewInstance, *, durable: bool = True, slot: Slot | None = None
    ) -> AddResult:
        """Index `item` (in a batch with whatever else is waiting); raise IndexUnavailable."""
        entry = _Entry(item, durable)
        with self._cond:
            self._queue.append(entry)
            if slot is not None and not slot.arrived:
                self._arrive(slot)
            while True:
                if entry.done:
                    break
                if self._leading < self.max_leaders and self._queue and not self._gathering:
                    self._leading += 1
                    if self.gather and self._coming:
                        self._gather()
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

    def _gather(self) -> None:
        """Wait (the lock held, released while waiting) until every announced store has
        queued, the batch is full, or `gather` seconds have passed; in the last case the
        stores that were on their way before it began are slow, and not waited for again."""
        self._gathering = True
        try:
            waited = [s for s in self._on_the_way if not s.slow]
            end = time.monotonic() + self.gather
            while self._coming and len(self._queue) < self.max_batch:
                left = end - time.monotonic()
                if left <= 0:
                    for s in waited:
                        if not s.arrived:
                            s.slow = True
                            self._coming -= 1
                    break
                self._cond.wait(left)
        finally:
            self._gathering = False
            if len(self._queue) > self.max_batch:  # the rest may lead a batch of its own
                self._cond.notify_all()

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
