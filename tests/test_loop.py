"""The loop of the background jobs: passes until stopped, a pause cut short by stop or wakeup."""

from __future__ import annotations

import asyncio
import threading

from pacsgrid.jobs.loop import repeat, repeat_in_thread


def test_passes_go_on_until_stopped_and_stop_ends_a_pause() -> None:
    async def main() -> int:
        stop = asyncio.Event()
        passes = 0

        async def one_pass() -> float:
            nonlocal passes
            passes += 1
            if passes == 3:
                stop.set()
                return 3600.0  # a long pause: stop ends it
            return 0.0

        await asyncio.wait_for(repeat(stop, one_pass), 60)
        return passes

    assert asyncio.run(main()) == 3


def test_a_blocking_pass_is_woken_early_and_halted() -> None:
    async def main() -> list[bool]:
        stop = asyncio.Event()
        wakeup = threading.Event()
        loop = asyncio.get_running_loop()
        halted: list[bool] = []

        def one_pass(halt: threading.Event) -> float:
            halted.append(halt.is_set())
            if len(halted) == 1:
                wakeup.set()  # e.g. a site came back up: the next pass starts at once
            else:
                loop.call_soon_threadsafe(stop.set)
            return 3600.0

        await asyncio.wait_for(repeat_in_thread(stop, one_pass, wakeup=wakeup), 60)
        return halted

    assert asyncio.run(main()) == [False, False]


def test_nothing_runs_once_stopped() -> None:
    async def main() -> int:
        stop = asyncio.Event()
        stop.set()
        calls = 0

        def one_pass(halt: threading.Event) -> float:
            nonlocal calls
            calls += 1
            return 3600.0

        await asyncio.wait_for(repeat_in_thread(stop, one_pass), 60)
        return calls

    assert asyncio.run(main()) <= 1  # the relay may not have run before the thread starts
