"""A network namespace joined to this machine by a veth pair, for a node that can be cut off.

The node inside listens on the namespace's end (198.18.N.2, RFC 2544's benchmarking range,
never routed anywhere); this machine's end is 198.18.N.1. `cut()` takes this machine's end
down: the node keeps running but nothing reaches it and it reaches nothing (a pulled cable,
a failed switch port); `restore()` brings the link back. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pacsgrid.drill.procs import DrillError


def netns_missing() -> str:
    """Why no namespace can be made here ("" when one can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "ip not found: apt install iproute2"
    return ""


def _ip(*args: str, netns: str = "") -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise DrillError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def _free_subnet() -> int:
    """A third octet of 198.18.N.0/30 no interface here uses yet."""
    used = str(subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout)
    n: int
    for n in [os.getpid() % 200 + 10, *range(10, 250)]:
        if f"198.18.{n}." not in used:
            return n
    raise DrillError("no free 198.18.N.0/30 subnet for the namespace")


class Namespace:
    def __init__(self, tag: str) -> None:
        self.name = f"pacsgrid-drill-{tag}"
        self.outer = f"pgd{tag}o"[:15]
        self.inner = f"pgd{tag}i"[:15]
        self.subnet = 0
        self.host = ""  # this machine's end
        self.address = ""  # the namespace's end
        self.created = False

    def create(self) -> Namespace:
        missing = netns_missing()
        if missing:
            raise DrillError(missing)
        self.subnet = _free_subnet()
        self.host = f"198.18.{self.subnet}.1"
        self.address = f"198.18.{self.subnet}.2"
        _ip("netns", "add", self.name)
        self.created = True
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _ip("link", "set", self.inner, "netns", self.name)
        _ip("addr", "add", f"{self.host}/30", "dev", self.outer)
        _ip("link", "set", self.outer, "up")
        _ip("addr", "add", f"{self.address}/30", "dev", self.inner, netns=self.name)
        _ip("link", "set", self.inner, "up", netns=self.name)
        _ip("link", "set", "lo", "up", netns=self.name)
        return self

    def argv(self, command: list[str | Path]) -> list[str | Path]:
        """`command` run inside the namespace (`ip netns exec` execs it: the PID is its own)."""
        return ["ip", "netns", "exec", self.name, *command]

    def cut(self) -> None:
        _ip("link", "set", self.outer, "down")

    def restore(self) -> None:
        _ip("link", "set", self.outer, "up")

    def delete(self) -> None:
        """Remove the namespace (and with it both ends of the veth pair)."""
        if not self.created:
            return
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        self.created = False
