"""HAProxy (Debian's package) in front of archive nodes, for tests and benchmarks: started in
the foreground (-db) on 127.0.0.1 and a free port, stopped by its PID; node states read from
its stats socket."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from pacsgrid.deploy import haproxy_config
from tests.conftest import free_port, wait_port


class HAProxy:
    def __init__(
        self, workdir: Path, nodes: list[tuple[str, str, int]], *, inter: str = "500ms"
    ) -> None:
        exe = shutil.which("haproxy")
        if exe is None:
            raise RuntimeError("haproxy not found: install Debian's haproxy (scripts/test does)")
        self.port = free_port()
        self.sock = workdir / f"haproxy-{self.port}.sock"
        self.cfg = workdir / f"haproxy-{self.port}.cfg"
        self.log = workdir / f"haproxy-{self.port}.log"
        self.cfg.write_text(
            haproxy_config(
                nodes,
                listen=f"127.0.0.1:{self.port}",
                inter=inter,
                check_timeout="1s",
                fall=2,
                rise=1,
                stats_socket=str(self.sock),
            )
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "-db", "-f", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_port(self.port, 10, self.proc, self.log)

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
        while time.monotonic() - t0 < timeout:
            try:
                seen = self.states()
            except OSError:  # the stats socket is not there yet
                seen = {}
            if seen.get(name) == state:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"{name} not {state} after {timeout}s: {seen}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
