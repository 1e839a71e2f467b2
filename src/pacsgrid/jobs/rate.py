"""A bandwidth limit shared by the threads of one job (token bucket without a burst)."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, mb_per_s: float) -> None:
        self.rate = mb_per_s * 1e6
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int, stop: threading.Event | None = None) -> None:
        """Wait until `nbytes` more fit in the limit (returns at once when unlimited)."""
        if self.rate <= 0 or nbytes <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        wait = start - now
        if wait > 0:
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
