"""Processes a drill starts: each with its own log file, stopped (or killed, paused) by its
PID, never by name; and free ports on 127.0.0.1 for the servers it starts.

A drill's deployment must leave nothing behind, whatever happens to it: every `Proc` is
registered in a `Procs` set that stops them all (newest first) when the drill ends, is
interrupted or fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pacsgrid.errors import DrillError

__all__ = ["DrillError", "Proc", "Procs", "free_ports"]


def _ephemeral_start() -> int:
    try:
        low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low = 32768
    return min(low, 32768)


_random = random.Random(os.getpid() ^ time.monotonic_ns())


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports nothing listens on now, below the ephemeral range (a port released
    by `bind(0)` goes back to the range outgoing connections draw from)."""
    top = _ephemeral_start()
    out: list[int] = []
    for _ in range(1000 * n):
        port = _random.randrange(20000, top)
        if port in out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        out.append(port)
        if len(out) == n:
            return out
    raise DrillError("no free port found below the ephemeral range")


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (deepest first)."""
    out: list[int] = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            for child in fh.read().split():
                out += children(int(child)) + [int(child)]
    except OSError:
        pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Proc:
    """One program the drill runs, its output in `log`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | Path],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> None:
        self.name = name
        self.user = user
        self.argv = [str(a) for a in argv]
        self.log = log
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else 0

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
                user=self.user,
                # Its own process group: a Ctrl-C on the drill's terminal reaches the drill
                # only, which then stops everything in order.
                start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_port(self, host: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                code = self.popen.returncode if self.popen else None
                raise DrillError(f"{self.name} exited ({code}):\n{self.tail()}")
            if listening(host, port):
                return
            time.sleep(0.1)
        raise DrillError(f"{self.name}: nothing listens on {host}:{port} after {timeout:g}s")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; its children too if it leaves them."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            signal_all([self.pid], signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self.popen = None

    def kill(self) -> None:
        """SIGKILL the process and everything it started (a machine that died)."""
        if self.popen is None:
            return
        pids = [self.pid, *children(self.pid)]
        signal_all(pids, signal.SIGKILL)
        self.popen.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.popen = None

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its sockets open."""
        if self.popen is not None:
            signal_all([self.pid, *children(self.pid)], signal.SIGSTOP)

    def resume(self) -> None:
        if self.popen is not None:
            signal_all([self.pid, *children(self.pid)], signal.SIGCONT)


class Procs:
    """Every process of one deployment. `stop_all` stops them together (a volume server or
    Patroni can take seconds to shut down cleanly), the ones marked `last` (what the others
    report to: etcd, the SeaweedFS master) after the rest."""

    def __init__(self) -> None:
        self.started: list[Proc] = []
        self.last: set[int] = set()

    def start(self, proc: Proc, *, last: bool = False) -> Proc:
        self.start_tracking(proc, last=last)
        return proc.start()

    def start_tracking(self, proc: Proc, *, last: bool = False) -> None:
        """Count `proc` (already started) in for `stop_all`."""
        self.started.append(proc)
        if last:
            self.last.add(id(proc))

    def stop_all(self) -> None:
        first = [p for p in self.started if id(p) not in self.last]
        then = [p for p in self.started if id(p) in self.last]
        for group in (first, then):
            threads = [threading.Thread(target=_quiet_stop, args=(p,)) for p in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.started.clear()
        self.last.clear()


def _quiet_stop(proc: Proc) -> None:
    with contextlib.suppress(Exception):
        proc.stop()
