"""Log lines about what peers send: escaped, and throttled where a peer controls their number.

Peers choose AE titles, UIDs, error comments and garbage bytes; written raw, a newline among
them forges a log line. Every record of the `pacsgrid.dicom` logger passes `EscapeControl`,
which escapes control characters in the formatted message (tracebacks, which we write, are left
alone). `Throttle` keeps a flood of connections from becoming a flood of lines: it writes the
first occurrence, then one summary per interval with the count.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("pacsgrid.dicom")


def printable(text: str) -> str:
    """`text` with every control character written as an escape (\\n, \\x1b, ...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class EscapeControl(logging.Filter):
    """Escape control characters in a record's message (its arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg = printable(message)
            record.args = ()
        return True


class Throttle:
    """At most one line per `interval` seconds for one kind of event; the next line says how
    many were not written in between. Thread-safe (associations run on their own threads)."""

    def __init__(self, interval: float = 10.0, level: int = logging.WARNING) -> None:
        self.interval = interval
        self.level = level
        self._lock = threading.Lock()
        self._next = 0.0
        self._held = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._held += 1
                return
            held, self._held = self._held, 0
            self._next = now + self.interval
        if held:
            message += f" (and {held} more like it in the last {self.interval:.0f}s)"
        log.log(self.level, message, *args)


if not any(isinstance(f, EscapeControl) for f in log.filters):
    log.addFilter(EscapeControl())
