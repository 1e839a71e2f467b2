"""A storage site that is a folder: local disk, or an NFS/SMB mount.

Layout under the root:
    .pacsgrid-site            sentinel: proves the volume is the one we initialised (an
                              unmounted NAS shows an empty mount point, not our data)
    .incoming/                temp files being written; never listed, swept at start-up
    .quarantine/<time>/<key>  copies that failed a fixity check, kept as evidence
    <study>/<series>/<sop>.dcm

A write is: an unnamed file (O_TMPFILE) in the target folder, or a temp file in .incoming where
the filesystem has no O_TMPFILE; write, fdatasync, link into place, fsync the directory. link()
fails when the target exists, which gives the no-clobber rule of `put` across threads and
processes without any lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from threading import Lock

from pacsgrid.errors import ObjectMissing, SiteUnavailable, StorageError
from pacsgrid.storage.base import SENTINEL, ObjectInfo, PutResult, SiteHealth

INCOMING = ".incoming"
QUARANTINE = ".quarantine"


class FilesystemSite:
    def __init__(
        self, name: str, root: Path, *, location: str = "default", role: str = "archive"
    ) -> None:
        self.name = name
        self.root = root
        self.location = location
        self.role = role
        self.url = root.as_uri()
        self._incoming = root / INCOMING
        self._durable_dirs: set[Path] = set()
        self._dir_lock = Lock()
        self._tmpfile = hasattr(os, "O_TMPFILE")

    # ------------------------------------------------------------------ lifecycle
    def initialize(self) -> None:
        try:
            mkdir_durable(self.root)
            self._incoming.mkdir(exist_ok=True)
            sentinel = self.root / SENTINEL
            if not sentinel.exists():
                if any(p.name not in (INCOMING, QUARANTINE) for p in self.root.iterdir()):
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

    def put(self, key: str, chunks: Sequence[bytes], *, replace: bool = False) -> PutResult:
        path = self._path(key)
        try:
            return self._write_atomic(path, chunks, replace=replace, make_dirs=True)
        except OSError as e:
            raise self._error(e, f"write {key}") from e

    def _write_atomic(
        self, path: Path, chunks: Sequence[bytes], *, replace: bool, make_dirs: bool = False
    ) -> PutResult:
        """Write, fdatasync, link into place, fsync the directory.

        The new file comes first, in the filesystem of .incoming: on an unmounted volume
        (.incoming missing) the write fails there, before any folder is created on the empty
        mount point underneath. With O_TMPFILE (Linux, local filesystems) the file has no name
        until it is complete and durable, and a crash before the link leaves nothing behind;
        elsewhere (NFS, SMB) a named temp file in .incoming is used and swept at start-up.
        """
        fd = None
        if self._tmpfile and path.parent != self.root:
            fd = _open_tmpfile(self._incoming)
            self._tmpfile = fd is not None  # not supported here: named temp files from now on
        if fd is None:
            return self._write_named(path, chunks, replace, make_dirs)
        try:
            _write_all(fd, chunks)
            os.fdatasync(fd)
            if make_dirs:
                self._ensure_dir(path.parent)
            try:
                return PutResult(_link_fd(fd, path, replace))
            except FileNotFoundError:
                if not make_dirs:
                    raise
                # The folder went away since we made it (a wiped site being rebuilt).
                with self._dir_lock:
                    self._durable_dirs.discard(path.parent)
                self._ensure_dir(path.parent)
                return PutResult(_link_fd(fd, path, replace))
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                self._tmpfile = False  # the site spans mounts: fall back to temp names
        finally:
            os.close(fd)
        return self._write_named(path, chunks, replace, make_dirs)

    def _write_named(
        self, path: Path, chunks: Sequence[bytes], replace: bool, make_dirs: bool
    ) -> PutResult:
        tmp = self._incoming / f"{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, chunks)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if make_dirs:
                self._ensure_dir(path.parent)
            try:
                created = _place(tmp, path, replace)
            except FileNotFoundError:
                if not make_dirs:
                    raise
                with self._dir_lock:
                    self._durable_dirs.discard(path.parent)
                self._ensure_dir(path.parent)
                created = _place(tmp, path, replace)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if created:
            _fsync_dir(path.parent)
        return PutResult(created)

    def _ensure_dir(self, directory: Path) -> None:
        """mkdir -p, and make each new directory entry durable (fsync its parent)."""
        if directory in self._durable_dirs:
            return
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
            with contextlib.suppress(FileExistsError):
                m.mkdir()
            _fsync_dir(m.parent)
        with self._dir_lock:
            if len(self._durable_dirs) > 100_000:
                self._durable_dirs.clear()
            self._durable_dirs.add(directory)

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

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
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
                elif entry.name.endswith(".dcm"):
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
            _fsync_dir(src.parent)
            _fsync_dir(dest.parent)
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


def _link_fd(fd: int, path: Path, replace: bool) -> bool:
    """Give an unnamed file its name; fsync the folder. False if `path` existed and was kept.

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


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    views = [memoryview(c) for c in chunks if len(c)]
    while views:
        n = os.writev(fd, views)
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def mkdir_durable(directory: Path) -> None:
    """mkdir -p that fsyncs the parent of every folder it creates: a new folder's name is
    durable only once its parent is, and a power cut before that takes everything in it."""
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        with contextlib.suppress(FileExistsError):
            m.mkdir()
        _fsync_dir(m.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
