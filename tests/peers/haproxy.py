"""HAProxy (Debian's package) in front of archive nodes, for tests and benchmarks: started in
the foreground (-db) on 127.0.0.1 and a free port, stopped by its PID; node states read from
its stats socket."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from pacsgrid.deploy import haproxy_config
from tests.peers.program import HOST, PeerError, Program, free_port
from tests.waiting import wait_until


class HAProxy(Program):
    """HAProxy balancing DICOM over `nodes` (name, host, port), started and listening on
    `port` when the constructor returns; `inter` is how often it checks each node, and
    `check_timeout` how long a check may take (two in a row too slow: the node is DOWN)."""

    def __init__(
        self,
        workdir: Path,
        nodes: list[tuple[str, str, int]],
        *,
        inter: str = "500ms",
        check_timeout: str = "1s",
    ) -> None:
        exe = shutil.which("haproxy")
        if exe is None:
            raise PeerError("haproxy not found: install Debian's haproxy (scripts/test does)")
        self.port = free_port()
        super().__init__("haproxy", workdir / f"haproxy-{self.port}.log")
        self.sock = workdir / f"haproxy-{self.port}.sock"
        self.cfg = workdir / f"haproxy-{self.port}.cfg"
        self.cfg.write_text(
            haproxy_config(
                nodes,
                listen=f"{HOST}:{self.port}",
                inter=inter,
                check_timeout=check_timeout,
                fall=2,
                rise=1,
                stats_socket=str(self.sock),
            )
        )
        self.launch([exe, "-db", "-f", self.cfg])
        self.wait_listening(self.port, 30)

    def states(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, ...) as HAProxy sees it."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "pacsgrid" and row.get("svname") not in ("BACKEND", None):
                out[row["svname"]] = row["status"].split()[0]
        return out

    def wait_state(self, name: str, state: str, timeout: float = 30) -> float:
        """Seconds until `name` is in `state`."""
        t0 = time.monotonic()
        seen: dict[str, str] = {}

        def reached() -> bool:
            nonlocal seen
            try:
                seen = self.states()
            except OSError:  # the stats socket is not there yet
                seen = {}
            return seen.get(name) == state

        wait_until(reached, timeout, f"haproxy sees {name} {state}", seen=lambda: seen)
        return time.monotonic() - t0
