"""Group commit: many concurrent stores share one index transaction.

Every ingest thread hands its `NewInstance` to `GroupCommitter.submit` and waits. One committer
thread takes whatever has queued up while the previous transaction was being fsynced and
commits it as the next batch. With one association that is a batch of one (no added delay);
with N busy associations the database fsync is paid once per batch instead of once per
instance.

If a batch fails, its items are retried one by one, so a single bad row cannot fail the
stores that happened to share its transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index.base import AddResult, Index, NewInstance

log = logging.getLogger(__name__)

_STOP = object()


class GroupCommitter:
    def __init__(self, index: Index, max_batch: int = 256) -> None:
        self.index = index
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()
        self.batches = 0
        self.committed = 0

    def submit(self, item: NewInstance) -> Future[AddResult]:
        fut: Future[AddResult] = Future()
        self._queue.put((item, fut))
        return fut

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)  # type: ignore[arg-type]
            if stop:
                return

    def _commit(self, batch: list[tuple[NewInstance, Future[AddResult]]]) -> None:
        try:
            results = self.index.add_batch([item for item, _ in batch])
        except Exception as e:
            if len(batch) > 1:
                for pair in batch:
                    self._commit([pair])
                return
            err = (
                e
                if isinstance(e, IndexUnavailable)
                else IndexUnavailable(f"index commit failed: {type(e).__name__}: {e}")
            )
            if not isinstance(e, IndexUnavailable):
                log.exception("index commit failed for %s", batch[0][0].sop_uid)
            batch[0][1].set_exception(err)
            return
        self.batches += 1
        self.committed += len(batch)
        for (_, fut), result in zip(batch, results, strict=True):
            fut.set_result(result)
