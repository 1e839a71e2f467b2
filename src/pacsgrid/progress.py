"""Progress for long work (import, reindex, repair, migrate).

On a terminal: a tqdm bar with rates. Otherwise (a service, a cron job, CI): one log line
every `interval` seconds with the counters, so an administrator reading the log at 3 a.m. can
see how far it got and how fast it is going.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from types import TracebackType
from typing import Any

log = logging.getLogger("pacsgrid.progress")


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "files",
        interval: float = 10.0,
        bar: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.counts: Counter[str] = Counter()
        self.bytes = 0
        self.done = 0
        self.started = time.monotonic()
        self._interval = interval
        self._last_log = self.started
        self._lock = threading.Lock()
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar: Any = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=label,
                unit=unit[:-1] if unit.endswith("s") else unit,
                dynamic_ncols=True,
            )

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def advance(self, outcome: str, nbytes: int = 0) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.done += 1
            self.bytes += nbytes
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                return
            now = time.monotonic()
            if now - self._last_log >= self._interval:
                self._last_log = now
                log.info("%s: %s", self.label, self.summary())

    def _postfix(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        parts = [f"{k} {v}" for k, v in sorted(self.counts.items())]
        parts.append(f"{self.bytes / elapsed / 1e6:.1f} MB/s")
        return ", ".join(parts)

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (
            f"{self.done}{of} {self.unit} in {elapsed:.1f}s "
            f"({self.done / elapsed:.1f} {self.unit}/s, {self.bytes / elapsed / 1e6:.1f} "
            f"MB/s){': ' + counts if counts else ''}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
