"""A build of pacsgrid that skips one flush, made without editing its source: put this folder
on PYTHONPATH of `pacsgrid serve` and set POWERCUT_SKIP_DIR_FSYNC to a site's folder; then
os.fsync of a series folder of that site (two levels below it, where objects are linked in)
does nothing. The power-cut rig must find the acknowledged instances this loses
(tests/test_powercut.py).
"""

from __future__ import annotations

import os
import stat

_SITE = os.environ.get("POWERCUT_SKIP_DIR_FSYNC", "")
_fsync = os.fsync


def _skipping_fsync(fd: int) -> None:  # type: ignore[override]
    if _SITE and stat.S_ISDIR(os.fstat(fd).st_mode):
        path = os.readlink(f"/proc/self/fd/{fd}")
        rel = os.path.relpath(path, _SITE)
        if not rel.startswith("..") and len(rel.split(os.sep)) == 2:
            return None
    return _fsync(fd)


if _SITE:
    os.fsync = _skipping_fsync
