"""The faults a drill injects, each undone by `clear()`: a node killed or hung, the database
primary killed, a storage node killed, the folder site filled, a node cut off the network.

`clear()` returns once the part is back (the node answers C-ECHO again, Patroni has a leader
and a streaming replica, the volume server takes writes), bounded in time: the drill then
measures how long the archive took to serve again, not how long a restart took.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from pacsgrid.drill.deployment import Deployment, _echo
from pacsgrid.drill.procs import DrillError

FILLER = ".drill-filler"  # the one file the drill writes into the folder site (and removes)


@dataclass
class Fault:
    name: str
    what: str

    def inject(self, d: Deployment) -> None:
        raise NotImplementedError

    def clear(self, d: Deployment) -> None:
        raise NotImplementedError


class KillNode(Fault):
    def __init__(self, node: str = "a") -> None:
        super().__init__("kill-node", f"SIGKILL node {node} (every process)")
        self.node = node

    def inject(self, d: Deployment) -> None:
        node = d.node(self.node)
        if node.proc is not None:
            node.proc.kill()
        node.proc = None

    def clear(self, d: Deployment) -> None:
        d.start_node(d.node(self.node))


class HangNode(Fault):
    def __init__(self, node: str = "a") -> None:
        super().__init__("hang-node", f"SIGSTOP node {node}: its port accepts, nothing answers")
        self.node = node

    def inject(self, d: Deployment) -> None:
        proc = d.node(self.node).proc
        if proc is not None:
            proc.pause()

    def clear(self, d: Deployment) -> None:
        node = d.node(self.node)
        if node.proc is not None:
            node.proc.resume()
        _until(lambda: _echo(node.host, node.port), 60, f"node {self.node} answers again")


class KillPrimary(Fault):
    def __init__(self) -> None:
        super().__init__(
            "kill-db-primary", "SIGKILL the PostgreSQL primary and its Patroni (no promote)"
        )
        self.killed: int | None = None

    def inject(self, d: Deployment) -> None:
        assert d.patroni is not None
        self.killed = d.patroni.leader()
        if self.killed is None:
            raise DrillError("Patroni has no leader to kill")
        d.patroni.kill(self.killed)

    def clear(self, d: Deployment) -> None:
        """Wait for Patroni to promote the standby (never before: a primary back within the
        ttl would keep its leader key), then bring the old one back as a replica."""
        patroni = d.patroni
        assert patroni is not None and self.killed is not None
        old = self.killed
        _until(lambda: patroni.leader() not in (None, old), 120, "Patroni promotes the standby")
        patroni.start_node(old)
        patroni.wait_roles(180)


class KillVolume(Fault):
    def __init__(self) -> None:
        super().__init__("kill-volume-server", "SIGKILL the SeaweedFS volume server holding most")
        self.killed: int | None = None

    def inject(self, d: Deployment) -> None:
        weed = d.weed
        assert weed is not None

        def held(i: int) -> int:
            folder = weed.workdir / f"volume{i}"
            return sum(p.stat().st_size for p in folder.glob("*.dat"))

        self.killed = max(range(len(weed.volumes)), key=held)
        weed.kill_volume(self.killed)

    def clear(self, d: Deployment) -> None:
        assert d.weed is not None and self.killed is not None
        d.weed.start_volume(self.killed)
        d.weed.wait_writable(120)


class FillFolder(Fault):
    def __init__(self) -> None:
        super().__init__("fill-folder-site", "fill the folder site's filesystem to the last block")

    def inject(self, d: Deployment) -> None:
        assert d.folder is not None
        st = os.statvfs(d.folder)
        free = st.f_bavail * st.f_frsize
        fd = os.open(d.folder / FILLER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Everything but a few blocks, then the rest a block at a time: full, for sure.
            os.posix_fallocate(fd, 0, max(0, free - 64 * 1024))
            block = b"\0" * st.f_frsize
            os.lseek(fd, 0, os.SEEK_END)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
        finally:
            os.close(fd)

    def clear(self, d: Deployment) -> None:
        assert d.folder is not None
        with contextlib.suppress(FileNotFoundError):
            (d.folder / FILLER).unlink()


class CutNode(Fault):
    def __init__(self, node: str = "b") -> None:
        super().__init__("cut-network", f"take node {node}'s network link down (namespace veth)")
        self.node = node

    def inject(self, d: Deployment) -> None:
        assert d.netns is not None
        d.netns.cut()

    def clear(self, d: Deployment) -> None:
        assert d.netns is not None
        d.netns.restore()
        node = d.node(self.node)
        _until(lambda: _echo(node.host, node.port), 60, f"node {self.node} answers again")


FAULTS = {f().name: f for f in (KillNode, HangNode, KillPrimary, KillVolume, FillFolder, CutNode)}


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DrillError(f"not within {timeout:g}s: {what}")
        time.sleep(0.3)
