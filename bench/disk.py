"""The disk's own ceiling, measured in the same run as the servers.

- `cp -r` of a dataset folder: what copying files costs without any protocol (page cache, no
  fsync; the data are read from the cache too); with `sync` after it, what the same copy
  costs once it is on disk (what the repair and migrate phases compare pacsgrid with).
- write+fsync per file: each file's bytes (already in memory) written to a new file, then
  fsync, then close: the floor of what a durable archive pays per object before its index.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench import scratch
from bench.procs import BenchError


def cp_r(sources: Sequence[Path], dst: Path, timeout: float, sync: bool = False) -> float:
    """Seconds `cp -r SOURCES... dst` takes into a fresh, empty `dst`, followed by `sync`
    when `sync` (then the copy is on disk, as durable as a store that fsyncs). Dirty pages of
    earlier work are flushed first, untimed; dst is discarded afterwards (bench.scratch)."""
    scratch.discard(dst)
    dst.mkdir(parents=True)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(
        ["cp", "-r", *map(str, sources), str(dst)], capture_output=True, timeout=timeout
    )
    if proc.returncode == 0 and sync:
        os.sync()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"cp -r failed: {proc.stderr.decode(errors='replace').strip()}")
    scratch.discard(dst)
    return seconds


def write_fsync(files: tuple[Path, ...], dst: Path) -> float:
    """Seconds to write every file to `dst` with an fsync each; dst is discarded afterwards."""
    blobs = [p.read_bytes() for p in files]
    scratch.discard(dst)
    dst.mkdir(parents=True)
    os.sync()
    start = time.perf_counter()
    for i, data in enumerate(blobs):
        fd = os.open(dst / f"{i:06d}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - start
    scratch.discard(dst)
    return seconds
