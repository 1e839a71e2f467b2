"""The operation log of a recorded run: every call that changed the filesystem, in order.

The recorder (fs.py) appends one record per operation, after applying it to the backing folder
and before answering the kernel, under one lock: the order of the records is the order the
program saw its calls complete. A record is a 4-byte length and a pickled tuple
`(kind, *args, path)`; inodes are numbered by the recorder (0 is the root), so a write to a
file that has been renamed or unlinked since it was opened still names its inode.

    mkdir    parent, name, ino          create   parent, name, ino
    symlink  parent, name, ino, target  link     ino, parent, name
    unlink   parent, name               rmdir    parent, name
    rename   src_parent, src_name, dst_parent, dst_name
    write    ino, offset, data          truncate ino, size
    fsync    ino (file: data and size)  fsyncdir ino (folder: its names)

A test marks a point of the history (e.g. "the C-STORE response arrived") by the log's size at
that moment (`position`); `History.index_at` turns that into a number of operations. A mark
taken after a call returned is never before that call's record.
"""

from __future__ import annotations

import os
import pickle
import struct
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<I")
NAME_OPS = frozenset({"mkdir", "create", "symlink", "link", "unlink", "rmdir", "rename"})
DATA_OPS = frozenset({"write", "truncate"})
FLUSH_OPS = frozenset({"fsync", "fsyncdir"})
ROOT = 0


class Writer:
    """Appends records to the log; one os.write per record (no user-space buffer), so the
    log's size always covers every operation that has been answered."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def append(self, *record: Any) -> None:
        body = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        os.write(self.fd, HEADER.pack(len(body)) + body)

    def close(self) -> None:
        os.close(self.fd)


def position(path: Path) -> int:
    """A mark: the log's size now (every operation answered so far is inside it)."""
    return os.stat(path).st_size


@dataclass(frozen=True)
class Op:
    index: int
    kind: str
    args: tuple[Any, ...]
    path: str  # the path the program used (for reports; the model works on inodes)


class History:
    def __init__(self, ops: list[Op], ends: list[int]) -> None:
        self.ops = ops
        self._ends = ends  # byte offset where each record ends

    @classmethod
    def load(cls, path: Path) -> History:
        data = path.read_bytes()
        ops: list[Op] = []
        ends: list[int] = []
        pos = 0
        while pos + HEADER.size <= len(data):
            (size,) = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + size
            if end > len(data):
                break  # the recorder was stopped while writing its last record
            record = pickle.loads(data[pos + HEADER.size : end])
            ops.append(Op(len(ops), record[0], tuple(record[1:-1]), record[-1]))
            ends.append(end)
            pos = end
        return cls(ops, ends)

    def __len__(self) -> int:
        return len(self.ops)

    def index_at(self, mark: int) -> int:
        """How many operations were complete when the log had `mark` bytes."""
        return bisect_right(self._ends, mark)
