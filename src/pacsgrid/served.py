"""Who serves an archive: the lock `pacsgrid serve` holds on its data folder while it runs.

`serve` locks `<data_dir>/serve.lock` (flock, exclusive) before it touches anything and keeps
the descriptor open for its whole life. Its DICOM worker processes inherit the descriptor, so
the archive counts as served while any process of the server lives, a worker orphaned by a
killed supervisor included: a new `serve` of the same folder waits for such processes to go
(they stop by themselves, see pacsgrid.node) and never shares the DICOM port with them.

Commands that must not run under a live server (`restore --force` moves the index aside) take
the same lock, without waiting, and refuse with one line naming the processes that hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pacsgrid.errors import ArchiveInUse
from pacsgrid.storage.durable import mkdir_durable

log = logging.getLogger(__name__)

LOCK_NAME = "serve.lock"


def lock_path(data_dir: Path) -> Path:
    return data_dir / LOCK_NAME


def _open(data_dir: Path) -> int:
    mkdir_durable(data_dir)  # the first to create it: its name must survive a power cut
    return os.open(lock_path(data_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def hold_for_serving(data_dir: Path, wait: float) -> int:
    """Lock the archive for `serve`; the descriptor to keep open (and pass to workers).

    Waits up to `wait` seconds for the processes of a previous server of this archive to exit,
    then raises ArchiveInUse naming them."""
    fd = _open(data_dir)
    deadline = time.monotonic() + wait
    told = False
    while not _try(fd):
        if time.monotonic() >= deadline:
            os.close(fd)
            raise ArchiveInUse(f"cannot serve {data_dir}: {describe(data_dir)}")
        if not told:
            log.warning(
                "%s; waiting up to %.0fs for them to exit",
                describe(data_dir),
                deadline - time.monotonic(),
            )
            told = True
        time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for people; holders() is what is trusted
    return fd


@contextlib.contextmanager
def exclusive(data_dir: Path, what: str) -> Iterator[None]:
    """Hold the archive for `what` (no `serve` may run or start meanwhile)."""
    fd = _open(data_dir)
    try:
        if not _try(fd):
            raise ArchiveInUse(f"cannot {what} while the archive is served: {describe(data_dir)}")
        yield
    finally:
        os.close(fd)


def describe(data_dir: Path) -> str:
    """Who holds the lock, in words: 'in use by pacsgrid serve pid 12 (workers 13, 14)'."""
    pids = holders(lock_path(data_dir))
    if not pids:
        return f"{data_dir} is in use (its serve.lock is held)"
    parents = {pid: _parent(pid) for pid in pids}
    leaders = [p for p in pids if parents[p] not in pids]
    parts = []
    for leader in leaders:
        workers = [p for p in pids if parents[p] == leader]
        if _is_worker(leader):
            parts.append(f"pid {leader} (a DICOM worker whose supervisor is gone)")
        else:
            parts.append(f"pid {leader}" + (f" (workers {_pids(workers)})" if workers else ""))
    return f"{data_dir} is in use by pacsgrid serve {'; '.join(parts)}"


def _pids(pids: list[int]) -> str:
    return ", ".join(map(str, pids))


def _is_worker(pid: int) -> bool:
    try:
        return b"--worker-fd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def holders(path: Path) -> list[int]:
    """Processes with `path` open (Linux /proc; empty elsewhere)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    out = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in os.scandir(f"/proc/{entry.name}/fd"):
                    st = os.stat(fd.path)
                    if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                        out.append(int(entry.name))
                        break
    return sorted(out)


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])
