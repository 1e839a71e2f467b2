"""One program a test or a benchmark runs as a peer: started with its output in a log file,
waited for until it answers on 127.0.0.1, and stopped by its PID (never by name).

The process bookkeeping (free ports below the ephemeral range, the process tree read from
/proc, signals to a list of PIDs) is the drill's (pacsgrid.drill.procs); waits go through
tests.waiting.wait_until, so a peer that does not come up fails with what it waited for and
the end of its log, and one that exits while starting fails at once with its exit code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pacsgrid.drill.procs import alive, children, free_ports, listening, signal_all
from tests.waiting import wait_until

__all__ = ["DCMTK_ENV", "HOST", "PeerError", "Program", "dcmtk_tool", "free_port", "free_ports"]

HOST = "127.0.0.1"

# Debian's DCMTK 3.6.7 leaves Nagle's algorithm on unless told otherwise (~40 ms per message):
# every DCMTK program (and Orthanc, whose DICOM layer is DCMTK) runs with this environment.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class PeerError(RuntimeError):
    """A peer program is missing, exited while starting, or never answered."""


def free_port() -> int:
    return free_ports(1)[0]


def dcmtk_tool(name: str) -> str:
    """Path of a DCMTK command line tool.

    pynetdicom installs console scripts with the same names (findscu, getscu, storescp...)
    into the virtualenv, so the virtualenv's bin folder is skipped.
    """
    venv_bin = Path(sys.prefix, "bin").resolve()
    dirs = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and Path(d).resolve() != venv_bin
    ]
    path = shutil.which(name, path=os.pathsep.join([*dirs, "/usr/bin", "/usr/local/bin"]))
    if path is None:
        raise PeerError(
            f"{name} not found: install Debian's dcmtk (scripts/test and scripts/bench do)"
        )
    return path


class Program:
    """A program and its log; `proc` is its Popen while it runs (None before and after)."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise PeerError(f"{self.name} is not running")
        return self.proc.pid

    def launch(
        self,
        argv: Sequence[str | Path],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Start the program (output appended to the log) without waiting for anything;
        `env` adds to this process's environment."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(a) for a in argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )

    def start(self, timeout: float = 60.0) -> Program:
        """Start the program and wait until it answers (each launcher knows how)."""
        raise NotImplementedError

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_running(self) -> None:
        """Raise PeerError (with the end of the log) if the program has exited."""
        if self.proc is None:
            raise PeerError(f"{self.name} is not running")
        if self.proc.poll() is not None:
            raise PeerError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.text()[-3000:]}"
            )

    def wait_ready(
        self, probe: Callable[[], object], timeout: float, what: str, *, every: float = 0.1
    ) -> None:
        """Until `probe()` is true (asked every `every` seconds); PeerError at once if the
        program exits meanwhile."""

        def ready() -> object:
            self.check_running()
            return probe()

        tail = lambda: self.text()[-1500:]  # noqa: E731
        wait_until(ready, timeout, f"{self.name}: {what}", every=every, seen=tail)

    def wait_listening(self, port: int, timeout: float) -> None:
        self.wait_ready(lambda: listening(HOST, port), timeout, f"listening on {HOST}:{port}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` (SIGTERM), SIGKILL the whole tree if it is not gone after `timeout`;
        children that outlive it (a worker that ignored the signal) are killed too.
        Returns its exit code (0 if it was not running)."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            born = {pid: _starttime(pid) for pid in children(proc.pid)}
            signal_all([proc.pid], signal.SIGCONT)  # a paused process cannot act on `sig`
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                signal_all([proc.pid, *born], signal.SIGKILL)
                proc.wait()
            # The start time tells that a PID still names the same process.
            signal_all([p for p, t in born.items() if _starttime(p) == t], signal.SIGKILL)
        self.proc = None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the program and every process it started (a machine that died)."""
        if self.proc is None:
            return
        pids = [*children(self.proc.pid), self.proc.pid]
        signal_all(pids, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        wait_until(lambda: not any(alive(p) for p in pids), 30, f"{self.name}'s processes gone")


def _starttime(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    return None
