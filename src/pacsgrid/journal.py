"""The ingest journal: closes the gap between "object durable" and "index row committed".

Before an ingest writes its object it appends a BEGIN line (key and sites) to its process's
journal file in `<data_dir>/journal/`; after the index commit it appends an END line. If the
process dies in between, the object may be complete on a site but missing from the index (an
orphan). `pacsgrid serve` replays the journals of dead processes at start-up, and its
supervisor again whenever a worker dies: every object with a BEGIN and no END that exists on a
site and is not indexed is read, checked and indexed. Such an object was never acknowledged;
indexing it is what a retry by the sender would have done.

Each process appends to its own file, which it holds locked (flock) while it lives, so replay
never touches the journal of a running `pacsgrid import` or worker. Appends are not fsynced: a
process crash keeps them (the page cache survives); after a power loss,
`pacsgrid reindex --reconcile` finds what a lost line would have pointed to. A file is replaced
by a new one once it is large and has nothing in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROTATE_BYTES = 16 * 1024 * 1024
NEW = ".new"  # a journal file being created (see _File)


@dataclass(frozen=True)
class Marker:
    """An ingest that began and never ended, found in a dead process's journal."""

    journal: Path
    key: str
    sites: tuple[str, ...]


class _File:
    def __init__(self, directory: Path) -> None:
        # Locked under a name replay does not look at, then renamed: replay runs while other
        # processes ingest (the supervisor replays a dead worker's journal at once), and must
        # never take a file that its new owner has created but not yet locked.
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.path = directory / f"{name}.log"
        fresh = directory / f"{name}{NEW}"
        self.fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(fresh, self.path)
        self.size = 0
        self.pending = 0

    def append(self, line: str) -> None:
        data = line.encode()
        os.write(self.fd, data)
        self.size += len(data)

    def close(self, remove: bool) -> None:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)


class IngestJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._current: _File | None = None
        self._seq = 0

    def begin(self, key: str, sites: list[str]) -> tuple[_File, int]:
        with self._lock:
            if self._current is None or (
                self._current.size > ROTATE_BYTES and self._current.pending == 0
            ):
                if self._current is not None:
                    self._current.close(remove=True)
                self._current = _File(self.directory)
            self._seq += 1
            self._current.append(f"B {self._seq} {json.dumps([key, sites])}\n")
            self._current.pending += 1
            return self._current, self._seq

    def end(self, token: tuple[_File, int]) -> None:
        f, seq = token
        with self._lock:
            if f.fd < 0:
                return
            f.append(f"E {seq}\n")
            f.pending -= 1
            if f is not self._current and f.pending == 0:
                f.close(remove=True)
                f.fd = -1

    def close(self) -> None:
        """A clean stop: nothing in flight, so the journal file is no longer needed."""
        with self._lock:
            if self._current is not None:
                self._current.close(remove=self._current.pending == 0)
                self._current = None

    # ------------------------------------------------------------------ replay
    def replay(self) -> list[tuple[Path, list[Marker]]]:
        """Journal files of processes that are no longer running, each with its unfinished
        ingests. A file some live process holds locked is left alone."""
        out = []
        _sweep_new(self.directory)
        for path in sorted(self.directory.glob("*.log")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                out.append((path, _unfinished(path)))
            finally:
                os.close(fd)
        return out

    @staticmethod
    def done(journal: Path) -> None:
        """Forget a replayed journal file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)


def _sweep_new(directory: Path) -> None:
    """Remove journal files left between create and rename by a process that died there
    (they hold no lines); only old ones, so that a file being created now is never touched."""
    cutoff = time.time() - 3600
    for path in directory.glob(f"*{NEW}"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                os.unlink(path)


def _unfinished(path: Path) -> list[Marker]:
    begun: dict[str, tuple[str, tuple[str, ...]]] = {}
    with open(path, errors="replace") as fh:
        for line in fh:
            kind, _, rest = line.rstrip("\n").partition(" ")
            seq, _, doc = rest.partition(" ")
            if kind == "B":
                try:
                    key, sites = json.loads(doc)
                except ValueError:
                    continue  # a line cut short by the crash: its object was not written yet
                begun[seq] = (str(key), tuple(sites))
            elif kind == "E":
                begun.pop(seq, None)
    return [Marker(path, key, sites) for key, sites in begun.values()]
