"""The few system calls that make data durable, in one place.

Every flush pacsgrid relies on goes through here or through the site log (storage/wal.py), so
that the power-cut tests (tests/powercut/) see each one and a reader can check the ordering
rules of docs/durability.md against the code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """Make the names in a folder durable (new, renamed and removed entries)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdir_durable(directory: Path) -> None:
    """mkdir -p that makes the folder's name durable: it fsyncs the parent of every folder it
    creates, and the parent of `directory` in any case, since whoever created it (another
    process, an earlier step with a plain mkdir) may not have: a new folder's name is durable
    only once its parent is flushed, and a power cut before that takes everything in it."""
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        try:
            m.mkdir()
        except FileExistsError:
            pass
        fsync_dir(m.parent)
    if not missing:
        fsync_dir(directory.parent)


def fdatasync_path(path: Path | str) -> bool:
    """Flush a file's data (and the size needed to read it back); False if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return True


def flush_all(files: Sequence[str], folders: Sequence[str], threads: int = 16) -> None:
    """Flush many files, then their folders, with the flushes in flight together.

    The device merges flushes that are pending at the same moment, so N files flushed in
    parallel cost far less than N flushes one after the other. Files that are gone (moved to
    quarantine, replaced) are skipped: whatever replaced them was flushed by its own writer.
    """
    files = list(dict.fromkeys(files))
    folders = list(dict.fromkeys(folders))
    if len(files) + len(folders) <= 2:
        for f in files:
            fdatasync_path(f)
        for d in folders:
            _fsync_dir_if_exists(d)
        return
    with ThreadPoolExecutor(min(threads, len(files) + len(folders))) as pool:
        list(pool.map(fdatasync_path, files))
        list(pool.map(_fsync_dir_if_exists, folders))


def _fsync_dir_if_exists(path: str) -> None:
    try:
        fsync_dir(path)
    except FileNotFoundError:
        pass


def write_all(fd: int, chunks: Sequence[bytes]) -> None:
    """write(2) until every byte of `chunks` is written (writev may write less)."""
    views = [memoryview(c) for c in chunks if len(c)]
    while views:
        n = os.writev(fd, views)
        _advance(views, n)


def pwrite_all(fd: int, chunks: Sequence[bytes], offset: int) -> None:
    """pwritev(2) at `offset` until every byte is written."""
    views = [memoryview(c) for c in chunks if len(c)]
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        _advance(views, n)


def _advance(views: list[memoryview], n: int) -> None:
    while n and views:
        if n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0
