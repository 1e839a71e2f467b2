"""`pacsgrid drill --short` as a user runs it: it starts its own deployment (two nodes behind
HAProxy, Patroni, a SeaweedFS cluster, a tmpfs folder site, a network namespace), injects
every kind of fault, checks every acknowledged instance by C-FIND and a byte-compare C-GET,
reports, and leaves nothing behind; Ctrl-C stops it cleanly too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import wait_until

pytestmark = [pytest.mark.slow]

KINDS = [
    "kill-node",
    "hang-node",
    "kill-db-primary",
    "kill-volume-server",
    "fill-folder-site",
    "cut-network",
]


@pytest.fixture(autouse=True)
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the drill needs root (a network namespace, a tmpfs)")


def drill(workdir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pacsgrid", "drill", "--short", "--workdir", str(workdir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def left_behind(workdir: Path) -> list[str]:
    """Processes, mounts and namespaces of this drill still there."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmdline and " drill " not in cmdline:
            out.append(f"process {pid}: {cmdline[:200]}")
        # Patroni, PostgreSQL and etcd run in a folder of their own that the drill removes
        # when it stops them: a process still naming a removed one is the drill's.
        for folder in re.findall(r"/tmp/pacsgrid-patroni-[^/\s]+", cmdline):
            if not Path(folder).exists():
                out.append(f"process {pid}: {cmdline[:200]}")
    mounts = Path("/proc/mounts").read_text()
    out += [f"mount {line}" for line in mounts.splitlines() if str(workdir) in line]
    return out


def namespace_left(proc: subprocess.Popen[str]) -> bool:
    """Whether the namespace of this drill (named after its PID) is still there; other
    drills running on the machine at the same time have their own."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in listing.splitlines() if line.strip()}
    return f"pacsgrid-drill-{proc.pid % 100000}" in names


def test_short_drill_loses_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "drill"
    report = tmp_path / "report.md"
    proc = drill(work, "--report", str(report))
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-5000:] + out
    text = report.read_text()
    assert text == out
    assert "**lost acknowledged instances: 0**" in text
    rows = [line.split("|") for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert sorted({r[2].strip() for r in rows}) == sorted(KINDS)
    for r in rows:
        assert r[5].strip() != "-", f"no store succeeded after {r[2]}: {text}"
        assert r[6].strip() != "-", f"no retrieve succeeded after {r[2]}: {text}"
    acked = int(re.search(r"acknowledged instances checked: (\d+)", text)[1])  # type: ignore[index]
    identical = int(re.search(r"byte-identical by C-GET: (\d+)", text)[1])  # type: ignore[index]
    assert acked > 50 and identical == acked, text
    assert "step 1/" in err and "checking" in err  # progress on standard error
    assert not left_behind(work), left_behind(work)
    assert not namespace_left(proc)
    print("\n" + text)


def test_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    work = tmp_path / "drill"
    proc = drill(work)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        wait_until(
            lambda: _read_until(proc, lines, "step 1/"), 300, "the drill's first fault",
            seen=lambda: lines[-5:],
        )  # fmt: skip
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, "".join(lines) + err
    assert "interrupted" in err
    assert "the check of every instance did not run" in out
    assert not left_behind(work), left_behind(work)
    assert not namespace_left(proc)


def _read_until(proc: subprocess.Popen[str], lines: list[str], marker: str) -> bool:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if line:
        lines.append(line)
    if proc.poll() is not None and not line:
        raise AssertionError("the drill ended early:\n" + "".join(lines))
    return marker in line
