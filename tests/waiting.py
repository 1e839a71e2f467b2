"""Waiting in tests: on a condition, with a generous bound and a clear failure.

A test never sleeps in place of something happening. It names the condition it waits for,
polls it, and fails with what it waited for (and the last thing it saw) when the bound runs
out. Bounds are generous because the suite runs on loaded 2-core machines: a bound is a
safety net against a hang, never a speed expectation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    every: float = 0.05,
    seen: Callable[[], object] | None = None,
) -> T:
    """Poll `condition` until it returns something true, and return that.

    `what` says what the test waits for; `seen()` (optional) what it saw instead, both in
    the AssertionError raised after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"; last seen: {seen()!r}" if seen is not None else ""
            raise AssertionError(f"not within {timeout:g}s: {what}{detail}")
        time.sleep(every)
