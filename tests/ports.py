"""Free TCP ports for the servers tests start (pacsgrid, PostgreSQL, SeaweedFS, HAProxy).

A port the kernel hands out for `bind(0)` is an ephemeral port: released, it goes back to the
range every outgoing connection on the machine draws from (other tests, other developers'
runs), and may be taken before the server the test starts binds it ("Address already in
use"). Ports here are picked at random below that range, where only listeners live.
"""

from __future__ import annotations

from pacsgrid.drill.procs import free_ports

__all__ = ["free_port", "free_ports"]


def free_port() -> int:
    return free_ports(1)[0]
