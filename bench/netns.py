"""A private network namespace for a benchmark run (`unshare --net`, as root).

Orthanc 1.10 and DCMTK 3.6.7 storescp cannot choose the address they listen on; inside a
namespace whose only interface is its own loopback they can only be reached from the benchmark.
The runner re-executes itself inside one and carries on there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = "PACSGRID_BENCH_NETNS"


def inside() -> bool:
    return os.environ.get(ENV) == "1"


def enter(module: str, argv: list[str], mode: str) -> int | None:
    """Run `python -m module argv` in a new namespace and return its exit code, or return
    None when the caller should go on in this process (already inside, or `mode` "off", or
    "auto" where no namespace can be made). 2 when `mode` is "on" and none can be made."""
    if not inside() and mode != "off":
        if _possible():
            return _reexec(module, argv)
        if mode == "on":
            print(
                "bench: cannot create a network namespace (needs root and unshare)", file=sys.stderr
            )
            return 2
    if inside():
        _loopback_up()
    return None


def _possible() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--net", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _loopback_up() -> None:
    """`ip link set lo up` without needing iproute2: SIOCGIFFLAGS / SIOCSIFFLAGS."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _reexec(module: str, argv: list[str]) -> int:
    env = {**os.environ, ENV: "1"}
    cmd = ["unshare", "--net", "--", sys.executable, "-m", module, *argv]
    # Its own session: Ctrl-C reaches only this process, which passes it on exactly once (a
    # second one could interrupt the child while it stops its servers).
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
