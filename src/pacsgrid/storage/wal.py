"""A filesystem site's write-ahead log: one flush makes a whole group of objects durable.

Why: making a new file durable takes a flush of its data and inode, and making its name
durable a flush of its folder; an index commit takes a third. Appending to a file whose blocks
are already written takes one flush of data only, and one such flush covers every record
appended before it. So a small object is written twice: first as a record appended to the log
(the durable copy, flushed once for the whole group of objects waiting at that moment), then
as the ordinary file `<study>/<series>/<sop>.dcm` without any flush of its own; a large one is
written once, into a staged file the record names, then hard-linked into place. The log keeps
the record until a checkpoint has flushed the files it covers (and the index rows that point
at them); after a crash or power cut, the records still in the log are replayed: every file is
checked against its record and rewritten where it is missing or torn.

The segments (storage/walfile.py has their format) are fixed-size files whose blocks were all
written once when they were created, so that appending never allocates blocks (an fdatasync
then flushes data, not metadata); they are reused after a checkpoint. Appends are made in
order under a lock, so a flush covers a prefix of a segment.

The process that uses a segment holds an exclusive flock on it for as long as it lives;
recovery replays only segments nobody holds, so it never touches a live process's log.

Crash safety, flush by flush (see docs/durability.md):
1. A segment is created (zero-filled), fdatasynced, and its name made durable by an fsync of
   `.wal/` before any record goes into it; its header nonce is fdatasynced before first use.
2. A record is appended, then the group's fdatasync of the segment returns: only then is the
   object's file written (no flush) and the writer told. A file that exists after a power cut
   therefore always has a durable record until a checkpoint has flushed it.
3. A checkpoint (only of a segment whose writers have all finished, index commit included):
   fdatasync of every file written from it, fsync of their folders, a durable index commit,
   then the header is set free (fdatasync). Only then may the records be overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pacsgrid.storage.durable import fsync_dir, mkdir_durable, pwrite_all
from pacsgrid.storage.walfile import (
    CRC_AT,
    FLAG_REPLACE,
    FLAG_STAGED,
    HEADER_SIZE,
    NAME_WIDTH,
    REC,
    REC_MAGIC,
    STAGE_DIR,
    SUFFIX,
    drop_staged,
    lock_file,
    read_header,
    record_size,
    write_header,
)

log = logging.getLogger(__name__)

_ZERO_CHUNK = b"\0" * (1 << 20)


class LogError(OSError):
    """The log could not be written or flushed (the site is unusable for this write)."""


@dataclass(eq=False)
class Segment:
    path: Path
    fd: int
    size: int
    nonce: int = 0
    tail: int = HEADER_SIZE  # where the next record goes
    appended: int = HEADER_SIZE  # end of the last complete append
    durable: int = HEADER_SIZE  # end of what a flush has covered
    pending: int = 0  # appended records whose writer has not finished
    rotated: bool = False  # no longer receives records
    failed: bool = False  # a flush failed: nothing here may be trusted
    opened: float = field(default_factory=time.monotonic)
    written: list[str] = field(default_factory=list)  # files published from its records
    staged: list[str] = field(default_factory=list)  # its STAGE_DIR files, dropped once retired
    folders: set[str] = field(default_factory=set)  # folders those files (and new folders) are in


@dataclass(eq=False)
class Receipt:
    """Proof that a record is durable in the log. The writer releases it when it has finished
    with the object (for an ingest: after the index commit), so that no checkpoint drops the
    record before everything that depends on it is durable too."""

    log: SiteLog
    segment: Segment
    released: bool = False
    staged: str = ""  # the STAGE_DIR file the writer must fill (a staged record)
    stage_gen: int = 0  # set by SiteLog.staged(): the writer's file exists

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.log.release(self.segment)


class SiteLog:
    """The log of one filesystem site, shared by the threads of one process."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 << 20,
        keep_free: int = 4,
        group_wait: float = 0.0,
        can_create: Callable[[], bool] = lambda: True,
        on_rotate: Callable[[], None] = lambda: None,
    ) -> None:
        self.directory = directory
        self.segment_bytes = max(segment_bytes, 1 << 20)
        self.keep_free = keep_free
        self.group_wait = group_wait
        self._can_create = can_create  # False when the volume is not mounted
        self._on_rotate = on_rotate  # a checkpoint may be due
        self._lock = threading.Lock()  # appends, rotation
        self._cond = threading.Condition()  # flushes
        self._flushing = False
        self._waiting = 0  # writers between append and the end of their flush
        self._current: Segment | None = None
        self._spare: Segment | None = None
        self._segments: list[Segment] = []  # every segment this process holds in use
        self._seq = 0
        self._stage_gen = 0  # staged files reported complete so far
        self._stage_synced = 0  # of those, the ones a flush of STAGE_DIR covers
        self._stage_ready = False
        self.stage_dir = directory / STAGE_DIR
        self.flushes = 0
        self.records = 0

    @property
    def max_record(self) -> int:
        """Largest record (header, key and payload) a segment can take."""
        return self.segment_bytes - HEADER_SIZE

    # ------------------------------------------------------------------ writing
    def append(
        self,
        key: str,
        chunks: Sequence[bytes],
        sha256: str,
        *,
        replace: bool,
        note: str = "",
        staged: bool = False,
    ) -> Receipt:
        """Append one record (not yet durable: call `wait`).

        `staged`: the object is too large to copy into the record; `chunks` must be empty,
        and the record names a file of STAGE_DIR (`receipt.staged`) that the writer must
        create, fill and fdatasync, then report with `staged(receipt)`, before `wait`. A
        record whose file is missing or torn was never acknowledged: recovery skips it."""
        kb = key.encode()
        nb = note.encode()[:4096]
        size = sum(len(c) for c in chunks)
        with self._lock:
            seg = self._current
            rb = b"x" * NAME_WIDTH if staged else b""  # room for the name (fixed width)
            total = record_size(kb, nb, size, rb)
            if total > self.max_record:
                raise ValueError(f"record of {total} bytes does not fit a segment")
            if seg is None or seg.failed or seg.tail + total > seg.size:
                seg = self._rotate()
            self._seq += 1
            name = f"{seg.path.stem}-{seg.nonce:016x}-{self._seq:012d}.obj" if staged else ""
            rb = name.encode().ljust(len(rb), b" ") if staged else b""
            flags = (FLAG_REPLACE if replace else 0) | (FLAG_STAGED if staged else 0)
            head = REC.pack(
                REC_MAGIC,
                flags,
                len(kb),
                len(nb),
                len(rb),
                seg.nonce,
                self._seq,
                time.time_ns(),
                size,
                bytes.fromhex(sha256),
                0,
                0,
            )
            crc = zlib.crc32(head[:CRC_AT] + kb + nb + rb)
            head = head[:CRC_AT] + struct.pack("<II", crc, 0)
            pad = total - (REC.size + len(kb) + len(nb) + len(rb) + size)
            parts = [head, kb, nb, rb, *chunks] + ([b"\0" * pad] if pad else [])
            try:
                pwrite_all(seg.fd, parts, seg.tail)
            except OSError as e:
                seg.failed = True
                raise LogError(e.errno, f"append to {seg.path.name}: {e.strerror}") from e
            seg.tail += total
            seg.appended = seg.tail
            seg.pending += 1
            if staged:
                seg.staged.append(name)
            self.records += 1
        return Receipt(self, seg, staged=name)

    def stage_open(self, receipt: Receipt) -> int:
        """Create the staged record's file (write only)."""
        if not self._stage_ready:
            mkdir_durable(self.stage_dir)
            self._stage_ready = True
        path = self.stage_dir / receipt.staged
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def staged(self, receipt: Receipt) -> None:
        """The staged record's file is complete and flushed: its name is what the group's
        flush must still cover (an fsync of STAGE_DIR)."""
        with self._lock:
            self._stage_gen += 1
            receipt.stage_gen = self._stage_gen

    def wait(self, receipt: Receipt) -> None:
        """Return once the record is durable. Whoever finds no flush running flushes every
        segment with unflushed records, for every writer waiting (group commit)."""
        seg = receipt.segment
        end = seg.appended
        with self._cond:
            self._waiting += 1
            try:
                while seg.durable < end or self._stage_synced < receipt.stage_gen:
                    if seg.failed:
                        raise LogError(errno.EIO, f"flush of {seg.path.name} failed")
                    if self._flushing:
                        self._cond.wait()
                        continue
                    self._lead_flush()
            finally:
                self._waiting -= 1

    def _lead_flush(self) -> None:
        """Flush as the group's leader (called with `_cond` held; releases it meanwhile)."""
        self._flushing = True
        self._cond.release()
        try:
            if self.group_wait > 0:
                time.sleep(self.group_wait)  # let the other writers of this moment append
            with self._lock:
                gen = self._stage_gen
            todo = [(s, s.appended) for s in list(self._segments) if s.appended > s.durable]
            failed: list[Segment] = []
            staged_ok = True
            if gen > self._stage_synced:
                try:
                    fsync_dir(self.stage_dir)  # the names of the group's staged files
                except OSError as e:
                    log.error("flush of %s failed: %s", self.stage_dir, e)
                    failed, staged_ok = [s for s, _ in todo], False
            for s, _ in todo:
                if s in failed:
                    continue
                try:
                    os.fdatasync(s.fd)
                    if os.fstat(s.fd).st_nlink == 0:
                        raise OSError(errno.ENOENT, "segment was deleted (site wiped?)")
                except OSError as e:
                    log.error("flush of log segment %s failed: %s", s.path, e)
                    failed.append(s)
            self.flushes += 1
        finally:
            self._cond.acquire()
            self._flushing = False
        for s, upto in todo:
            if s in failed:
                s.failed = True
            else:
                s.durable = max(s.durable, upto)
        if staged_ok:
            self._stage_synced = max(self._stage_synced, gen)
        else:
            for s in self._segments:
                if s.staged:
                    s.failed = True  # its staged names may not be durable: never trust it
        self._cond.notify_all()

    def release(self, seg: Segment, written: str = "", folders: Sequence[str] = ()) -> None:
        with self._lock:
            seg.pending -= 1
            if written:
                seg.written.append(written)
            seg.folders.update(folders)

    def note_written(self, receipt: Receipt, path: str, folders: Sequence[str]) -> None:
        """The file of a record now exists (not flushed): the checkpoint must flush it."""
        with self._lock:
            receipt.segment.written.append(path)
            receipt.segment.folders.update(folders)

    # ------------------------------------------------------------------ segments
    def _rotate(self) -> Segment:
        """A new current segment (with `_lock` held)."""
        if self._current is not None:
            self._current.rotated = True
            self._on_rotate()
        seg = self._spare or self._obtain()
        self._spare = None
        self._current = seg
        with self._cond:
            self._segments.append(seg)
        return seg

    def warm(self) -> None:
        """Have a current and a spare segment ready (a serving process calls this at start,
        so that its first store does not wait for a segment to be created)."""
        with self._lock:
            if self._current is None:
                self._rotate()
        self.prepare_spare()

    def prepare_spare(self) -> None:
        """Ready the next segment ahead of time (background), so rotation never waits for a
        new segment to be zero-filled."""
        with self._lock:
            if self._spare is not None or self._current is None:
                return
        seg = self._obtain()
        with self._lock:
            if self._spare is None:
                self._spare = seg
                return
        self._free(seg, keep=True)

    def rotate_if_older(self, seconds: float) -> None:
        with self._lock:
            seg = self._current
            if (
                seg is not None
                and seg.tail > HEADER_SIZE
                and (time.monotonic() - seg.opened >= seconds)
            ):
                seg.rotated = True
                self._current = None

    def rotate_now(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.rotated = True
                self._current = None

    def _obtain(self) -> Segment:
        """Adopt a free segment left by any process, or create one; give it a fresh nonce."""
        seg = self._adopt_free() or self._create()
        seg.nonce = int.from_bytes(os.urandom(8), "little") or 1
        write_header(seg.fd, seg.nonce, seg.size)
        os.fdatasync(seg.fd)
        seg.opened = time.monotonic()
        return seg

    def _adopt_free(self) -> Segment | None:
        try:
            names = sorted(p for p in os.listdir(self.directory) if p.endswith(SUFFIX))
        except FileNotFoundError:
            return None
        for name in names:
            path = self.directory / name
            seg = _lock_segment(path)
            if seg is None:
                continue
            nonce, size = read_header(seg.fd)
            if nonce == 0 and size == seg.size == os.fstat(seg.fd).st_size:
                return seg
            os.close(seg.fd)  # in use by a dead process: recovery's, not ours
        return None

    def _create(self) -> Segment:
        if not self._can_create():
            raise LogError(errno.ENOENT, "site volume not mounted")
        mkdir_durable(self.directory)
        tmp = self.directory / f"{uuid.uuid4().hex}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            write_header(fd, 0, self.segment_bytes)
            off = HEADER_SIZE
            while off < self.segment_bytes:
                n = min(len(_ZERO_CHUNK), self.segment_bytes - off)
                off += os.pwrite(fd, _ZERO_CHUNK[:n], off)
            os.fdatasync(fd)
            path = tmp.with_suffix(SUFFIX)
            os.rename(tmp, path)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return Segment(path, fd, self.segment_bytes)

    # ------------------------------------------------------------------ checkpoints
    def ready(self) -> list[Segment]:
        """Rotated segments whose writers have all finished: ready for a checkpoint."""
        with self._lock:
            return [
                s
                for s in self._segments
                if s.rotated and s.pending == 0 and (s.durable >= s.appended or s.failed)
            ]

    def has_records(self) -> bool:
        with self._lock:
            return any(s.tail > HEADER_SIZE for s in self._segments)

    def retire(self, seg: Segment) -> None:
        """After a checkpoint: everything the segment's records stood for is durable. The
        segment becomes the spare (a new nonce voids its records) or is freed for others."""
        with self._lock, self._cond:
            self._segments.remove(seg)
            as_spare = self._spare is None and not seg.failed
        drop_staged(self.stage_dir, seg.staged)
        if as_spare:
            try:
                fresh = self._reuse(seg)
            except OSError as e:
                log.warning("cannot reuse log segment %s: %s", seg.path, e)
                self._close(seg)
                return
            with self._lock:
                if self._spare is None:
                    self._spare = fresh
                    return
            seg = fresh
        self._free(seg, keep=False)

    def _reuse(self, seg: Segment) -> Segment:
        fresh = Segment(seg.path, seg.fd, seg.size)  # a fresh record of what it covers
        fresh.nonce = int.from_bytes(os.urandom(8), "little") or 1
        write_header(fresh.fd, fresh.nonce, fresh.size)
        os.fdatasync(fresh.fd)
        return fresh

    def _free(self, seg: Segment, *, keep: bool) -> None:
        """Mark a segment free (its records are void from now on) and let it go."""
        try:
            write_header(seg.fd, 0, seg.size)
            os.fdatasync(seg.fd)
        except OSError as e:
            log.warning("cannot free log segment %s: %s", seg.path, e)
        if not keep:
            self._close(seg)

    def _close(self, seg: Segment) -> None:
        with contextlib.suppress(OSError):
            os.close(seg.fd)
        seg.fd = -1

    def close(self) -> None:
        """A clean stop (after a final checkpoint): free segments stay for the next process,
        up to `keep_free`; the others are removed."""
        with self._lock:
            segs = [s for s in (self._spare, self._current) if s is not None]
            segs += [s for s in self._segments if s not in segs]
            self._spare = self._current = None
            self._segments = []
        for seg in segs:
            if seg.tail > HEADER_SIZE and not seg.failed:
                log.error("log segment %s closed with records not checkpointed", seg.path)
                self._close(seg)  # stays in use: recovery replays it
                continue
            self._free(seg, keep=False)
        self._trim_free()

    def _trim_free(self) -> None:
        try:
            names = sorted(p for p in os.listdir(self.directory) if p.endswith(SUFFIX))
        except (FileNotFoundError, NotADirectoryError):  # the folder went away: nothing to trim
            return
        free = 0
        for name in names:
            seg = _lock_segment(self.directory / name)
            if seg is None:
                continue
            try:
                nonce, _ = read_header(seg.fd)
                if nonce == 0:
                    free += 1
                    if free > self.keep_free:
                        os.unlink(seg.path)
            finally:
                os.close(seg.fd)


def _lock_segment(path: Path) -> Segment | None:
    fd = lock_file(path)
    return None if fd is None else Segment(path, fd, os.fstat(fd).st_size)
