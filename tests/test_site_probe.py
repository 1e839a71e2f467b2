"""The health probe of a folder site never leaves a file behind, whatever stops it: watched
with inotify on a real `pacsgrid serve` that probes every half second, the probes write (a
file written and closed in `.incoming`: an unnamed O_TMPFILE file) but never create a name
there, so a SIGTERM landing mid-probe cannot leave one; after the SIGTERM `.incoming` is
empty.

(A named probe file, created then unlinked, was left in `.incoming` by a server stopped
between the two under load.)"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from tests.conftest import Server

IN_CLOSE_WRITE, IN_CREATE, IN_MOVED_TO = 0x8, 0x100, 0x80


class Inotify:
    """Events on one folder (Linux inotify, through libc)."""

    def __init__(self, folder: Path, mask: int) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = self.libc.inotify_add_watch(self.fd, str(folder).encode(), mask)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def events(self) -> list[tuple[int, str]]:
        """(mask, name) of every event since the last call."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                _, mask, _, size = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16 : pos + 16 + size].rstrip(b"\0").decode()
                out.append((mask, name))
                pos += 16 + size

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.slow
def test_probes_never_name_a_file_in_incoming(tmp_path: Path) -> None:
    server = Server(
        tmp_path / "archive", workers=1, env={"PACSGRID_REPLICATION_PROBE_INTERVAL": "0.5"}
    ).start()
    incoming = server.data_dir / "objects" / ".incoming"
    watch = Inotify(incoming, IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO)
    seen: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 120
        while sum(1 for mask, _ in seen if mask & IN_CLOSE_WRITE) < 10:  # ten probes
            assert time.monotonic() < deadline, f"no probes seen: {seen}"
            time.sleep(0.2)
            seen += watch.events()
        assert server.stop(signal.SIGTERM) == 0
        seen += watch.events()
    finally:
        watch.close()
        server.stop()
    created = [name for mask, name in seen if mask & (IN_CREATE | IN_MOVED_TO)]
    assert created == [], f"probes named files in .incoming: {created[:5]}"
    assert list(incoming.iterdir()) == []
