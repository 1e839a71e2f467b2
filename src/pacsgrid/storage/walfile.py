"""The on-disk format of a site's write-ahead log (see storage/wal.py for how it is used).

Under `<site>/.wal/`:
    <uuid>.seg   a segment: fixed size, every block written once when it was created
    <uuid>.new   a segment being created (never holds a record)
    data/        staged objects: files too large to copy into a record, one per record

A segment starts with a 4 KiB header: magic, nonce (random while in use; 0 when free) and its
size. Records follow, each: a fixed header (magic, flags, key length, note length, staged-name
length, the segment's nonce, a sequence number, time, payload size, the object's SHA-256, a
CRC of the header and the variable parts), the key, the note, the staged file's name (padded),
the payload (the object, or nothing when it is staged), padding to 8 bytes. A reader stops at
the first record whose magic, nonce, CRC or hash does not check out: that and anything after
it was never flushed. Records left from an earlier use of the segment carry another nonce and
end the scan too. A staged file's name carries its segment and that segment's nonce, so a file
whose segment has moved on can be recognised as an orphan.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

WAL_DIR = ".wal"
SUFFIX = ".seg"
HEADER_SIZE = 4096
_SEG_MAGIC = b"PGWAL\x00\x01\x00"
_SEG_HEADER = struct.Struct("<8sQQ")  # magic, nonce (0 = free), size
REC_MAGIC = 0x50475243  # "PGRC"
# magic, flags, key length, note length, staged-file name length, nonce, seq, time_ns, payload
# size, SHA-256 of the object, CRC of the header before it plus key, note and name, (pad)
REC = struct.Struct("<IHHHHQQQQ32sII")
CRC_AT = REC.size - 8
FLAG_REPLACE = 1
FLAG_STAGED = 2  # the object is in a file of STAGE_DIR, not in the record
STAGE_DIR = "data"
NAME_WIDTH = 80


@dataclass(frozen=True, slots=True)
class Record:
    """One object as the log holds it."""

    key: str
    sha256: str
    size: int
    replace: bool
    time_ns: int
    payload: bytes  # the object (empty when it is staged)
    note: str = ""  # what the writer wants recovery to know (opaque to the log)
    staged: str = ""  # the file in STAGE_DIR that holds the object, if not the record


def record_size(key: bytes, note: bytes, payload: int, ref: bytes = b"") -> int:
    return _pad(REC.size + len(key) + len(note) + len(ref) + payload)


def _pad(n: int) -> int:
    return (n + 7) & ~7


@dataclass(eq=False)
class DeadSegment:
    """A segment in use by a process that is gone, held (locked) by the recovering one."""

    path: Path
    fd: int
    size: int
    nonce: int

    def records(self) -> Iterator[Record]:
        return _scan(self.fd, self.nonce, self.size)

    def object_of(self, record: Record) -> bytes | None:
        """The object a record stands for: its payload, or its staged file when that is
        complete (None: the writer died before it was, so it was never acknowledged)."""
        if not record.staged:
            return record.payload
        try:
            with open(self.path.parent / STAGE_DIR / record.staged, "rb") as fh:
                data = fh.read()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == record.sha256 else None

    def free(self) -> None:
        """Its records are replayed and durable elsewhere: void them, keep the file, remove
        its staged files."""
        staged = [r.staged for r in self.records() if r.staged]
        write_header(self.fd, 0, self.size)
        os.fdatasync(self.fd)
        self.close()
        drop_staged(self.path.parent / STAGE_DIR, staged)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def dead_segments(directory: Path) -> list[DeadSegment]:
    """Segments with records that no live process holds (left by a crash)."""
    out: list[DeadSegment] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return out
    for name in names:
        path = directory / name
        if name.endswith(".new"):
            # A segment being created when its process died: never held a record.
            fd = lock_file(path)
            if fd is not None:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        if not name.endswith(SUFFIX):
            continue
        fd = lock_file(path)
        if fd is None:
            continue
        try:
            nonce, size = read_header(fd)
        except OSError:
            nonce, size = 0, 0
        if nonce == 0 or size != os.fstat(fd).st_size:
            os.close(fd)
            continue
        out.append(DeadSegment(path, fd, size, nonce))
    return out


def _scan(fd: int, nonce: int, size: int) -> Iterator[Record]:
    off = HEADER_SIZE
    while off + REC.size <= size:
        head = os.pread(fd, REC.size, off)
        if len(head) < REC.size:
            return
        magic, flags, klen, nlen, rlen, rnonce, _seq, t_ns, psize, sha, crc, _ = REC.unpack(head)
        if magic != REC_MAGIC or rnonce != nonce:
            return
        total = _pad(REC.size + klen + nlen + rlen + psize)
        if off + total > size:
            return
        var = os.pread(fd, klen + nlen + rlen, off + REC.size)
        if zlib.crc32(head[:CRC_AT] + var) != crc:
            return
        staged = var[klen + nlen :].decode(errors="replace").rstrip()
        payload = os.pread(fd, psize, off + REC.size + klen + nlen + rlen)
        if len(payload) != psize or (
            not flags & FLAG_STAGED and hashlib.sha256(payload).digest() != sha
        ):
            return
        yield Record(
            var[:klen].decode(),
            sha.hex(),
            psize,
            bool(flags & FLAG_REPLACE),
            t_ns,
            payload,
            var[klen : klen + nlen].decode(errors="replace"),
            staged if flags & FLAG_STAGED else "",
        )
        off += total


def drop_staged(stage_dir: Path, names: Sequence[str]) -> None:
    """Remove staged files whose objects are durable at their keys (their records are void)."""
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(stage_dir / name)


def sweep_staged(directory: Path, older_than: float = 600.0) -> int:
    """Remove staged files no record can name any more: each name carries its segment and
    that segment's nonce, and a file whose segment is no longer in use with that nonce
    (freed, reused, gone) is an orphan, left by a writer that died between appending its
    record and the checkpoint that would have removed it. Old ones only: a header being
    rewritten at this moment is never trusted."""
    stage_dir = directory / STAGE_DIR
    cutoff = time.time() - older_than
    removed = 0
    try:
        entries = list(os.scandir(stage_dir))
    except FileNotFoundError:
        return 0
    nonces: dict[str, int] = {}
    for entry in entries:
        stem, _, rest = entry.name.partition("-")
        nonce_hex = rest.partition("-")[0]
        try:
            nonce = int(nonce_hex, 16)
            if entry.stat().st_mtime >= cutoff:
                continue
            if stem not in nonces:
                nonces[stem] = _current_nonce(directory / f"{stem}{SUFFIX}")
            if nonces[stem] != nonce:
                os.unlink(entry.path)
                removed += 1
        except (ValueError, OSError):
            continue
    return removed


def _current_nonce(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        return read_header(fd)[0]
    finally:
        os.close(fd)


def lock_file(path: Path) -> int | None:
    """Open a segment for writing and take its exclusive lock; None if another process
    holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def write_header(fd: int, nonce: int, size: int) -> None:
    block = _SEG_HEADER.pack(_SEG_MAGIC, nonce, size).ljust(HEADER_SIZE, b"\0")
    os.pwrite(fd, block, 0)


def read_header(fd: int) -> tuple[int, int]:
    raw = os.pread(fd, _SEG_HEADER.size, 0)
    if len(raw) < _SEG_HEADER.size:
        return 0, 0
    magic, nonce, size = _SEG_HEADER.unpack(raw)
    if magic != _SEG_MAGIC:
        return 0, 0
    return int(nonce), int(size)
