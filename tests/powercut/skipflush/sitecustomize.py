"""Builds of pacsgrid that skip one flush, made without editing its source: put this folder on
PYTHONPATH of `pacsgrid serve` and set one of

- POWERCUT_SKIP_LOG_FLUSH to a site's folder: os.fdatasync of that site's write-ahead log
  segments (.wal/*.seg) does nothing, the flush every acknowledgement waits for;
- POWERCUT_SKIP_DIR_FSYNC to a site's folder: os.fsync of a series folder of that site (two
  levels below it, where objects are linked in) does nothing.

The power-cut rig must find the acknowledged instances this loses (tests/test_powercut.py).
"""

from __future__ import annotations

import os
import stat

_LOG_SITE = os.environ.get("POWERCUT_SKIP_LOG_FLUSH", "")
_DIR_SITE = os.environ.get("POWERCUT_SKIP_DIR_FSYNC", "")
_fsync = os.fsync
_fdatasync = os.fdatasync


def _path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _skipping_fsync(fd: int) -> None:
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        rel = os.path.relpath(_path(fd), _DIR_SITE)
        if not rel.startswith("..") and len(rel.split(os.sep)) == 2:
            return None
    return _fsync(fd)


def _skipping_fdatasync(fd: int) -> None:
    path = _path(fd)
    if path.endswith(".seg") and os.path.dirname(path) == os.path.join(_LOG_SITE, ".wal"):
        return None
    return _fdatasync(fd)


if _DIR_SITE:
    os.fsync = _skipping_fsync
if _LOG_SITE:
    os.fdatasync = _skipping_fdatasync
