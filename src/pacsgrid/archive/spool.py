"""Datasets on their way in: held in memory while small, spilled to a file once large.

A C-STORE's dataset and a STOW-RS part arrive in pieces. Most are small (a CT slice is half a
megabyte): they stay in memory, the fast path. One that grows past `dicom.spill_mb` moves to a
spill file under `<data_dir>/spill/`, and the rest of it follows there as it arrives, so a
multi-gigabyte whole-slide image costs a few megabytes of the process's memory, not its size.
Ingest reads a spilled dataset through a read-only memory map (`Spool.contents`): the header
scan, the SHA-256 and the write to every site of the quorum read the page cache, never a copy
of the object in the process's own (anonymous) memory.

A spill file is never an object: no site or index knows its name, and it is removed when the
store ends, whatever the outcome (`Spool.close`, and a finalizer should a caller forget). The
process writing a file holds an flock on it; `SpillArea.sweep` removes the files whose process
is gone (a worker killed in the middle of a store), at start-up and after a worker dies. All
spill files together stay under `dicom.spill_max_mb`: a dataset that would pass the bound fails
with ArchiveUnavailable (DIMSE A700, STOW "out of resources") and its file is dropped at once,
rather than filling the disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import uuid
import weakref
from pathlib import Path

from pacsgrid.errors import ArchiveUnavailable

log = logging.getLogger(__name__)

SPILL_DIR = "spill"
_SUFFIX = ".part"
_BATCH = 1 << 20  # small pieces are gathered to this size before a write
_STEP = 16 << 20  # the bound is checked each time a file grows by this much (at most)


class SpillArea:
    """The spill folder of one archive: where large datasets wait while they arrive."""

    def __init__(self, folder: Path, threshold: int, limit: int) -> None:
        self.folder = folder
        self.threshold = threshold  # bytes kept in memory before a dataset spills
        self.limit = limit  # bytes all spill files together may hold
        self.step = max(_BATCH, min(_STEP, limit // 16))
        self._ready = False

    def spool(self) -> Spool:
        return Spool(self)

    def create(self) -> tuple[int, Path]:
        """A new spill file, locked by this process for as long as it is open."""
        if not self._ready:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._ready = True
        path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex}{_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, path

    def in_use(self) -> int:
        """Bytes the spill files of every process of this archive hold now."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.folder):
                with contextlib.suppress(OSError):
                    total += entry.stat().st_size
        return total

    def check_room(self, extra: int) -> None:
        """Raise ArchiveUnavailable unless `extra` more bytes fit under the bound."""
        used = self.in_use()
        if used + extra > self.limit:
            raise ArchiveUnavailable(
                f"no room to receive a large dataset: spill files hold {used >> 20} MB, "
                f"dicom.spill_max_mb is {self.limit >> 20}"
            )

    def sweep(self) -> int:
        """Remove the spill files whose process is gone (their lock is free); return how many.
        Files of live processes (the sweeping one included) are left alone."""
        removed = 0
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.endswith(_SUFFIX):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive and receiving
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d spill file(s) left by a process that died", removed)
        return removed


class Spool:
    """One dataset as it arrives: `write` each piece, then `contents` once it is whole, and
    `close` in every case. A spill that fails (the bound, a full disk) does not raise in
    `write`, which runs while the peer is still sending: the rest of the dataset is dropped,
    and `contents` raises the error, which the store reports."""

    def __init__(self, area: SpillArea) -> None:
        self.area = area
        self.size = 0  # bytes received
        self.error: ArchiveUnavailable | None = None
        self._parts: list[bytes] = []
        self._pending = bytearray()
        self._fd = -1
        self._written = 0  # bytes in the file
        self._allowed = 0  # the file may grow to this size before the bound is checked again
        self._map: mmap.mmap | None = None
        self._remove: weakref.finalize[[int, str], Spool] | None = None

    @property
    def spilled(self) -> bool:
        return self._remove is not None

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.error is not None:
            return
        if self._remove is None:
            if self.size <= self.area.threshold:
                self._parts.append(bytes(data))
                return
            if not self._spill():
                return
        self._pending += data
        if len(self._pending) >= _BATCH:
            self._flush()

    def _spill(self) -> bool:
        try:
            fd, path = self.area.create()
        except OSError as e:
            self._fail(ArchiveUnavailable(f"cannot spill a large dataset: {e}"))
            return False
        self._fd = fd
        self._remove = weakref.finalize(self, _remove, fd, str(path))
        for part in self._parts:
            self._pending += part
        self._parts.clear()
        return True

    def _flush(self) -> None:
        grown = self._written + len(self._pending)
        try:
            if grown > self._allowed:
                allowed = grown + self.area.step
                self.area.check_room(allowed - self._written)
                self._allowed = allowed
            with memoryview(self._pending) as view:
                done = 0
                while done < len(view):
                    done += os.write(self._fd, view[done:])
        except ArchiveUnavailable as e:
            self._fail(e)
            return
        except OSError as e:
            self._fail(ArchiveUnavailable(f"cannot spill a large dataset: {e.strerror}"))
            return
        self._written = grown
        self._pending.clear()

    def _fail(self, error: ArchiveUnavailable) -> None:
        """Give up on this dataset: drop what was received (the file at once)."""
        self.error = error
        self._parts.clear()
        self._pending.clear()
        self.close()

    def contents(self) -> bytes | mmap.mmap:
        """The whole dataset: bytes when it stayed in memory, else a read-only map of the spill
        file (valid until `close`). Raises the error that stopped the spill, if any."""
        if self.error is None and self._pending:
            self._flush()
        if self.error is not None:
            raise self.error
        if self._remove is None:
            if len(self._parts) != 1:
                self._parts[:] = [b"".join(self._parts)]
            return self._parts[0]
        if self._map is None:
            self._map = mmap.mmap(self._fd, self._written, access=mmap.ACCESS_READ)
        return self._map

    def close(self) -> None:
        """Forget the dataset and remove its spill file (idempotent)."""
        self._parts.clear()
        if self._remove is not None:
            self._remove()
        if self._map is not None:
            # Views of the map still alive (an exception's frames) keep it, and the file's
            # blocks, until they go; its name is gone already.
            with contextlib.suppress(BufferError):
                self._map.close()


def _remove(fd: int, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)
