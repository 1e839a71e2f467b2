"""A folder site's write path (storage/filesystem.py) beyond the storage contract: what each
kind of write flushes, sites without O_TMPFILE (NFS, SMB) and sites that span mounts, a folder
removed under the site while a write is on its way, `put(hold=True)`, `restore`, and the
errors the site reports.

Everything is real files in a temporary folder; flushes are observed by wrapping the real
system calls (they still run). What the local disk cannot be made to do is produced by failing
one system call the way the real filesystem or a concurrent process would, and each test that
does so says which: O_TMPFILE refused with EOPNOTSUPP (NFS, SMB), the link of an unnamed file
refused with EXDEV, a folder removed by another process at the moment of the link. A site
whose log lies on another filesystem than its objects is real: its `.wal` is a symlink into
/dev/shm.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacsgrid.errors import SiteUnavailable, StorageError
from pacsgrid.storage import object_key
from pacsgrid.storage.base import SENTINEL
from pacsgrid.storage.filesystem import INCOMING, FilesystemSite
from pacsgrid.storage.walfile import WAL_DIR
from tests.test_storage_contract import refuse_o_tmpfile

MB = 1 << 20
STUDY, SERIES = "1.2", "1.2.3"
KEY = object_key(STUDY, SERIES, "1.2.3.1")
KEY2 = object_key(STUDY, SERIES, "1.2.3.2")


@dataclass(frozen=True)
class Call:
    name: str  # "fdatasync", "fsync" or "link"
    path: str  # what was flushed (its name at the time) or linked to
    ino: int = 0  # the inode flushed


class Calls(list[Call]):
    def synced_dirs(self) -> list[str]:
        return [c.path for c in self if c.name == "fsync" and Path(c.path).is_dir()]

    def data_flush_of(self, path: Path) -> int:
        """Where the data of the file now at `path` was flushed (the file may have had no
        name, or another one, at the time)."""
        ino = path.stat().st_ino
        found = [i for i, c in enumerate(self) if c.name == "fdatasync" and c.ino == ino]
        assert found, f"the data of {path} was never flushed"
        return found[0]

    def dir_sync(self, folder: Path) -> int:
        found = [i for i, c in enumerate(self) if c.name == "fsync" and c.path == str(folder)]
        assert found, f"{folder} was never flushed"
        return found[-1]

    def outside(self, directory: Path) -> list[Call]:
        """The flushes of anything but `directory` and what it holds."""
        inside = (str(directory), str(directory) + os.sep)
        return [c for c in self if c.name != "link" and not c.path.startswith(inside)]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Every fsync, fdatasync and link the process makes (they still run), in order."""
    seen = Calls()
    lock = threading.Lock()
    real_fsync, real_fdatasync, real_link = os.fsync, os.fdatasync, os.link

    def record(name: str, fd: int) -> None:
        call = Call(name, os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_ino)
        with lock:
            seen.append(call)

    def fsync(fd: int) -> None:
        real_fsync(fd)
        record("fsync", fd)

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        record("fdatasync", fd)

    def link(src: str, dst: str, *args: object, **kw: object) -> None:
        dir_fd = kw.get("dst_dir_fd")
        where = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) else ""
        with lock:
            seen.append(Call("link", os.path.join(where, str(dst))))
        real_link(src, dst, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "link", link)
    return seen


def _site(tmp_path: Path, *, log: bool = True, inline_max: int = 128 << 10) -> FilesystemSite:
    site = FilesystemSite(
        "fs", tmp_path / "site", log=log, inline_max=inline_max, log_segment_bytes=4 * MB
    )
    site.initialize()
    return site


def _incoming(site: FilesystemSite) -> list[Path]:
    return list((site.root / INCOMING).iterdir())


