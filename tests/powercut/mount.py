"""Start and stop the recording filesystem (fs.py) as a subprocess, by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]


def fuse_available() -> str:
    """Why the rig cannot run here ('' when it can): /dev/fuse, libfuse 2 and fusepy."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:  # fusepy raises OSError when libfuse is missing
        return f"fusepy over libfuse 2 not usable ({e}): scripts/test installs both"
    return ""


def mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == target for line in fh)


class Mount:
    """`with Mount(backing, mountpoint, history):` the recorder mounted, and stopped (SIGTERM
    to its PID, then a lazy unmount if it left the mount behind) when the block ends."""

    def __init__(self, backing: Path, mountpoint: Path, history: Path) -> None:
        self.backing, self.mountpoint, self.history = backing, mountpoint, history
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = history.with_suffix(".fs.log")

    def start(self, timeout: float = 30.0) -> Mount:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.powercut.fs", self.backing, self.mountpoint]
                + [self.history],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"recording filesystem did not mount: {self.text()[-2000:]}")
            time.sleep(0.02)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
