"""Throwing away a measurement's files without slowing down the next measurement.

ext4 without a journal (the root filesystem of this CI machine: no jbd2 task) will not reuse an
inode freed in the last minute (five while its inode table block is dirty), and it walks past
every such inode, from the start of the block group, each time it creates a file. Deleting
one measurement's 2,000 files and then timing the next server's 2,000 creates in the same
groups made every server pay that walk: `perf` put a quarter of pacsgrid's CPU in
`recently_deleted`/`find_inode_bit`, and four back-to-back ingests with a wipe before each
slowed down round by round (pacsgrid 429 -> 379, Orthanc 554 -> 402 instances/s on 4
associations) where the same ingests into never-wiped folders held steady (~500 and ~540).
An archive never deletes at that rate, so that cost is not what the benchmark is about.

So during a run, `discard` renames a folder into a trash folder (a rename frees no inode) and
`empty` deletes the trash when the run is over. When the disk is short of space, `discard`
deletes at once and counts it, and the results say so.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

MIN_FREE = 8 * 1024**3  # below this, delete at once rather than fill the disk


class Trash:
    def __init__(self, root: Path, min_free: int = MIN_FREE) -> None:
        self.root = root
        self.min_free = min_free
        self.deleted_at_once = 0
        self._seq = itertools.count()

    def discard(self, path: Path) -> None:
        """Make `path` (a file or folder) go away: into the trash, or deleted if space is short."""
        if not path.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(self.root).free < self.min_free:
            self.deleted_at_once += 1
            _delete(path)
            return
        while True:
            target = self.root / f"{next(self._seq):06d}-{path.name}"
            if not target.exists():
                break
        try:
            path.rename(target)
        except OSError:  # another filesystem: no way around deleting
            self.deleted_at_once += 1
            _delete(path)

    def empty(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_current: Trash | None = None  # None: outside a run (other bench scripts, tests): delete


def use(trash: Trash | None) -> None:
    """Route `discard` to `trash` (None: delete at once again)."""
    global _current
    _current = trash


def discard(path: Path) -> None:
    if _current is not None:
        _current.discard(path)
    elif path.exists():
        _delete(path)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
