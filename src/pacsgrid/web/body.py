"""Reading request bodies: bounded in size and in how long they may stall.

aiohttp's `request.read()` waits for ever on a client that stops sending, and collects the body
in a buffer it then copies. Every handler that takes a body reads it here instead: chunk by
chunk as it arrives, 413 as soon as more than `http.max_upload` bytes came, and 408 (connection
closed) when no byte arrived for `http.body_timeout` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from pacsgrid.web.context import ctx_of
from pacsgrid.web.problems import Problem


async def chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The body as it arrives (Problem 408 on a stall, 413 beyond the limit)."""
    http = ctx_of(request).settings.http
    limit: int = http.max_upload
    stall: float = http.body_timeout
    total = 0
    while True:
        try:
            async with asyncio.timeout(stall):
                chunk = await request.content.readany()
        except TimeoutError:
            raise Problem(
                408,
                f"request body stalled: no data for {stall:g}s (http.body_timeout)",
                close=True,
            ) from None
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            raise Problem(
                413, f"request body too large (limit {limit} bytes, http.max_upload)", close=True
            )
        yield chunk


async def read(request: web.Request) -> bytes:
    """The whole body (small bodies: JSON of the admin API)."""
    return b"".join([c async for c in chunks(request)])
