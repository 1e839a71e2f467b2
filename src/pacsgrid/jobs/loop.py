"""The loop every background job of `pacsgrid serve` runs in: a pass, a pause, until stopped.

Repair, the fixity audit, forwarding and the backup schedule each say what one pass does and
how long to wait before the next; stopping, and waking early, are done here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable


async def repeat(stop: asyncio.Event, one_pass: Callable[[], Awaitable[float]]) -> None:
    """Await `one_pass` again and again until `stop` is set; each pass returns how many
    seconds to wait before the next (0: go on at once)."""
    while not stop.is_set():
        pause = await one_pass()
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)


async def repeat_in_thread(
    stop: asyncio.Event,
    one_pass: Callable[[threading.Event], float],
    *,
    wakeup: threading.Event | None = None,
) -> None:
    """The same for a pass that blocks: the passes run in one worker thread and are handed an
    event that is set when `stop` is (a long pass checks it). Setting `wakeup` ends a pause
    early (a site came back up)."""
    halt = threading.Event()
    wake = wakeup if wakeup is not None else threading.Event()

    async def relay() -> None:
        await stop.wait()
        halt.set()
        wake.set()

    def run() -> None:
        while not halt.is_set():
            pause = one_pass(halt)
            if halt.is_set():
                return
            wake.wait(pause)
            wake.clear()

    relay_task = asyncio.create_task(relay())
    try:
        await asyncio.to_thread(run)
    finally:
        relay_task.cancel()