def needs_o_tmpfile(where: Path) -> None:
    """Skip a test about unnamed files where the disk under the tests has none (NFS, SMB,
    older overlay filesystems): there the site writes every object under a temp name."""
    try:
        fd = os.open(where, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except OSError as e:
        pytest.skip(f"no O_TMPFILE on {where}: {e.strerror}")
    os.close(fd)


@pytest.fixture(params=[True, False], ids=["o_tmpfile", "named"])
def tmpfile(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> bool:
    """The test runs twice: on the local disk, and on a filesystem without O_TMPFILE."""
    if request.param:
        needs_o_tmpfile(tmp_path)
    else:
        refuse_o_tmpfile(monkeypatch)
    return bool(request.param)


# ---------------------------------------------------------------- what a write flushes


def test_a_write_without_the_log_flushes_its_data_its_name_and_the_folders_it_made(
    tmp_path: Path, calls: Calls, tmpfile: bool
) -> None:
    """With the log off, `put` returns only once the object is durable on its own: its data
    flushed before it gets its name, the folder holding the name flushed after, and the
    entries of the folders it made (study and series) flushed too."""
    site = _site(tmp_path, log=False)
    calls.clear()
    assert site.put(KEY, [b"DICM", b"x" * 100]).created is True
    path = site.root / KEY
    assert calls.data_flush_of(path) < calls.dir_sync(path.parent)
    assert calls.dir_sync(site.root) < calls.dir_sync(path.parent)  # the study's entry
    assert calls.dir_sync(site.root / STUDY) < calls.dir_sync(path.parent)  # the series'
    # In a folder that exists, only the new name is flushed (and the data).
    calls.clear()
    assert site.put(KEY2, [b"DICM", b"y" * 100]).created is True
    assert calls.data_flush_of(site.root / KEY2) < calls.dir_sync(path.parent)
    assert calls.synced_dirs() == [str(path.parent)]
    # A write that keeps the object already there links nothing and flushes no folder.
    calls.clear()
    assert site.put(KEY, [b"DICM", b"z"]).created is False
    assert calls.synced_dirs() == []
    assert (site.root / KEY).read_bytes() == b"DICM" + b"x" * 100
    # Readable by all, written by the archive only, executable by none (whatever the umask
    # takes away).
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((site.root / KEY).stat().st_mode) == 0o644 & ~umask


@pytest.mark.parametrize("size", [100, 5000], ids=["inline", "staged"])
def test_a_logged_write_flushes_nothing_outside_the_log(
    tmp_path: Path, calls: Calls, tmpfile: bool, size: int
) -> None:
    """A logged write is durable by its record (and a staged object by its file in the log's
    staging folder): the object's own file and folders are left to the checkpoint, so that a
    group of writes costs one flush, not two each."""
    site = _site(tmp_path, inline_max=1024)
    site.put(object_key("9.9", "9.9.9", "9.9.9.9"), [b"DICM", b"w" * size])  # makes the log
    calls.clear()
    assert site.put(KEY, [b"DICM", b"x" * size]).created is True
    assert site.put(KEY2, [b"DICM", b"y" * size], replace=True).created is True
    assert site.put(KEY, [b"DICM", b"z" * size]).created is False
    assert calls.outside(site.root / WAL_DIR) == []
    assert (site.root / KEY).read_bytes() == b"DICM" + b"x" * size


# ---------------------------------------------------------------- EXDEV on an unnamed file's link


def _refuse_linking_unnamed_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The link of an unnamed file (through /proc/self/fd) fails with EXDEV, as it does where
    the kernel will not follow that link (the local disk here always does). Returns the
    attempts."""
    real_link = os.link
    refused: list[str] = []

    def link(src: str, dst: str, *args: object, **kw: object) -> None:
        if str(src).startswith("/proc/self/fd/"):
            refused.append(str(dst))
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    return refused


@pytest.mark.parametrize("replace_first", [True, False], ids=["replace-first", "new-first"])
@pytest.mark.parametrize("log", [True, False], ids=["logged", "direct"])
def test_an_unnamed_file_that_cannot_be_linked_falls_back_to_temp_names(
    tmp_path: Path, calls: Calls, monkeypatch: pytest.MonkeyPatch, log: bool, replace_first: bool
) -> None:
    """Where an unnamed file cannot be linked into place (EXDEV), the object is written under a
    temp name instead, with the same rules (no-clobber unless replace) and the same flushes,
    and the site does not try unnamed files again."""
    needs_o_tmpfile(tmp_path)
    site = _site(tmp_path, log=log)
    site.put(KEY, [b"DICM", b"x"])  # the log and the folders exist
    refused = _refuse_linking_unnamed_files(monkeypatch)
    writes = [(KEY, b"z", True, True), (KEY2, b"y", False, True), (KEY2, b"w", False, False)]
    if not replace_first:
        writes = writes[1:] + writes[:1]
    for n, (key, data, replace, created) in enumerate(writes):
        calls.clear()
        assert site.put(key, [b"DICM", data], replace=replace).created is created
        if n == 0 and log:
            assert calls.outside(site.root / WAL_DIR) == []
        elif n == 0:
            assert calls.data_flush_of(site.root / key) < calls.dir_sync(site.root / STUDY / SERIES)
    assert (site.root / KEY).read_bytes() == b"DICMz"
    assert (site.root / KEY2).read_bytes() == b"DICMy"
    assert len(refused) == 1
    assert _incoming(site) == []


# ---------------------------------------------------------------- put(hold=True), notes, restore


def test_a_held_write_keeps_its_record_from_the_checkpoint_until_released(
    tmp_path: Path,
) -> None:
    """Ingest holds a write's receipt until the index has the instance: until then no
    checkpoint may let the log drop the record."""
    site = _site(tmp_path)
    held = site.put(KEY, [b"DICM", b"x"], hold=True)
    assert held.created is True and held.receipt is not None
    assert site.checkpoint(lambda: None) == 0
    assert site.log_pending()
    held.release()
    assert site.checkpoint(lambda: None) == 1
    kept = site.put(KEY, [b"DICM", b"y"], hold=True)
    assert kept.created is False and kept.receipt is not None
    kept.release()
    assert site.put(KEY2, [b"DICM", b"x"]).receipt is None


def test_a_logged_write_keeps_its_note_in_its_record(tmp_path: Path) -> None:
    """Recovery tells from a record's note who stored the object."""
    site = _site(tmp_path)
    site.put(KEY, [b"DICM", b"x"], note='{"via": "test"}')
    site.put(KEY2, [b"DICM", b"y"])
    log = site._site_log()
    assert log is not None
    for seg in log._segments:  # the process dies: its segments' locks go
        os.close(seg.fd)
    dead = site.dead_log()
    assert [(r.key, r.note) for d in dead for r in d.records()] == [
        (KEY, '{"via": "test"}'),
        (KEY2, ""),
    ]
    for d in dead:
        d.close()


def test_restore_makes_the_missing_folders_and_replaces(
    tmp_path: Path, calls: Calls, tmpfile: bool
) -> None:
    """Recovery rewrites a file a crash left missing (with its folders) or torn, durably."""
    site = _site(tmp_path)
    site.restore(KEY, b"DICM-restored")
    assert (site.root / KEY).read_bytes() == b"DICM-restored"
    assert calls.data_flush_of(site.root / KEY) < calls.dir_sync(site.root / STUDY / SERIES)
    site.restore(KEY, b"DICM-again")
    assert (site.root / KEY).read_bytes() == b"DICM-again"
    assert _incoming(site) == []


def test_each_write_links_its_file_once(tmp_path: Path, calls: Calls, tmpfile: bool) -> None:
    """A write links its file into place once: a second try is only for a folder removed
    under the site."""
    for log in (True, False):
        site = _site(tmp_path / str(log), log=log)
        site.put(KEY, [b"DICM", b"x"])
        calls.clear()
        assert site.put(KEY2, [b"DICM", b"x"]).created is True
        assert len([c for c in calls if c.name == "link"]) == 1


# ---------------------------------------------------------------- sites that span mounts


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (a tmpfs): links across fail with EXDEV."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to span")
    where = Path(tempfile.mkdtemp(dir=shm, prefix="pacsgrid-test-"))
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_a_log_on_another_filesystem_copies_staged_objects(
    tmp_path: Path, other_filesystem: Path
) -> None:
    """A staged object is linked from the log's staging folder into place; where the log lies
    on another filesystem (a `.wal` mounted or linked elsewhere), the link fails with EXDEV
    and the object is written into place as a copy, with the same rules: no-clobber unless
    replace."""
    root = tmp_path / "site"
    root.mkdir()
    (root / WAL_DIR).symlink_to(other_filesystem)
    site = _site(tmp_path, inline_max=1024)
    big = [b"DICM", b"x" * 5000]
    assert site.put(KEY, big).created is True
    assert site.put(KEY, [b"DICM", b"y" * 5000]).created is False
    assert (site.root / KEY).read_bytes() == b"".join(big)
    assert site.put(KEY, [b"DICM", b"z" * 5000], replace=True).created is True
    assert (site.root / KEY).read_bytes() == b"DICM" + b"z" * 5000
    assert (site.root / KEY).stat().st_nlink == 1  # a copy, not a link to the staged file
    assert site.checkpoint(lambda: None) == 2


# ---------------------------------------------------------------- a folder removed under the site


def test_a_write_into_a_removed_folder_makes_it_again_and_flushes_it(
    tmp_path: Path, calls: Calls, tmpfile: bool
) -> None:
    """The site remembers the folders it made; when one was removed behind its back (a wiped
    site being rebuilt), the link fails, and the write makes the folders again, flushes their
    entries and its own name before it returns (log off)."""
    site = _site(tmp_path, log=False)
    site.put(KEY, [b"DICM", b"x"])
    shutil.rmtree(site.root / STUDY)
    calls.clear()
    assert site.put(KEY2, [b"DICM", b"y"]).created is True
    series = site.root / STUDY / SERIES
    assert calls.data_flush_of(site.root / KEY2) < calls.dir_sync(series)
    assert calls.dir_sync(site.root) < calls.dir_sync(series)
    assert calls.dir_sync(site.root / STUDY) < calls.dir_sync(series)
    assert _incoming(site) == []


def test_a_logged_write_into_a_removed_folder_leaves_its_folder_to_the_checkpoint(
    tmp_path: Path, calls: Calls, tmpfile: bool
) -> None:
    """With the log on, the folders made again and the new name are flushed by the next
    checkpoint, not by the write."""
    site = _site(tmp_path)
    site.put(KEY, [b"DICM", b"x"])
    site.checkpoint(lambda: None)
    shutil.rmtree(site.root / STUDY)
    calls.clear()
    assert site.put(KEY2, [b"DICM", b"y"]).created is True
    assert calls.outside(site.root / WAL_DIR) == []
    calls.clear()
    assert site.checkpoint(lambda: None) == 1
    assert calls.data_flush_of(site.root / KEY2) >= 0
    for folder in (site.root, site.root / STUDY, site.root / STUDY / SERIES):
        calls.dir_sync(folder)


@pytest.mark.parametrize("log", [True, False], ids=["logged", "direct"])
def test_a_removed_folder_on_a_site_that_refuses_unnamed_links_falls_back_to_temp_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log: bool
) -> None:
    """The first link finds the folder gone (removed behind the site's back: its descriptor
    cannot be opened), the second, once the folder is made again, is refused with EXDEV: the
    write falls back to a temp name as a refusal of the first would, instead of failing."""
    needs_o_tmpfile(tmp_path)
    site = _site(tmp_path, log=log)
    site.put(KEY, [b"DICM", b"x"])
    shutil.rmtree(site.root / STUDY)
    unnamed = _refuse_linking_unnamed_files(monkeypatch)
    assert site.put(KEY2, [b"DICM", b"y"]).created is True
    assert (site.root / KEY2).read_bytes() == b"DICMy"
    assert len(unnamed) == 1
    assert _incoming(site) == []


