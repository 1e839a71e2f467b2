"""What every handler shares: the archive, a thread pool for its blocking calls, and the
caller of the current request (set by the auth middleware)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from pacsgrid.archive import Archive, Caller

T = TypeVar("T")

CTX: web.AppKey[WebContext] = web.AppKey("ctx")
CALLER = "pacsgrid.caller"
# A cached value is recomputed at most every `ttl` seconds, and never more often than this many
# times the seconds its last computation took: a scan of a large index refreshed in the
# background keeps to 5% of the time instead of running back to back.
COST_FACTOR = 20.0


@dataclass
class WebContext:
    archive: Archive
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(32, thread_name_prefix="web")
    )
    # The jobs page's memory of (time, finished items) per work kind, for rates.
    job_history: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    _values: dict[str, tuple[float, Any]] = field(default_factory=dict)
    _refreshing: set[str] = field(default_factory=set)
    _cost: dict[str, float] = field(default_factory=dict)  # seconds the last computation took
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        return self.archive.settings

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking archive call in the pool (the event loop never waits on disk)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def cached(self, key: str, ttl: float, fn: Callable[[], T]) -> T:
        """A slow-changing value (index totals, site usage) computed at most every `ttl` s, so
        the dashboard stays fast on a large index. Once computed, an expired value is still
        answered at once while one background refresh replaces it (no page waits on a scan
        after the first; see COST_FACTOR)."""
        hit = self._values.get(key)
        now = time.monotonic()
        ttl = max(ttl, COST_FACTOR * self._cost.get(key, 0.0))
        if hit is not None and now - hit[0] < ttl:
            return hit[1]  # type: ignore[no-any-return]
        if hit is not None:
            if key not in self._refreshing:
                self._refreshing.add(key)
                task = asyncio.get_running_loop().create_task(self._refresh(key, fn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return hit[1]  # type: ignore[no-any-return]
        value = await self._timed(key, fn)
        self._values[key] = (time.monotonic(), value)
        return value

    async def _timed(self, key: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        value = await self.call(fn)
        self._cost[key] = time.monotonic() - start
        return value

    async def _refresh(self, key: str, fn: Callable[[], Any]) -> None:
        try:
            self._values[key] = (time.monotonic(), await self._timed(key, fn))
        except Exception:  # keep the stale value; the next expiry tries again
            logging.getLogger("pacsgrid.web").exception("refreshing %s failed", key)
        finally:
            self._refreshing.discard(key)


def ctx_of(request: web.Request) -> WebContext:
    return request.app[CTX]


def caller_of(request: web.Request) -> Caller:
    caller: Caller = request[CALLER]
    return caller
