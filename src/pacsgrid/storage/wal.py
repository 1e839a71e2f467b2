"""A filesystem site's write-ahead log: one flush makes a whole group of objects durable.

Why: making a new file durable takes a flush of its data and inode, and making its name
durable a flush of its folder; an index commit takes a third. Appending to a file whose blocks
are already written takes one flush of data only, and one such flush covers every record
appended before it. So an object is written twice: first as a record appended to the log
(the durable copy, flushed once for the whole group of objects waiting at that moment), then
as the ordinary file `<study>/<series>/<sop>.dcm` without any flush of its own. The log keeps
the record until a checkpoint has flushed the files it covers (and the index rows that point
at them); after a crash or power cut, the records still in the log are replayed: every file is
checked against its record and rewritten where it is missing or torn.

Layout, under `<site>/.wal/`:
    <uuid>.seg   a segment: fixed size, every block written once when it was created, so that
                 appending never allocates blocks (an fdatasync then flushes data, not
                 metadata); reused after a checkpoint.

A segment starts with a 4 KiB header: magic, state (a random nonce while in use; 0 when free)
and its size. Records follow, each: a fixed header (magic, flags, key length, the segment's
nonce, a sequence number, time, payload size, the payload's SHA-256, a CRC of the header and
key), the key, the payload, padding to 8 bytes. A reader stops at the first record whose
magic, nonce, CRC or hash does not check out: that and anything after it was never flushed
(appends are made in order under a lock, so a flush covers a prefix). Records left from an
earlier use of the segment carry another nonce and end the scan too.

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
import hashlib
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pacsgrid.storage.durable import fsync_dir, mkdir_durable, pwrite_all

log = logging.getLogger(__name__)

WAL_DIR = ".wal"
SUFFIX = ".seg"
HEADER_SIZE = 4096
_SEG_MAGIC = b"PGWAL\x00\x01\x00"
_SEG_HEADER = struct.Struct("<8sQQ")  # magic, nonce (0 = free), size
_REC_MAGIC = 0x50475243  # "PGRC"
# magic, flags, key length, note length, staged-file name length, nonce, seq, time_ns, payload
# size, SHA-256 of the object, CRC of the header before it plus key, note and name, (pad)
_REC = struct.Struct("<IHHHHQQQQ32sII")
_CRC_AT = _REC.size - 8
FLAG_REPLACE = 1
FLAG_STAGED = 2  # the object is in a file of STAGE_DIR, not in the record
STAGE_DIR = "data"
_NAME_WIDTH = 80
_ZERO_CHUNK = b"\0" * (1 << 20)


class LogError(OSError):
    """The log could not be written or flushed (the site is unusable for this write)."""


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


def record_size(key: bytes, note: bytes, payload: int, ref: bytes = b"") -> int:
    return _pad(_REC.size + len(key) + len(note) + len(ref) + payload)


def _pad(n: int) -> int:
    return (n + 7) & ~7


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
            rb = b"x" * _NAME_WIDTH if staged else b""  # room for the name (fixed width)
            total = record_size(kb, nb, size, rb)
            if total > self.max_record:
                raise ValueError(f"record of {total} bytes does not fit a segment")
            if seg is None or seg.failed or seg.tail + total > seg.size:
                seg = self._rotate()
            self._seq += 1
            name = f"{seg.path.stem}-{seg.nonce:016x}-{self._seq:012d}.obj" if staged else ""
            rb = name.encode().ljust(len(rb), b" ") if staged else b""
            flags = (FLAG_REPLACE if replace else 0) | (FLAG_STAGED if staged else 0)
            head = _REC.pack(
                _REC_MAGIC,
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
            crc = zlib.crc32(head[:_CRC_AT] + kb + nb + rb)
            head = head[:_CRC_AT] + struct.pack("<II", crc, 0)
            pad = total - (_REC.size + len(kb) + len(nb) + len(rb) + size)
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
        _write_header(seg.fd, seg.nonce, seg.size)
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
            nonce, size = _read_header(seg.fd)
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
            _write_header(fd, 0, self.segment_bytes)
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
        _write_header(fresh.fd, fresh.nonce, fresh.size)
        os.fdatasync(fresh.fd)
        return fresh

    def _free(self, seg: Segment, *, keep: bool) -> None:
        """Mark a segment free (its records are void from now on) and let it go."""
        try:
            _write_header(seg.fd, 0, seg.size)
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
        except FileNotFoundError:
            return
        free = 0
        for name in names:
            seg = _lock_segment(self.directory / name)
            if seg is None:
                continue
            try:
                nonce, _ = _read_header(seg.fd)
                if nonce == 0:
                    free += 1
                    if free > self.keep_free:
                        os.unlink(seg.path)
            finally:
                os.close(seg.fd)


# ---------------------------------------------------------------------- recovery
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
        _write_header(self.fd, 0, self.size)
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
            if _lock_segment(path) is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        if not name.endswith(SUFFIX):
            continue
        seg = _lock_segment(path)
        if seg is None:
            continue
        try:
            nonce, size = _read_header(seg.fd)
        except OSError:
            nonce, size = 0, 0
        if nonce == 0 or size != seg.size:
            os.close(seg.fd)
            continue
        out.append(DeadSegment(path, seg.fd, size, nonce))
    return out


def _scan(fd: int, nonce: int, size: int) -> Iterator[Record]:
    off = HEADER_SIZE
    while off + _REC.size <= size:
        head = os.pread(fd, _REC.size, off)
        if len(head) < _REC.size:
            return
        magic, flags, klen, nlen, rlen, rnonce, _seq, t_ns, psize, sha, crc, _ = _REC.unpack(head)
        if magic != _REC_MAGIC or rnonce != nonce:
            return
        total = _pad(_REC.size + klen + nlen + rlen + psize)
        if off + total > size:
            return
        var = os.pread(fd, klen + nlen + rlen, off + _REC.size)
        if zlib.crc32(head[:_CRC_AT] + var) != crc:
            return
        staged = var[klen + nlen :].decode(errors="replace").rstrip()
        payload = os.pread(fd, psize, off + _REC.size + klen + nlen + rlen)
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
        return _read_header(fd)[0]
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- helpers
def _lock_segment(path: Path) -> Segment | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return Segment(path, fd, os.fstat(fd).st_size)


def _write_header(fd: int, nonce: int, size: int) -> None:
    block = _SEG_HEADER.pack(_SEG_MAGIC, nonce, size).ljust(HEADER_SIZE, b"\0")
    os.pwrite(fd, block, 0)


def _read_header(fd: int) -> tuple[int, int]:
    raw = os.pread(fd, _SEG_HEADER.size, 0)
    if len(raw) < _SEG_HEADER.size:
        return 0, 0
    magic, nonce, size = _SEG_HEADER.unpack(raw)
    if magic != _SEG_MAGIC:
        return 0, 0
    return int(nonce), int(size)
