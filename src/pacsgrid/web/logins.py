"""Password logins under attack: bounded checks on their own threads, back-off per address.

A password check is scrypt, slow on purpose (~50 ms of a core, 16 MB). Run on the pool that
serves every other request, 64 clients guessing passwords made a legitimate search wait seconds.
So password checks get their own `http.password_checks` threads, and at most four times as many
may wait: beyond that a login is answered 429 at once (an API token, checked by a hash lookup,
is never held up by them). And an address that sent `http.login_failures` wrong passwords must
wait `http.login_backoff` seconds (429 with Retry-After, no password checked), twice as long
after each further wrong password, up to `http.login_backoff_max`; an address with no wrong
password for that long starts afresh. The start of each wait is audited.

Behind a reverse proxy every client has the proxy's address, and they wait together.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pacsgrid import metrics
from pacsgrid.settings import HttpSettings
from pacsgrid.web.problems import Problem

T = TypeVar("T")
_MAX_ADDRESSES = 10_000


@dataclass
class _Address:
    failures: int = 0
    last: float = 0.0  # time of the last wrong password
    until: float = 0.0  # no password checked before this time
    period: float = 0.0  # length of the current (or last) wait


class LoginGate:
    def __init__(self, http: HttpSettings) -> None:
        self.pool = ThreadPoolExecutor(http.password_checks, thread_name_prefix="password")
        self.capacity = 5 * http.password_checks  # running and waiting
        self.pending = 0
        self.allowed = http.login_failures
        self.backoff = http.login_backoff
        self.backoff_max = http.login_backoff_max
        self.addresses: dict[str, _Address] = {}

    def admit(self, address: str) -> None:
        """Problem(429) when `address` must wait, or when too many checks are under way."""
        a = self.addresses.get(address)
        left = a.until - time.monotonic() if a is not None else 0.0
        if left > 0:
            metrics.LOGIN_REFUSED.labels("backoff").inc()
            raise Problem(
                429,
                f"too many wrong passwords from {address}: try again in {math.ceil(left)}s",
                headers={"Retry-After": str(math.ceil(left))},
            )
        if self.pending >= self.capacity:
            metrics.LOGIN_REFUSED.labels("busy").inc()
            raise Problem(
                429,
                "too many password checks under way: try again (API tokens are not held up)",
                headers={"Retry-After": "1"},
            )

    async def check(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one password check on the gate's own threads."""
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, functools.partial(fn, *args))
        finally:
            self.pending -= 1

    def failed(self, address: str) -> float:
        """Count a wrong password from `address`; the wait that starts now (0: none)."""
        now = time.monotonic()
        a = self.addresses.get(address)
        if a is None or now - a.last > self.backoff_max:
            if len(self.addresses) >= _MAX_ADDRESSES:
                self._forget(now)
            a = self.addresses[address] = _Address()
        a.failures += 1
        a.last = now
        if a.failures < self.allowed or now < a.until:
            return 0.0  # below the limit, or already waiting (checks admitted before it began)
        a.period = min(2 * a.period, self.backoff_max) if a.period else self.backoff
        a.until = now + a.period
        return a.period

    def _forget(self, now: float) -> None:
        for address in [k for k, a in self.addresses.items() if now - a.last > self.backoff_max]:
            del self.addresses[address]
        if len(self.addresses) >= _MAX_ADDRESSES:  # a flood of addresses: keep the waiting
            for address in [k for k, a in self.addresses.items() if a.until <= now]:
                del self.addresses[address]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
