"""What every handler shares: the archive, a thread pool for its blocking calls, and the
caller of the current request (set by the auth middleware)."""

from __future__ import annotations

import asyncio
import functools
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


@dataclass
class WebContext:
    archive: Archive
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(16, thread_name_prefix="web")
    )
    _cache: dict[str, tuple[float, Any]] = field(default_factory=dict)

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        return self.archive.settings

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking archive call in the pool (the event loop never waits on disk)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def cached(self, key: str, ttl: float, fn: Callable[[], T]) -> T:
        """A slow-changing value (index totals, site usage) computed at most every `ttl` s, so
        the dashboard stays fast on a large index."""
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < ttl:
            return hit[1]  # type: ignore[no-any-return]
        value = await self.call(fn)
        self._cache[key] = (now, value)
        return value


def ctx_of(request: web.Request) -> WebContext:
    return request.app[CTX]


def caller_of(request: web.Request) -> Caller:
    caller: Caller = request[CALLER]
    return caller