@pytest.mark.parametrize("size", [100, 5000], ids=["inline", "staged"])
@pytest.mark.parametrize("log", [True, False], ids=["logged", "direct"])
def test_a_folder_removed_again_at_the_link_fails_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmpfile: bool, log: bool, size: int
) -> None:
    """The write makes a removed folder again once; when the folder is gone again at the link,
    the write fails with a storage error (the caller tries another site), not in a loop. The
    removal at the moment of the link stands for another process wiping the site then (the
    objects' folders and the temp files in .incoming)."""
    site = _site(tmp_path, log=log, inline_max=1024)
    real_link = os.link

    def link(src: str, dst: str, *args: object, **kw: object) -> None:
        shutil.rmtree(site.root / STUDY, ignore_errors=True)
        for tmp in _incoming(site):
            tmp.unlink()
        real_link(src, dst, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(StorageError, match=r"write 1\.2/1\.2\.3/1\.2\.3\.1\.dcm: "):
        site.put(KEY, [b"DICM", b"x" * size])
    assert _incoming(site) == []


@pytest.mark.parametrize("log", [True, False], ids=["logged", "direct"])
def test_a_replace_into_a_removed_folder_still_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmpfile: bool, log: bool
) -> None:
    """A replace whose folder was removed under it makes the folder again and still replaces:
    here another writer stores the same key in the folder made again just before the
    replace's own link, as a concurrent process would (the removal and that write happen at
    the moment of the link)."""
    site = _site(tmp_path, log=log)
    site.put(KEY, [b"DICM", b"old"])
    real_link, real_rename = os.link, os.rename
    done: list[str] = []

    def interfere(dst: object, kw: dict[str, object]) -> None:
        if kw.get("dst_dir_fd") is None and not str(dst).startswith(str(site.root / STUDY)):
            return  # not a move into the objects' folders
        if not done:
            shutil.rmtree(site.root / STUDY)
            done.append("removed")
        elif len(done) == 1 and (site.root / STUDY / SERIES).is_dir():
            (site.root / KEY).write_bytes(b"DICM-other")
            done.append("raced")

    def link(src: str, dst: str, *args: object, **kw: object) -> None:
        interfere(dst, kw)
        real_link(src, dst, *args, **kw)  # type: ignore[arg-type]

    def rename(src: str, dst: str, *args: object, **kw: object) -> None:
        interfere(dst, kw)
        real_rename(src, dst, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    assert site.put(KEY, [b"DICM", b"new"], replace=True).created is True
    assert (site.root / KEY).read_bytes() == b"DICMnew"
    assert done == ["removed", "raced"]
    assert _incoming(site) == []


# ---------------------------------------------------------------- errors


def _a_file_where_the_series_folder_goes(site: FilesystemSite) -> None:
    (site.root / STUDY).mkdir()
    (site.root / STUDY / SERIES).write_bytes(b"not a folder")


@pytest.mark.parametrize("log", [True, False], ids=["logged", "direct"])
def test_a_failed_write_is_a_storage_error_and_leaves_no_temp_file(
    tmp_path: Path, tmpfile: bool, log: bool
) -> None:
    site = _site(tmp_path, log=log)
    _a_file_where_the_series_folder_goes(site)
    with pytest.raises(StorageError, match=r"site 'fs': write 1\.2/1\.2\.3/1\.2\.3\.1\.dcm: "):
        site.put(KEY, [b"DICM", b"x"])
    assert _incoming(site) == []


def test_restore_and_flush_objects_fail_with_a_storage_error(tmp_path: Path) -> None:
    site = _site(tmp_path)
    _a_file_where_the_series_folder_goes(site)
    with pytest.raises(StorageError, match=r"site 'fs': restore 1\.2/1\.2\.3/1\.2\.3\.1\.dcm: "):
        site.restore(KEY, b"DICM")
    with pytest.raises(StorageError, match=r"site 'fs': flush recovered objects: "):
        site.flush_objects([KEY])
    assert _incoming(site) == []


def test_no_folder_is_made_on_a_mount_point_without_the_sentinel(tmp_path: Path) -> None:
    """A site whose sentinel is gone (the volume not mounted, its mount point left) takes no
    write that would create folders there."""
    site = _site(tmp_path, log=False)
    (site.root / SENTINEL).unlink()
    with pytest.raises(
        SiteUnavailable,
        match=r"^site 'fs': \.pacsgrid-site missing in .*site \(hint: is the volume mounted\?\)$",
    ):
        site.put(KEY, [b"DICM", b"x"])
    assert not (site.root / STUDY).exists()
