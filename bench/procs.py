"""Processes the benchmark runs and watches: DCMTK tools, pacsgrid commands, CPU and memory
from /proc (the servers themselves are started by the tests' launchers, tests.peers).

A server's cost is measured on its whole process tree (pacsgrid's supervisor and workers,
storescp's forked children, Orthanc's threads): CPU is utime+stime plus the CPU of children it
already reaped (cutime+cstime), summed over every live process of the tree, so a delta between
two samples is what the tree spent in between, whoever of its processes spent it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tests.peers as launchers

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """Something the benchmark needs is missing or failed (one line, for the operator)."""


def stop_on_sigterm() -> None:
    """SIGTERM stops a benchmark like Ctrl-C: its servers are stopped and what it measured
    kept (the runners handle KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def dcmtk_tool(name: str) -> str:
    """Path of a DCMTK command line tool (not pynetdicom's scripts of the same names)."""
    try:
        return launchers.dcmtk_tool(name)
    except launchers.PeerError as e:
        raise BenchError(str(e)) from None


def pacsgrid_cli(
    *args: str | Path,
    timeout: float,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
) -> subprocess.CompletedProcess[str]:
    """Run `pacsgrid ARGS` to its end (output captured, exit code left to the caller); `env`
    replaces the environment (bench.ab: another build first on PYTHONPATH)."""
    try:
        return subprocess.run(
            [python, "-m", "pacsgrid", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"pacsgrid {args[0]} did not finish in {timeout:.0f}s") from None


def pacsgrid_status(
    *options: str | Path,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """`pacsgrid status --json OPTIONS` (the archive's options: --data-dir, --site...)."""
    out = pacsgrid_cli("status", "--json", *options, timeout=timeout, env=env, python=python)
    if out.returncode != 0:
        raise BenchError(f"pacsgrid status failed: {out.stderr.strip()[-500:]}")
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    for line in (out.stdout + out.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


# ---------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, user and system CPU seconds of the process and its reaped children)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + cutime) / CLK_TCK, (stime + cstime) / CLK_TCK


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes; zeros for a process that is gone or a zombie."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive (or not yet reaped) now."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents.setdefault(st[0], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def tree_cpu(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the tree."""
    user = system = 0.0
    for pid in tree(root):
        st = _stat(pid)
        if st is not None:
            user += st[1]
            system += st[2]
    return user, system


@dataclass(frozen=True)
class Usage:
    user_seconds: float
    system_seconds: float
    peak_rss: int  # bytes

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.system_seconds


class Sampler:
    """CPU and peak memory of a process tree while a measurement runs.

    Peak RSS is the largest sum of VmRSS over the tree seen by sampling every `interval`
    seconds, or the largest single process's VmHWM if that is higher (a peak between samples).
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._peak = 0
        self._cpu0 = (0.0, 0.0)

    def __enter__(self) -> Sampler:
        self._cpu0 = tree_cpu(self.root)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        total = hwm = 0
        for pid in tree(self.root):
            rss, peak = _memory(pid)
            total += rss
            hwm = max(hwm, peak)
        self._peak = max(self._peak, total, hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def usage(self) -> Usage:
        """What the tree used since `__enter__`; call after the work is done."""
        self._sample()
        user, system = tree_cpu(self.root)
        return Usage(user - self._cpu0[0], system - self._cpu0[1], self._peak)


def wait_idle(
    root: int, quiet: float = 0.3, timeout: float = 30.0, threshold: float = 0.03
) -> None:
    """Wait until the tree spends less than `threshold` CPU seconds in `quiet` seconds:
    a server that just started has finished importing and spawning before it is measured."""
    deadline = time.monotonic() + timeout
    last = sum(tree_cpu(root))
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = sum(tree_cpu(root))
        if now - last < threshold:
            return
        last = now
