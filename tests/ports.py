"""Free TCP ports for the servers tests start (pacsgrid, PostgreSQL, SeaweedFS, HAProxy).

A port the kernel hands out for `bind(0)` is an ephemeral port: released, it goes back to the
range every outgoing connection on the machine draws from (other tests, other developers'
runs), and may be taken before the server the test starts binds it ("Address already in
use"). Ports here are picked at random below that range, where only listeners live.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path


def _ephemeral_start() -> int:
    try:
        low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low = 32768
    return low


_TOP = min(_ephemeral_start(), 32768)
_random = random.Random(os.getpid())


def free_ports(n: int) -> list[int]:
    """`n` distinct ports nothing listens on now."""
    out: list[int] = []
    for _ in range(1000 * n):
        port = _random.randrange(20000, _TOP)
        if port in out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        out.append(port)
        if len(out) == n:
            return out
    raise RuntimeError("no free port found below the ephemeral range")


def free_port() -> int:
    return free_ports(1)[0]
