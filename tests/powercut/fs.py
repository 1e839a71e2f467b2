"""The recording filesystem: a FUSE passthrough to a backing folder that logs every change.

    python -m tests.powercut.fs BACKING MOUNTPOINT HISTORY

Runs in the foreground until unmounted or sent SIGTERM (tests start it through mount.py).
Every mutating call is applied to the backing folder and appended to HISTORY (history.py)
under one lock, before the kernel is answered. fsync, fdatasync and a folder's fsync are only
recorded: the backing folder is scratch, the model (model.py) decides what they made durable.

What it takes for SQLite and the archive to run on it (libfuse 2 through fusepy):
- `kernel_cache`: an open does not drop the file's page cache. SQLite's -shm is a shared
  mmap; dropping its pages on every open of another connection would write back and re-read
  the wal-index under the other processes' feet. Safe here: nothing changes the backing
  folder except this filesystem.
- `hard_remove` and `flag_nullpath_ok`: a file unlinked while open is really unlinked (libfuse
  would rename it to .fuse_hidden*, an operation the program never made), and calls on its
  open handle still reach us; every handle-based call uses the handle, never the path.
- `no_remote_lock`, and no `lock` or `flock` operation: the kernel keeps POSIX (fcntl) and
  BSD (flock) locks itself, which is right for processes on one machine. (fusepy registers
  every attribute of the operations object that libfuse has a slot for: an attribute named
  `lock` would be taken for the lock operation.)
- No O_TMPFILE: FUSE through libfuse 2 has no tmpfile operation, the kernel answers
  EOPNOTSUPP, and a program falls back to named temp files (pacsgrid does).
- O_APPEND is served by the kernel (it passes the offset); the backing file is opened without
  it, so the recorded offset is the one written. O_SYNC and O_DSYNC handles get an fsync
  record after each write.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

from fuse import FUSE, FuseOSError

from tests.powercut.history import ROOT, Writer

_SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
_DROP_FLAGS = os.O_APPEND | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_TRUNC | _SYNC_FLAGS


class Recorder:
    """fusepy operations (called by name through __call__; only what is defined here is
    registered with libfuse, so locks stay with the kernel)."""

    use_ns = True
    flag_nullpath_ok = True

    def __init__(self, backing: Path, history: Path) -> None:
        self.backing = str(backing.resolve())
        self.log = Writer(history)
        self._mutex = threading.Lock()
        self._ids = {os.lstat(self.backing).st_ino: ROOT}  # backing st_ino -> our inode number
        self._next = ROOT + 1
        self._handles: dict[int, tuple[int, bool]] = {}  # fd -> (inode, O_SYNC/O_DSYNC)

    def __call__(self, op: str, *args: Any) -> Any:
        try:
            return getattr(self, op)(*args)
        except OSError as e:
            raise FuseOSError(e.errno or errno.EIO) from e

    # ------------------------------------------------------------------ helpers
    def _real(self, path: str) -> str:
        return self.backing + path

    def _ino(self, path: str) -> int:
        st_ino = os.lstat(self._real(path)).st_ino
        ino = self._ids.get(st_ino)
        if ino is None:
            raise FuseOSError(errno.EIO)  # created behind the recorder's back
        return ino

    def _new(self, path: str) -> int:
        ino = self._next
        self._next += 1
        self._ids[os.lstat(self._real(path)).st_ino] = ino
        return ino

    def _parent(self, path: str) -> tuple[int, str]:
        head, _, name = path.rpartition("/")
        return self._ino(head or "/"), name

    def _open(self, fd: int, ino: int, flags: int, fi: Any) -> int:
        self._handles[fd] = (ino, bool(flags & _SYNC_FLAGS))
        fi.fh = fd
        return 0

    @staticmethod
    def _backing_flags(flags: int) -> int:
        mode = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
        return (flags & ~(_DROP_FLAGS | os.O_ACCMODE)) | mode

    # ------------------------------------------------------------------ reading
    def getattr(self, path: str | None, fi: Any = None) -> dict[str, int]:
        st = os.fstat(fi.fh) if fi else os.lstat(self._real(path or "/"))
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_blocks")
        out = {k: getattr(st, k) for k in keys}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        return os.pread(fi.fh, size, offset)

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.backing)
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")
        return {k: getattr(sv, k) for k in (*keys, "f_flag", "f_frsize", "f_namemax")}

    def access(self, path: str, mode: int) -> int:
        os.lstat(self._real(path))
        return 0

    # ------------------------------------------------------------------ metadata (not modelled)
    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._real(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        os.utime(self._real(path), ns=times)

    # ------------------------------------------------------------------ handles
    def open(self, path: str, fi: Any) -> int:
        with self._mutex:
            fd = os.open(self._real(path), self._backing_flags(fi.flags))
            ino = self._ids[os.fstat(fd).st_ino]
            if fi.flags & os.O_TRUNC:
                os.ftruncate(fd, 0)
                self.log.append("truncate", ino, 0, path)
            return self._open(fd, ino, fi.flags, fi)

    def create(self, path: str, mode: int, fi: Any) -> int:
        with self._mutex:
            real = self._real(path)
            flags = self._backing_flags(fi.flags)
            try:
                fd = os.open(real, flags | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                if fi.flags & os.O_EXCL:
                    raise
                return self.open(path, fi)  # raced with another creator: an open
            parent, name = self._parent(path)
            ino = self._new(path)
            self.log.append("create", parent, name, ino, path)
            return self._open(fd, ino, fi.flags, fi)

    def release(self, path: str | None, fi: Any) -> None:
        with self._mutex:  # before close: the fd number may be reused at once
            self._handles.pop(fi.fh, None)
            os.close(fi.fh)

    def flush(self, path: str | None, fi: Any) -> None:
        return None

    # ------------------------------------------------------------------ data
    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        with self._mutex:
            ino, sync = self._handles[fi.fh]
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.pwrite(fi.fh, view[done:], offset + done)
            self.log.append("write", ino, offset, data, path or "")
            if sync:
                self.log.append("fsync", ino, path or "")
            return len(data)

    def truncate(self, path: str | None, length: int, fi: Any = None) -> None:
        with self._mutex:
            if fi:
                ino = self._handles[fi.fh][0]
                os.ftruncate(fi.fh, length)
            else:
                ino = self._ino(path or "/")
                os.truncate(self._real(path or "/"), length)
            self.log.append("truncate", ino, length, path or "")

    def fsync(self, path: str | None, datasync: int, fi: Any) -> None:
        with self._mutex:
            self.log.append("fsync", self._handles[fi.fh][0], path or "")

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        with self._mutex:
            self.log.append("fsyncdir", self._ino(path), path)

    # ------------------------------------------------------------------ names
    def mkdir(self, path: str, mode: int) -> None:
        with self._mutex:
            parent, name = self._parent(path)
            os.mkdir(self._real(path), mode)
            self.log.append("mkdir", parent, name, self._new(path), path)

    def mknod(self, path: str, mode: int, dev: int) -> None:
        if not stat.S_ISREG(mode):
            raise FuseOSError(errno.EPERM)  # the model knows files, folders and symlinks
        with self._mutex:
            parent, name = self._parent(path)
            os.mknod(self._real(path), mode)
            self.log.append("create", parent, name, self._new(path), path)

    def symlink(self, target: str, source: str) -> None:
        """`target` is the new link's path, `source` what it points to (fusepy's names)."""
        with self._mutex:
            parent, name = self._parent(target)
            os.symlink(source, self._real(target))
            self.log.append("symlink", parent, name, self._new(target), source, target)

    def link(self, target: str, source: str) -> None:
        """`target` is the new name, `source` the existing file (fusepy's names)."""
        with self._mutex:
            ino = self._ino(source)
            parent, name = self._parent(target)
            os.link(self._real(source), self._real(target))
            self.log.append("link", ino, parent, name, target)

    def unlink(self, path: str) -> None:
        with self._mutex:
            parent, name = self._parent(path)
            os.unlink(self._real(path))
            self.log.append("unlink", parent, name, path)

    def rmdir(self, path: str) -> None:
        with self._mutex:
            parent, name = self._parent(path)
            os.rmdir(self._real(path))
            self.log.append("rmdir", parent, name, path)

    def rename(self, old: str, new: str) -> None:
        with self._mutex:
            src = os.lstat(self._real(old))
            try:
                same = os.lstat(self._real(new)).st_ino == src.st_ino
            except FileNotFoundError:
                same = False
            sp, sn = self._parent(old)
            dp, dn = self._parent(new)
            os.rename(self._real(old), self._real(new))
            if not same:  # rename onto another name of the same file changes nothing
                self.log.append("rename", sp, sn, dp, dn, f"{old} -> {new}")

    def destroy(self, path: str) -> None:
        self.log.close()


def main(argv: list[str]) -> None:
    backing, mountpoint, history = map(Path, argv)
    FUSE(
        Recorder(backing, history),
        str(mountpoint),
        raw_fi=True,
        foreground=True,
        fsname="powercut",
        kernel_cache=True,
        hard_remove=True,
        big_writes=True,
        no_remote_lock=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
