"""A storage site that is a folder: local disk, or an NFS/SMB mount.

Layout under the root:
    .pacsgrid-site            sentinel: proves the volume is the one we initialised (an
                              unmounted NAS shows an empty mount point, not our data)
    .incoming/                temp files being written; never listed, swept at start-up
    .quarantine/<time>/<key>  copies that failed a fixity check, kept as evidence
    <study>/<series>/<sop>.dcm

    .wal/                     the site's write-ahead log (storage/wal.py)

A write (`put`) goes through the site's log and waits for the one flush that covers every
object of that moment (group commit). A small object (up to `inline_max` bytes) is copied
into its log record, and its file is written after the flush, without a flush of its own: an
unnamed file (O_TMPFILE) linked into place, or a temp file in .incoming where the filesystem
has no O_TMPFILE. A larger one is written once, into a file of `.wal/data/` that the writer
flushes itself while the group's flush makes the record and that file's name durable; then it
is linked into place. A checkpoint (`checkpoint`) flushes the files and folders later and lets
the log reuse the space. After a crash, `dead_log` hands the records a dead process left to
recovery, which rewrites any file that is missing or torn (archive/recovery.py). With the log
off, every object is written, fdatasynced, linked into place and its folder fsynced on its
own. link() fails when the target exists, which gives the no-clobber rule of `put` across
threads and processes without any lock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from threading import Lock

from pacsgrid.errors import ObjectMissing, SiteUnavailable, StorageError
from pacsgrid.storage.base import SENTINEL, ObjectInfo, PutResult, SiteHealth
from pacsgrid.storage.durable import flush_all, fsync_dir, mkdir_durable, write_all
from pacsgrid.storage.wal import LogError, Receipt, SiteLog
from pacsgrid.storage.walfile import WAL_DIR, DeadSegment, dead_segments, sweep_staged

INCOMING = ".incoming"
QUARANTINE = ".quarantine"


class FilesystemSite:
    def __init__(
        self,
        name: str,
        root: Path,
        *,
        location: str = "default",
        role: str = "archive",
        log: bool = True,
        inline_max: int = 128 << 10,
        log_segment_bytes: int = 64 << 20,
        group_wait: float = 0.0,
    ) -> None:
        self.name = name
        self.root = root
        self.location = location
        self.role = role
        self.url = root.as_uri()
        self._incoming = root / INCOMING
        self._dirs: set[Path] = set()  # folders known to exist
        self._new_dirs: set[Path] = set()  # folders we made whose entry is not yet flushed
        self._dir_lock = Lock()
        self._tmpfile = hasattr(os, "O_TMPFILE")
        self._log_on = log  # off: every object is flushed on its own (two flushes each)
        self._inline_max = min(inline_max, log_segment_bytes // 4)
        self._log_segment_bytes = log_segment_bytes
        self._group_wait = group_wait
        self._log: SiteLog | None = None
        self._log_lock = Lock()
        self._on_rotate: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ lifecycle
    def initialize(self) -> None:
        try:
            mkdir_durable(self.root)
            self._incoming.mkdir(exist_ok=True)
            mkdir_durable(self.root / WAL_DIR)
            sentinel = self.root / SENTINEL
            if not sentinel.exists():
                if any(p.name not in (INCOMING, QUARANTINE, WAL_DIR) for p in self.root.iterdir()):
                    raise SiteUnavailable(
                        self.name,
                        f"{self.root} is not empty and has no {SENTINEL}",
                        hint="point the site at an empty folder "
                        "or at a folder pacsgrid initialised",
                    )
                body = json.dumps(
                    {"site": self.name, "created": time.time(), "host": socket.gethostname()}
                ).encode()
                self._write_atomic(sentinel, [body], replace=True)
            self._sweep_incoming()
        except OSError as e:
            raise SiteUnavailable(
                self.name,
                f"cannot initialise {self.root}: {e.strerror}",
                hint="check the path exists, is mounted and writable",
            ) from e

    def check(self) -> SiteHealth:
        try:
            if not (self.root / SENTINEL).is_file():
                return SiteHealth(
                    False,
                    f"{SENTINEL} missing in {self.root} (volume not mounted, "
                    f"or wiped? 'pacsgrid sites init {self.name}' adopts an empty "
                    f"volume)",
                )
            st = os.statvfs(self.root)
            # Prove the site takes a write and leave nothing behind, whatever stops us (a
            # SIGTERM'd process ends its probe thread anywhere): an unnamed file never has a
            # name. Only where the filesystem has no O_TMPFILE (NFS, SMB) is the probe named,
            # and unlinked before anything else is done with it.
            fd = _open_tmpfile(self._incoming)
            if fd is None:
                probe = self._incoming / f"probe-{os.getpid()}"
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.unlink(probe)
            os.close(fd)
            return SiteHealth(True, "", st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
        except OSError as e:
            return SiteHealth(False, f"{self.root}: {e.strerror}")

    def _sweep_incoming(self) -> None:
        """Remove temp files older than an hour: writes that a crash interrupted."""
        cutoff = time.time() - 3600
        for entry in os.scandir(self._incoming):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass

    # ------------------------------------------------------------------ objects
    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/") or key.startswith("."):
            raise StorageError(self.name, f"refusing unsafe key {key!r}")
        return self.root / key

    def put(
        self,
        key: str,
        chunks: Sequence[bytes],
        *,
        replace: bool = False,
        hold: bool = False,
        sha256: str = "",
        note: str = "",
    ) -> PutResult:
        path = self._path(key)
        size = sum(len(c) for c in chunks)
        try:
            log = self._site_log() if self.logs(size) and size > 0 else None
            if log is None:
                return self._write_atomic(path, chunks, replace=replace, make_dirs=True)
            return self._put_logged(log, path, key, chunks, replace, hold, sha256, note)
        except LogError as e:
            raise SiteUnavailable(
                self.name, f"write {key}: log: {e.strerror}", hint="check the mount and the disk"
            ) from e
        except OSError as e:
            raise self._error(e, f"write {key}") from e

    def _put_logged(
        self,
        log: SiteLog,
        path: Path,
        key: str,
        chunks: Sequence[bytes],
        replace: bool,
        hold: bool,
        sha256: str,
        note: str,
    ) -> PutResult:
        if not sha256:
            h = hashlib.sha256()
            for c in chunks:
                h.update(c)
            sha256 = h.hexdigest()
        staged = sum(len(c) for c in chunks) > self._inline_max
        receipt = log.append(
            key, [] if staged else chunks, sha256, replace=replace, note=note, staged=staged
        )
        try:
            if staged:
                self._stage(log, receipt, chunks)
            log.wait(receipt)
            if staged:
                created, folders = self._publish_staged(path, log, receipt, chunks, replace)
            else:
                created, folders = self._publish(path, chunks, replace)
            if created:
                log.note_written(receipt, str(path), folders)
        except BaseException:
            receipt.release()
            raise
        if not hold:
            receipt.release()
            return PutResult(created)
        return PutResult(created, receipt)

    def _site_log(self) -> SiteLog | None:
        if self._log is None and self._log_on:
            with self._log_lock:
                if self._log is None:
                    self._log = SiteLog(
                        self.root / WAL_DIR,
                        segment_bytes=self._log_segment_bytes,
                        group_wait=self._group_wait,
                        can_create=lambda: (self.root / SENTINEL).is_file(),
                        on_rotate=lambda: self._on_rotate(),
                    )
        return self._log

    def _stage(self, log: SiteLog, receipt: Receipt, chunks: Sequence[bytes]) -> None:
        """Write and flush a large object's one copy, in the log's staging folder."""
        fd = log.stage_open(receipt)
        try:
            write_all(fd, chunks)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        log.staged(receipt)

    def _publish_staged(
        self,
        path: Path,
        log: SiteLog,
        receipt: Receipt,
        chunks: Sequence[bytes],
        replace: bool,
    ) -> tuple[bool, list[str]]:
        """Give a staged object its name: a hard link to the staged file (the data is written
        once), no flush; the staged name is removed when a checkpoint has flushed the folder."""
        source = log.stage_dir / receipt.staged
        folders: list[str] = [str(path.parent)]
        for attempt in (1, 2):
            new = self._ensure_dir(path.parent)
            folders += [str(d.parent) for d in new]
            try:
                if replace:
                    tmp = path.parent / f".{uuid.uuid4().hex}.tmp"
                    os.link(source, tmp)
                    os.rename(tmp, path)
                    return True, folders
                try:
                    os.link(source, path)
                except FileExistsError:
                    return False, folders
                return True, folders
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self._forget_dir(path.parent)  # the folder went away (a wiped site)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                return self._publish(path, chunks, replace)  # the site spans mounts: a copy
        raise AssertionError("unreachable")

    def _publish(
        self, path: Path, chunks: Sequence[bytes], replace: bool
    ) -> tuple[bool, list[str]]:
        """Write the file of an object whose log record is durable, without flushing it.
        Returns (created, folders a checkpoint must flush)."""
        new = self._ensure_dir(path.parent)
        folders = [str(path.parent)] + [str(d.parent) for d in new]
        fd = self._unnamed_file()
        if fd is None:
            return self._write_named(path, chunks, replace, sync=False), folders
        try:
            write_all(fd, chunks)
            try:
                return _link_fd(fd, path, replace, sync=False), folders
            except FileNotFoundError:
                # The folder went away since we made it (a wiped site being rebuilt).
                self._forget_dir(path.parent)
                new = self._ensure_dir(path.parent)
                folders += [str(d.parent) for d in new]
                return _link_fd(fd, path, replace, sync=False), folders
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            self._tmpfile = False  # the site spans mounts: fall back to temp names
        finally:
            os.close(fd)
        return self._write_named(path, chunks, replace, sync=False), folders

    def _write_atomic(
        self, path: Path, chunks: Sequence[bytes], *, replace: bool, make_dirs: bool = False
    ) -> PutResult:
        """Write, fdatasync, link into place, fsync the directory (and make new folders above
        it durable): an object durable on its own, without the log.

        The new file comes first, in the filesystem of .incoming: on an unmounted volume
        (.incoming missing) the write fails there, before any folder is created on the empty
        mount point underneath. With O_TMPFILE (Linux, local filesystems) the file has no name
        until it is complete and durable, and a crash before the link leaves nothing behind;
        elsewhere (NFS, SMB) a named temp file in .incoming is used and swept at start-up.
        """
        fd = self._unnamed_file() if path.parent != self.root else None
        if fd is None:
            return PutResult(
                self._write_named(path, chunks, replace, sync=True, make_dirs=make_dirs)
            )
        try:
            write_all(fd, chunks)
            os.fdatasync(fd)
            if make_dirs:
                self._ensure_dir(path.parent, durable=True)
            try:
                return PutResult(_link_fd(fd, path, replace, sync=True))
            except FileNotFoundError:
                if not make_dirs:
                    raise
                # The folder went away since we made it: once more, and an EXDEV of this
                # second link falls back to temp names as the first one's would.
                self._forget_dir(path.parent)
                self._ensure_dir(path.parent, durable=True)
                return PutResult(_link_fd(fd, path, replace, sync=True))
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            self._tmpfile = False  # the site spans mounts: fall back to temp names
        finally:
            os.close(fd)
        return PutResult(self._write_named(path, chunks, replace, sync=True, make_dirs=make_dirs))

    def _unnamed_file(self) -> int | None:
        """An O_TMPFILE on the site's filesystem, or None where there is none."""
        if not self._tmpfile:
            return None
        fd = _open_tmpfile(self._incoming)
        self._tmpfile = fd is not None  # not supported here: named temp files from now on
        return fd

    def _write_named(
        self,
        path: Path,
        chunks: Sequence[bytes],
        replace: bool,
        *,
        sync: bool,
        make_dirs: bool = True,
    ) -> bool:
        tmp = self._incoming / f"{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                write_all(fd, chunks)
                if sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if make_dirs:
                self._ensure_dir(path.parent, durable=sync)
            try:
                created = _place(tmp, path, replace)
            except FileNotFoundError:
                if not make_dirs:
                    raise
                self._forget_dir(path.parent)
                self._ensure_dir(path.parent, durable=sync)
                created = _place(tmp, path, replace)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if created and sync:
            fsync_dir(path.parent)
        return created

    def _ensure_dir(self, directory: Path, *, durable: bool = False) -> list[Path]:
        """mkdir -p; returns the folders it made. Their entries are flushed now when
        `durable`, otherwise by the next checkpoint (`checkpoint`)."""
        made: list[Path] = []
        if directory not in self._dirs:
            missing = []
            d = directory
            while not d.is_dir():
                missing.append(d)
                d = d.parent
            if missing and not (self.root / SENTINEL).is_file():
                # Never create folders on an empty mount point: the volume is not there.
                raise SiteUnavailable(
                    self.name, f"{SENTINEL} missing in {self.root}", hint="is the volume mounted?"
                )
            for m in reversed(missing):
                try:
                    m.mkdir()
                    made.append(m)
                except FileExistsError:
                    pass
            with self._dir_lock:
                if len(self._dirs) > 100_000:
                    self._dirs.clear()
                self._dirs.add(directory)
                self._new_dirs.update(made)
        if durable:
            self._flush_new_dirs(directory)
        return made

    def _flush_new_dirs(self, directory: Path) -> None:
        """Make the entries of the folders on the way to `directory` durable, where we made
        them and no flush has covered them yet."""
        d = directory
        while d != self.root and d != d.parent:
            with self._dir_lock:
                new = d in self._new_dirs
            if new:
                fsync_dir(d.parent)
                with self._dir_lock:
                    self._new_dirs.discard(d)
            d = d.parent

    def _forget_dir(self, directory: Path) -> None:
        with self._dir_lock:
            self._dirs.discard(directory)

    # ------------------------------------------------------------------ the log
    def logs(self, size: int) -> bool:
        return self._log_on

    def on_rotate(self, callback: Callable[[], None]) -> None:
        """Call `callback` when a log segment fills up (a checkpoint is due)."""
        self._on_rotate = callback

    def warm(self) -> None:
        """Prepare the log so that the first write does not wait for a new segment."""
        log = self._site_log()
        if log is not None and (self.root / SENTINEL).is_file():
            try:
                log.warm()
            except OSError as e:
                raise self._error(e, "prepare the log") from e

    def checkpoint(self, sync_index: Callable[[], None], *, max_age: float | None = None) -> int:
        """Flush the files and folders written from the log's finished segments, make the
        index durable (`sync_index`), then let the log reuse those segments.

        `max_age`: also end the current segment when it is older than that (seconds); None
        ends it now (a clean stop). Returns the number of files flushed.
        """
        log = self._log
        if log is None:
            return 0
        if max_age is None:
            log.rotate_now()
        else:
            log.rotate_if_older(max_age)
        ready = log.ready()
        if not ready:
            return 0
        files = [f for seg in ready for f in seg.written]
        folders = [d for seg in ready for d in seg.folders]
        with self._dir_lock:
            new_dirs = list(self._new_dirs)
        folders += [str(d.parent) for d in new_dirs]
        try:
            flush_all(files, folders)
            sync_index()
        except OSError as e:
            raise self._error(e, "checkpoint") from e
        with self._dir_lock:
            self._new_dirs.difference_update(new_dirs)
        for seg in ready:
            log.retire(seg)
        return len(files)

    def log_pending(self) -> bool:
        """Whether the log holds records a checkpoint has not covered yet."""
        return self._log is not None and self._log.has_records()

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()

    def dead_log(self) -> list[DeadSegment]:
        """Log segments left with records by processes that are gone (for recovery); staged
        files no segment in use can name any more are removed on the way."""
        sweep_staged(self.root / WAL_DIR)
        return dead_segments(self.root / WAL_DIR)

    def restore(self, key: str, data: bytes) -> None:
        """Make the object under `key` exactly `data`, durably (recovery's rewrite of a file
        that a crash left missing or torn)."""
        path = self._path(key)
        try:
            self._write_atomic(path, [data], replace=True, make_dirs=True)
        except OSError as e:
            raise self._error(e, f"restore {key}") from e

    def flush_objects(self, keys: Sequence[str]) -> None:
        """Make existing objects and their folders durable (recovery, after a process died
        before its checkpoint: the files may be in the page cache only)."""
        paths = [self._path(k) for k in keys]
        folders: set[str] = set()
        for p in paths:
            d = p.parent
            while d != self.root and d != d.parent:
                folders.add(str(d))
                d = d.parent
        folders.add(str(self.root))
        try:
            flush_all([str(p) for p in paths], sorted(folders))
        except OSError as e:
            raise self._error(e, "flush recovered objects") from e

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            if not (self.root / SENTINEL).exists():
                raise SiteUnavailable(
                    self.name, f"{SENTINEL} missing", hint="is the volume mounted?"
                ) from None
            raise ObjectMissing(self.name, f"no object {key}") from None
        except OSError as e:
            raise self._error(e, f"read {key}") from e

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._error(e, f"stat {key}") from e
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "", *, suffix: str = ".dcm") -> Iterator[ObjectInfo]:
        start = self.root / prefix if prefix else self.root
        if not start.exists():
            return
        stack = [start]
        root_len = len(str(self.root)) + 1
        while stack:
            d = stack.pop()
            try:
                entries = list(os.scandir(d))
            except OSError as e:
                raise self._error(e, f"list {d}") from e
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # sentinel, .incoming, .quarantine, temp files
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.name.endswith(suffix):
                    st = entry.stat()
                    yield ObjectInfo(entry.path[root_len:], st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        if self.role != "cache":
            raise StorageError(self.name, f"refusing to delete {key}: archive sites never delete")
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error(e, f"delete {key}") from e

    def purge(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error(e, f"purge {key}") from e

    def quarantine(self, key: str, reason: str) -> str:
        src = self._path(key)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        dest = self.root / QUARANTINE / stamp / key
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            n = 0
            while dest.exists():  # never overwrite earlier evidence
                n += 1
                dest = dest.with_name(f"{Path(key).name}.{n}")
            os.rename(src, dest)
            (dest.parent / (dest.name + ".reason.txt")).write_text(reason + "\n")
            fsync_dir(src.parent)
            fsync_dir(dest.parent)
        except FileNotFoundError:
            raise ObjectMissing(self.name, f"no object {key}") from None
        except OSError as e:
            raise self._error(e, f"quarantine {key}") from e
        return str(dest.relative_to(self.root))

    def _error(self, e: OSError, what: str) -> StorageError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return SiteUnavailable(
                self.name,
                f"{what}: no space left",
                hint="free space or add "
                "a site; ingest continues on other sites if the quorum allows",
            )
        if e.errno in (
            errno.EROFS,
            errno.EACCES,
            errno.EPERM,
            errno.EIO,
            errno.ENOTCONN,
            errno.ESTALE,
            errno.ENODEV,
            errno.EHOSTDOWN,
        ):
            return SiteUnavailable(
                self.name, f"{what}: {e.strerror}", hint="check the mount, permissions and the disk"
            )
        if not (self.root / SENTINEL).exists():
            return SiteUnavailable(
                self.name,
                f"{what}: {e.strerror}; {SENTINEL} missing",
                hint="is the volume mounted?",
            )
        return StorageError(self.name, f"{what}: {e.strerror}")


def _open_tmpfile(directory: Path) -> int | None:
    """A new unnamed file (write only) on `directory`'s filesystem; None where the filesystem
    has no O_TMPFILE (NFS, SMB, older kernels).

    Created inline: a pool filled ahead by a background thread used to hide the cost of
    creating an inode, but that cost was ext4 walking recently deleted inodes (the benchmark
    deleted thousands of files right before measuring); without that, creating one costs
    microseconds and the pool's thread cost 10% of the ingest CPU in wake-ups.
    """
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def _link_fd(fd: int, path: Path, replace: bool, *, sync: bool) -> bool:
    """Give an unnamed file its name (and fsync the folder when `sync`). False if `path`
    existed and was kept.

    os.link only calls linkat (which can follow the /proc magic link) when a dir_fd is given;
    plain link() would try to link the symlink itself and fail with EXDEV.
    """
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        source = f"/proc/self/fd/{fd}"
        if replace:
            tmp = f".{uuid.uuid4().hex}.tmp"
            os.link(source, tmp, dst_dir_fd=dirfd, follow_symlinks=True)
            os.rename(tmp, path.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        else:
            try:
                os.link(source, path.name, dst_dir_fd=dirfd, follow_symlinks=True)
            except FileExistsError:
                return False
        if sync:
            os.fsync(dirfd)
        return True
    finally:
        os.close(dirfd)


def _place(tmp: Path, path: Path, replace: bool) -> bool:
    """Move a written temp file to its key; False if `path` existed and was kept."""
    if replace:
        os.rename(tmp, path)
        return True
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    os.unlink(tmp)
    return created
