"""Checkpoints of the site logs: files flushed, index flushed, log space reused.

A store is acknowledged once its object is durable in a site's log (storage/wal.py); its file
and index row are written without a flush. This thread makes them durable later, off the path
a store waits on: when a log segment fills up (at once), and at the latest
`durability.checkpoint_seconds` after a segment was started. Waiting helps: by then the
kernel has usually written the files back, and flushing a clean file costs little.

Errors (a site that went away, an index that cannot commit) leave the segments in place, so
nothing is lost: the checkpoint is retried with back-off, and a crash meanwhile is recovered
from the log like any other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from pacsgrid.errors import PacsgridError
from pacsgrid.storage import LoggedSite, StorageSite

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self, sites: Sequence[StorageSite], sync_index: Callable[[], None], interval: float
    ) -> None:
        self.sites = [s for s in sites if isinstance(s, LoggedSite)]
        self.sync_index = sync_index
        self.interval = interval
        self.checkpoints = 0
        self._due = threading.Event()
        self._closed = threading.Event()
        self._run_lock = threading.Lock()  # one checkpoint at a time
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        for site in self.sites:
            site.on_rotate(self._wake)

    def _wake(self) -> None:
        self._due.set()
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._loop, name="checkpoint", daemon=True)
                self._thread.start()

    def warm(self) -> None:
        """A serving process: prepare every log now and start checkpointing."""
        for site in self.sites:
            try:
                site.warm()
            except PacsgridError as e:
                log.warning("cannot prepare the log of site %s: %s", site.name, e)
        self._start()

    def started_writing(self) -> None:
        """Called on the first write through a log (checkpoints by age need the thread)."""
        if self._thread is None:
            self._start()

    def _loop(self) -> None:
        errors = 0
        while not self._closed.is_set():
            self._due.wait(min(self.interval / 2, 5.0) * (2 ** min(errors, 5)))
            self._due.clear()
            if self._closed.is_set():
                return
            errors = 0 if self.run(max_age=self.interval) else errors + 1

    def run(self, *, max_age: float | None) -> bool:
        """One checkpoint of every logged site; False if one failed (it will be retried)."""
        ok = True
        with self._run_lock:
            for site in self.sites:
                try:
                    if site.checkpoint(self.sync_index, max_age=max_age):
                        self.checkpoints += 1
                except PacsgridError as e:
                    ok = False
                    log.warning("checkpoint of site %s failed (retried): %s", site.name, e)
        return ok

    def close(self) -> None:
        """A clean stop: checkpoint everything (no store is in flight any more)."""
        self._closed.set()
        self._due.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if any(site.log_pending() for site in self.sites):
            self.run(max_age=None)
        for site in self.sites:
            site.close_log()
