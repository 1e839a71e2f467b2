"""The durable core, unit by unit and in-process: the flush helpers (storage/durable.py), the
group commit of the index (index/commit.py), the checkpoint thread (archive/checkpoint.py) and
the site log's bookkeeping (storage/wal.py).

These are the fast tests that mutation testing (scripts/mutate) runs against each mutant of
those modules: each one pins a rule the crash and power-cut tests rely on, and fails when the
rule is broken. Flushes are observed by wrapping the real system calls (they still run).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pacsgrid.archive.checkpoint import Checkpointer
from pacsgrid.errors import IndexUnavailable, SiteUnavailable
from pacsgrid.index import Index, open_index
from pacsgrid.index.base import AddResult, NewInstance
from pacsgrid.index.commit import GroupCommitter
from pacsgrid.storage import durable, object_key, wal
from pacsgrid.storage.filesystem import FilesystemSite
from pacsgrid.storage.wal import LogError, SiteLog
from pacsgrid.storage.walfile import (
    HEADER_SIZE,
    NAME_WIDTH,
    REC,
    WAL_DIR,
    DeadSegment,
    dead_segments,
    read_header,
    record_size,
    write_header,
)
from tests.test_index_contract import inst
from tests.waiting import wait_until

MB = 1 << 20


# ---------------------------------------------------------------- storage/durable.py


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync_dir and fdatasync_path that durable.py makes, as ("dir"|"file", path)."""
    calls: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_dir, real_file = durable.fsync_dir, durable.fdatasync_path

    def fsync_dir(path: Path | str) -> None:
        real_dir(path)
        with lock:
            calls.append(("dir", str(path)))

    def fdatasync_path(path: Path | str) -> bool:
        found = real_file(path)
        with lock:
            calls.append(("file", str(path)))
        return found

    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    monkeypatch.setattr(durable, "fdatasync_path", fdatasync_path)
    return calls


def test_mkdir_durable_flushes_the_parent_of_every_folder_it_makes(
    tmp_path: Path, flushed: list[tuple[str, str]]
) -> None:
    durable.mkdir_durable(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert flushed == [
        ("dir", str(tmp_path)),
        ("dir", str(tmp_path / "a")),
        ("dir", str(tmp_path / "a" / "b")),
    ]
    flushed.clear()
    durable.mkdir_durable(tmp_path / "a" / "b")  # made by someone else: flush its parent anyway
    assert flushed == [("dir", str(tmp_path / "a"))]


def test_fsync_dir_and_fdatasync_path(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    durable.fsync_dir(tmp_path)
    assert durable.fdatasync_path(f) is True
    assert durable.fdatasync_path(tmp_path / "gone") is False
    with pytest.raises(FileNotFoundError):
        durable.fsync_dir(tmp_path / "gone")
    with pytest.raises(NotADirectoryError):
        durable.fsync_dir(f)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_flush_all_flushes_each_file_and_folder_once_and_skips_what_is_gone(
    tmp_path: Path, flushed: list[tuple[str, str]], n: int
) -> None:
    files = []
    for i in range(n):
        (tmp_path / f"d{i}").mkdir()
        files.append(str(tmp_path / f"d{i}" / "f"))
        Path(files[-1]).write_bytes(b"x")
    gone_file, gone_dir = str(tmp_path / "nofile"), str(tmp_path / "nodir")
    folders = [str(Path(f).parent) for f in files]
    durable.flush_all([*files, *files, gone_file], [*folders, gone_dir, *folders])
    assert sorted(c for c in flushed if c[0] == "file") == sorted(
        ("file", f) for f in [*files, gone_file]
    )
    assert sorted(c for c in flushed if c[0] == "dir") == sorted(("dir", d) for d in folders)
    flushed.clear()
    durable.flush_all(files[:1], folders[:1])  # two at most: one after the other
    assert flushed == [("file", files[0]), ("dir", folders[0])]


def test_flush_all_with_a_single_folder(tmp_path: Path, flushed: list[tuple[str, str]]) -> None:
    durable.flush_all([], [str(tmp_path)])
    durable.flush_all([], [str(tmp_path / "gone")])
    assert flushed == [("dir", str(tmp_path))]


def test_a_checkpoint_flushes_each_logged_file_and_its_folder(
    tmp_path: Path, flushed: list[tuple[str, str]]
) -> None:
    """A logged write is not flushed before `put` returns: the checkpoint must flush its file
    and the folder holding its name (inline or staged) before the log lets its record go."""
    site = FilesystemSite("fs", tmp_path / "site", log_segment_bytes=4 * MB, inline_max=1024)
    site.initialize()
    small, large = object_key("1.2", "1.2.3", "1.2.3.1"), object_key("1.2", "1.2.4", "1.2.4.1")
    site.put(small, [b"DICM", b"s" * 100])
    site.put(large, [b"DICM", b"l" * 5000])
    flushed.clear()
    assert site.checkpoint(lambda: None) == 2
    for key in (small, large):
        path = site.root / key
        assert ("file", str(path)) in flushed
        assert ("dir", str(path.parent)) in flushed


def test_recovery_flushes_each_object_and_every_folder_up_to_the_root(
    tmp_path: Path, flushed: list[tuple[str, str]]
) -> None:
    """After a process died before its checkpoint, the files of its records may be in the page
    cache only: recovery flushes each one and every folder on the way to it, the root too."""
    site = FilesystemSite("fs", tmp_path / "site", log_segment_bytes=4 * MB)
    site.initialize()
    keys = [object_key("1.2", "1.2.3", "1.2.3.1"), object_key("1.3", "1.3.4", "1.3.4.1")]
    for key in keys:
        site.put(key, [b"DICM", b"x" * 100])
    flushed.clear()
    site.flush_objects(keys)
    root = site.root
    assert sorted(c for c in flushed if c[0] == "file") == sorted(
        ("file", str(root / k)) for k in keys
    )
    assert sorted(d for kind, d in flushed if kind == "dir") == sorted(
        str(d) for d in (root, root / "1.2", root / "1.2/1.2.3", root / "1.3", root / "1.3/1.3.4")
    )


@pytest.mark.parametrize("n_files, n_folders", [(3, 0), (3, 1), (4, 4)])
def test_flush_all_has_the_flushes_of_three_or_more_in_flight_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_files: int, n_folders: int
) -> None:
    """Three flushes or more go out together (the device merges them); two or fewer are made
    one after the other in the caller's thread, without a pool. Each wrapped flush waits until
    all the files' flushes are in progress: made one by one, the first would wait in vain."""
    real_file, real_dir = durable.fdatasync_path, durable.fsync_dir
    together = threading.Barrier(n_files, timeout=20)
    threads: set[int] = set()

    def fdatasync_path(path: Path | str) -> bool:
        threads.add(threading.get_ident())
        together.wait()
        return real_file(path)

    def fsync_dir(path: Path | str) -> None:
        threads.add(threading.get_ident())
        real_dir(path)

    monkeypatch.setattr(durable, "fdatasync_path", fdatasync_path)
    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    files = [tmp_path / f"f{i}" for i in range(n_files)]
    folders = [tmp_path / f"d{i}" for i in range(n_folders)]
    for f in files:
        f.write_bytes(b"x")
    for d in folders:
        d.mkdir()
    durable.flush_all([str(f) for f in files], [str(d) for d in folders])
    assert threading.get_ident() not in threads and len(threads) >= n_files
    threads.clear()
    together = threading.Barrier(1)
    durable.flush_all([str(files[0])], [str(tmp_path)])  # two: no pool
    assert threads == {threading.get_ident()}


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_partial_writes_are_continued_to_the_last_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    """writev and pwritev may write less than asked: the helpers go on where they stopped."""
    chunks = [b"abcde", b"", b"fgh", b"ijklmnopq", b"r"]
    real_writev, real_pwritev = os.writev, os.pwritev

    def short_writev(fd: int, bufs: Sequence[Any]) -> int:
        data = b"".join(bytes(b) for b in bufs)[:step]
        return real_writev(fd, [data])

    def short_pwritev(fd: int, bufs: Sequence[Any], offset: int) -> int:
        data = b"".join(bytes(b) for b in bufs)[:step]
        return real_pwritev(fd, [data], offset)

    monkeypatch.setattr(os, "writev", short_writev)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    fd = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT)
    try:
        durable.write_all(fd, chunks)
        durable.write_all(fd, [])
    finally:
        os.close(fd)
    assert (tmp_path / "w").read_bytes() == b"".join(chunks)
    fd = os.open(tmp_path / "p", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"0" * 30)
        durable.pwrite_all(fd, chunks, 4)
    finally:
        os.close(fd)
    assert (tmp_path / "p").read_bytes() == b"0000" + b"".join(chunks) + b"0" * 8


# ---------------------------------------------------------------- index/commit.py


class RecordingIndex:
    """A real SQLite index that records each batch (its SOP UIDs and durability), can hold a
    batch until released, and can refuse batches holding a given SOP Instance UID."""

    def __init__(self, index: Index, refuse: str = "", error: type[Exception] = ValueError):
        self.index = index
        self.refuse = refuse
        self.error = error
        self.batches: list[tuple[list[str], bool]] = []
        self.entered = threading.Event()
        self.hold = threading.Event()
        self.hold.set()

    @property
    def concurrent_batches(self) -> int:
        return self.index.concurrent_batches

    @property
    def gather_seconds(self) -> float:
        return self.index.gather_seconds

    def add_batch(self, items: Sequence[NewInstance], *, durable: bool = True) -> list[AddResult]:
        self.batches.append(([i.sop_uid for i in items], durable))
        self.entered.set()
        self.hold.wait(60)
        if any(i.sop_uid == self.refuse for i in items):
            raise self.error(f"refused {self.refuse}")
        return self.index.add_batch(items, durable=durable)


@pytest.fixture
def sqlite_index(tmp_path: Path) -> Iterator[Index]:
    ix = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield ix
    ix.close()


def test_a_lone_commit_is_its_own_batch(sqlite_index: Index) -> None:
    rec = RecordingIndex(sqlite_index)
    gc = GroupCommitter(rec, max_batch=4)  # type: ignore[arg-type]
    assert gc.commit(inst("1.1"), durable=False).outcome == "stored"
    assert gc.commit(inst("1.2")).outcome == "stored"
    assert rec.batches == [(["1.1"], False), (["1.2"], True)]
    assert (gc.batches, gc.committed) == (2, 2)
    assert sqlite_index.has_instance("1.1") and sqlite_index.has_instance("1.2")
    gc.close()


def _commit_while_held(
    gc: GroupCommitter, rec: RecordingIndex, sops: list[str], durables: list[bool]
) -> dict[str, Any]:
    """Commit `sops` from one thread each while the first batch is held in the index; return
    each one's result or error."""
    out: dict[str, Any] = {}

    def one(sop: str, dur: bool) -> None:
        try:
            out[sop] = gc.commit(inst(sop), durable=dur)
        except Exception as e:
            out[sop] = e

    rec.hold.clear()
    first = threading.Thread(target=one, args=(sops[0], durables[0]))
    first.start()
    assert rec.entered.wait(60)
    others = [
        threading.Thread(target=one, args=(s, d))
        for s, d in zip(sops[1:], durables[1:], strict=True)
    ]
    for t in others:
        t.start()
    wait_until(lambda: len(gc._queue) == len(others), 60, "the others queued behind the leader")
    rec.hold.set()
    for t in [first, *others]:
        t.join(60)
    return out


def test_writers_that_arrive_during_a_commit_share_the_next_batch(sqlite_index: Index) -> None:
    rec = RecordingIndex(sqlite_index)
    gc = GroupCommitter(rec, max_batch=3)  # type: ignore[arg-type]
    sops = ["2.0", "2.1", "2.2", "2.3", "2.4"]
    out = _commit_while_held(gc, rec, sops, [False, False, True, False, False])
    assert all(isinstance(r, AddResult) and r.outcome == "stored" for r in out.values()), out
    assert rec.batches[0] == (["2.0"], False)
    # the four queued: at most max_batch per batch, in arrival order; one durable item makes
    # its whole batch durable
    queued = [s for b, _ in rec.batches[1:] for s in b]
    assert sorted(queued) == sops[1:] and [len(b) for b, _ in rec.batches[1:]] == [3, 1]
    for batch, dur in rec.batches[1:]:
        assert dur == ("2.2" in batch)
    assert (gc.batches, gc.committed) == (3, 5)


class _SleepyCondition(threading.Condition):
    """A condition variable that leaves the thread named `sleeper` asleep in `wait` until
    `wake` is set, whatever is notified meanwhile: the waiter a busy machine does not
    schedule before another writer arrives, made certain."""

    def __init__(self, sleeper: str) -> None:
        super().__init__()
        self.sleeper = sleeper
        self.asleep = threading.Event()
        self.wake = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread().name != self.sleeper or self.wake.is_set():
            return super().wait(timeout)
        self.asleep.set()
        self.release()
        try:
            return self.wake.wait(60)
        finally:
            self.acquire()


def test_a_leader_whose_item_is_not_in_its_batch_leads_again(sqlite_index: Index) -> None:
    """A writer that finds a full batch of others waiting commits theirs first, then leads
    again until its own item is committed. B queues behind A's batch and does not wake when
    A is done; C arrives, commits B's batch (max_batch=1), then its own."""
    rec = RecordingIndex(sqlite_index)
    gc = GroupCommitter(rec, max_batch=1)  # type: ignore[arg-type]
    cond = _SleepyCondition("4.1")
    gc._cond = cond
    out: dict[str, Any] = {}

    def one(sop: str) -> None:
        try:
            out[sop] = gc.commit(inst(sop))
        except Exception as e:  # an AssertionError too: C returning with no result
            out[sop] = e

    rec.hold.clear()
    a = threading.Thread(target=one, args=("4.0",), name="4.0", daemon=True)
    b = threading.Thread(target=one, args=("4.1",), name="4.1", daemon=True)
    try:
        a.start()
        assert rec.entered.wait(60)
        b.start()
        assert cond.asleep.wait(60)  # B queued behind A's batch
        rec.hold.set()
        a.join(60)
        assert not a.is_alive() and [e.item.sop_uid for e in gc._queue] == ["4.1"]
        one("4.2")  # C, while B sleeps on
    finally:
        rec.hold.set()
        cond.wake.set()
    b.join(60)
    assert not b.is_alive()
    assert all(isinstance(r, AddResult) and r.outcome == "stored" for r in out.values()), out
    assert sorted(out) == ["4.0", "4.1", "4.2"]
    assert [batch for batch, _ in rec.batches] == [["4.0"], ["4.1"], ["4.2"]]
    assert (gc.batches, gc.committed) == (3, 3)


class _TwoAtOnce(RecordingIndex):
    """As if the index committed two batches at once (PostgreSQL, two write connections);
    SQLite commits them one after the other."""

    @property
    def concurrent_batches(self) -> int:
        return 2


def test_an_index_that_commits_two_batches_at_once_gets_two_leaders_never_three(
    sqlite_index: Index,
) -> None:
    """Two batches are committed at once and a third writer queues, also after a batch has
    ended: a leader that ends gives back exactly its own place."""
    rec = _TwoAtOnce(sqlite_index)
    gc = GroupCommitter(rec, max_batch=4)  # type: ignore[arg-type]
    assert gc.max_leaders == 2
    assert gc.commit(inst("5.0")).outcome == "stored"
    out: dict[str, Any] = {}

    def one(sop: str) -> None:
        try:
            out[sop] = gc.commit(inst(sop))
        except Exception as e:
            out[sop] = e

    def settled() -> bool:  # 5.3 waits in the queue, or leads a third batch
        with gc._cond:
            return bool(gc._queue) or len(rec.batches) == 4

    sops = ["5.1", "5.2", "5.3"]
    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in sops]
    rec.hold.clear()
    try:
        for n, t in enumerate(threads[:2], start=2):
            t.start()
            wait_until(lambda n=n: len(rec.batches) == n, 60, f"{n - 1} batches being committed")
        threads[2].start()
        wait_until(settled, 60, "the third writer queued or leading")
        assert [e.item.sop_uid for e in gc._queue] == ["5.3"] and len(rec.batches) == 3
    finally:
        rec.hold.set()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, AddResult) and r.outcome == "stored" for r in out.values()), out
    assert [batch for batch, _ in rec.batches] == [["5.0"], ["5.1"], ["5.2"], ["5.3"]]


class _Gathering(_TwoAtOnce):
    """As if each batch cost round trips (PostgreSQL): a leader gathers the stores on their
    way for up to ten minutes (a test that ends proves it did not wait for the bound)."""

    gather = 600.0

    @property
    def gather_seconds(self) -> float:
        return self.gather


def _gathering(gc: GroupCommitter) -> bool:
    with gc._cond:
        return gc._gathering


def _store(
    gc: GroupCommitter, out: dict[str, Any], sop: str, written: threading.Event | None = None
) -> None:
    """A store announced on its way, committed once its object is `written`."""
    with gc.on_the_way() as slot:
        if written is not None:
            written.wait(60)  # its object is still being written
        out[sop] = gc.commit(inst(sop), slot=slot)


def test_a_leader_gathers_the_stores_on_their_way_into_its_batch(sqlite_index: Index) -> None:
    """Two stores of one process announced together commit as one batch, although the
    index would let each lead its own: the first to reach the committer waits for the
    second. A store alone never waits."""
    rec = _Gathering(sqlite_index)
    gc = GroupCommitter(rec, max_batch=4)  # type: ignore[arg-type]
    with gc.on_the_way() as slot:
        assert gc.commit(inst("6.0"), slot=slot).outcome == "stored"
    out: dict[str, Any] = {}
    second = threading.Event()

    slow = threading.Thread(target=_store, args=(gc, out, "6.2", second), daemon=True)
    slow.start()
    wait_until(lambda: gc._coming == 1, 60, "the second store announced")
    first = threading.Thread(target=_store, args=(gc, out, "6.1"), daemon=True)
    first.start()
    wait_until(lambda: _gathering(gc), 60, "the first store's leader gathering")
    assert rec.batches == [(["6.0"], True)]  # nothing committed while it gathers
    second.set()
    for t in (first, slow):
        t.join(60)
    assert {s: r.outcome for s, r in out.items()} == {"6.1": "stored", "6.2": "stored"}
    assert [batch for batch, _ in rec.batches] == [["6.0"], ["6.1", "6.2"]]
    assert gc._coming == 0


def test_a_store_that_fails_on_its_way_ends_the_gathering(sqlite_index: Index) -> None:
    """A store that never reaches the committer (its object could not be written) stops
    counting as on its way: the leader waiting for it commits without it at once."""
    rec = _Gathering(sqlite_index)
    gc = GroupCommitter(rec, max_batch=4)  # type: ignore[arg-type]
    fail = threading.Event()
    errors: list[BaseException] = []

    def failing() -> None:
        try:
            with gc.on_the_way():
                fail.wait(60)
                raise OSError("disk full")
        except OSError as e:
            errors.append(e)

    bad = threading.Thread(target=failing, daemon=True)
    bad.start()
    wait_until(lambda: gc._coming == 1, 60, "the failing store announced")
    out: dict[str, Any] = {}

    def store() -> None:
        with gc.on_the_way() as slot:
            out["7.1"] = gc.commit(inst("7.1"), slot=slot)

    good = threading.Thread(target=store, daemon=True)
    good.start()
    wait_until(lambda: _gathering(gc), 60, "the leader gathering")
    fail.set()
    for t in (bad, good):
        t.join(60)
    assert out["7.1"].outcome == "stored" and len(errors) == 1
    assert [batch for batch, _ in rec.batches] == [["7.1"]]
    assert gc._coming == 0


class _GatheringBriefly(_Gathering):
    """A gathering short enough to run out in a test."""

    gather = 0.05


def test_a_store_that_misses_a_whole_gathering_is_not_waited_for_again(
    sqlite_index: Index,
) -> None:
    """A store still writing its object when a gathering runs out (a large object, a slow
    site) is slow: the stores after it commit at once instead of each waiting the whole
    gathering for it, for as long as it writes. It still commits when it arrives."""
    rec = _GatheringBriefly(sqlite_index)
    gc = GroupCommitter(rec, max_batch=4)  # type: ignore[arg-type]
    written = threading.Event()
    out: dict[str, Any] = {}

    def large() -> None:
        with gc.on_the_way() as slot:
            written.wait(60)  # its object is still being written
            out["8.9"] = gc.commit(inst("8.9"), slot=slot)

    slow = threading.Thread(target=large, daemon=True)
    slow.start()
    wait_until(lambda: gc._coming == 1, 60, "the large store announced")
    with gc.on_the_way() as slot:  # gathers, runs out, commits alone
        assert gc.commit(inst("8.0"), slot=slot).outcome == "stored"
    assert gc._coming == 0  # the next store has nobody to wait for
    with gc.on_the_way() as slot:
        assert gc.commit(inst("8.1"), slot=slot).outcome == "stored"
    written.set()
    slow.join(60)
    assert out["8.9"].outcome == "stored"
    assert [batch for batch, _ in rec.batches] == [["8.0"], ["8.1"], ["8.9"]]
    assert gc._coming == 0 and not gc._on_the_way


def test_a_full_batch_ends_the_gathering(sqlite_index: Index) -> None:
    """A leader stops waiting for the stores on their way once its batch is full: a store
    still writing its object commits later in a batch of its own, and leads it at once."""
    rec = _Gathering(sqlite_index)
    gc = GroupCommitter(rec, max_batch=2)  # type: ignore[arg-type]
    written = {sop: threading.Event() for sop in ("8.0", "8.1", "8.2")}
    out: dict[str, Any] = {}
    threads = [
        threading.Thread(target=_store, args=(gc, out, sop, ev), daemon=True)
        for sop, ev in written.items()
    ]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: gc._coming == 3, 60, "three stores announced")
        written["8.1"].set()
        wait_until(lambda: _gathering(gc), 60, "the first store's leader gathering")
        written["8.2"].set()
        wait_until(lambda: len(out) == 2, 60, "a full batch committed without 8.0")
        assert [batch for batch, _ in rec.batches] == [["8.1", "8.2"]]
    finally:
        written["8.0"].set()
    for t in threads:
        t.join(60)
    assert {s: r.outcome for s, r in out.items()} == dict.fromkeys(written, "stored")
    assert [batch for batch, _ in rec.batches] == [["8.1", "8.2"], ["8.0"]]
    assert gc._coming == 0


class _Timeouts(threading.Condition):
    """A condition variable that records the time-out of every wait given one."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.timeouts.append(timeout)
        return super().wait(timeout)


def test_a_leader_gathers_no_longer_than_the_index_bound(sqlite_index: Index) -> None:
    """A store on its way that does not arrive in time is not waited for: the leader
    waits for it, each wait within the index's bound (less than a second), then commits
    without it; the late store then commits on its own."""
    rec = _GatheringBriefly(sqlite_index)
    gc = GroupCommitter(rec, max_batch=4)  # type: ignore[arg-type]
    cond = _Timeouts()
    gc._cond = cond
    written = threading.Event()
    out: dict[str, Any] = {}

    slow = threading.Thread(target=_store, args=(gc, out, "9.1", written), daemon=True)
    first = threading.Thread(target=_store, args=(gc, out, "9.0"), daemon=True)
    try:
        slow.start()
        wait_until(lambda: gc._coming == 1, 60, "the slow store announced")
        first.start()
        first.join(60)
        assert not first.is_alive() and [batch for batch, _ in rec.batches] == [["9.0"]]
    finally:
        written.set()
    slow.join(60)
    assert {s: r.outcome for s, r in out.items()} == {"9.0": "stored", "9.1": "stored"}
    assert [batch for batch, _ in rec.batches] == [["9.0"], ["9.1"]]
    assert cond.timeouts and all(0 < t <= rec.gather for t in cond.timeouts), cond.timeouts


def test_only_an_index_whose_batches_cost_round_trips_gathers(
    sqlite_index: Index, pg_url: str
) -> None:
    assert sqlite_index.gather_seconds == 0
    pg = open_index(pg_url)
    try:
        assert 0 < pg.gather_seconds <= 0.01  # a few milliseconds at most
    finally:
        pg.close()


@pytest.mark.parametrize("queued", [["3.1", "3.2", "3.3"], ["3.1", "3.2"]], ids=["3", "2"])
@pytest.mark.parametrize("error", [ValueError, IndexUnavailable])
def test_a_failing_batch_is_retried_one_by_one(
    sqlite_index: Index, error: type[Exception], queued: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that fails (even one of two) is retried item by item: only the bad item fails.
    An unexpected error is logged with its traceback and the SOP Instance UID; an
    IndexUnavailable (the index is down: the caller reports it) is not."""
    rec = RecordingIndex(sqlite_index, refuse="3.2", error=error)
    gc = GroupCommitter(rec, max_batch=8)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="pacsgrid.index.commit"):
        out = _commit_while_held(gc, rec, ["3.0", *queued], [True] * (1 + len(queued)))
    assert isinstance(out["3.2"], IndexUnavailable)
    if error is IndexUnavailable:
        assert str(out["3.2"]) == "refused 3.2"  # passed on as it is
        assert caplog.records == []
    else:
        assert "index commit failed: ValueError: refused 3.2" in str(out["3.2"])
        assert [r.getMessage() for r in caplog.records] == ["index commit failed for 3.2"]
        assert caplog.records[0].exc_info is not None
    good = ["3.0"] + [s for s in queued if s != "3.2"]
    for sop in good:
        assert isinstance(out[sop], AddResult), out
        assert sqlite_index.has_instance(sop)
    assert not sqlite_index.has_instance("3.2")
    assert rec.batches[1] == (queued, True)  # then one by one
    assert [b for b, _ in rec.batches[2:]] == [[s] for s in queued]
    assert (gc.batches, gc.committed) == (len(good), len(good))


# ---------------------------------------------------------------- archive/checkpoint.py


def _logged_site(tmp_path: Path, name: str = "fs") -> FilesystemSite:
    site = FilesystemSite(name, tmp_path / name, log_segment_bytes=MB)
    site.initialize()
    return site


def _put(site: FilesystemSite, i: int, size: int = 1000) -> str:
    key = object_key("1.2", "1.2.3", f"1.2.3.{i}")
    site.put(key, [b"DICM", bytes([i % 256]) * size])
    return key


def test_a_checkpoint_flushes_the_index_then_frees_the_log(tmp_path: Path) -> None:
    sites = [_logged_site(tmp_path, "a"), _logged_site(tmp_path, "b")]
    syncs: list[int] = []
    cp = Checkpointer(sites, lambda: syncs.append(1), interval=3600)
    assert cp.run(max_age=3600) is True and cp.checkpoints == 0  # nothing written yet
    _put(sites[0], 1)
    assert cp.run(max_age=3600) is True and cp.checkpoints == 0  # too young: left alone
    assert sites[0].log_pending() and syncs == []
    assert cp.run(max_age=None) is True
    assert cp.checkpoints == 1 and syncs == [1] and not sites[0].log_pending()
    _put(sites[0], 2)
    _put(sites[1], 3)
    assert cp.run(max_age=None) is True and cp.checkpoints == 3 and syncs == [1, 1, 1]
    cp.close()


def test_a_failed_checkpoint_keeps_the_log_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = _logged_site(tmp_path)
    broken = [True]

    def sync() -> None:
        if broken[0]:
            raise OSError(5, "Input/output error")

    cp = Checkpointer([site], sync, interval=3600)
    _put(site, 1)
    with pytest.raises(SiteUnavailable, match=r"^site 'fs': checkpoint: Input/output error \("):
        site.checkpoint(sync)
    with caplog.at_level(logging.WARNING, logger="pacsgrid.archive.checkpoint"):
        assert cp.run(max_age=None) is False and cp.checkpoints == 0
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint of site fs failed (retried): site 'fs': checkpoint: Input/output error"
        " (hint: check the mount, permissions and the disk)"
    ]
    assert site.log_pending()
    broken[0] = False
    assert cp.run(max_age=None) is True and cp.checkpoints == 1
    assert not site.log_pending()
    cp.close()


def test_the_thread_checkpoints_by_age_and_a_clean_stop_checkpoints_the_rest(
    tmp_path: Path,
) -> None:
    site = _logged_site(tmp_path)
    cp = Checkpointer([site], lambda: None, interval=0.5)
    assert cp._thread is None
    _put(site, 1)
    cp.started_writing()
    assert cp._thread is not None and cp._thread.is_alive()
    # the log is freed before the checkpoint is counted: wait for both
    wait_until(lambda: cp.checkpoints >= 1 and not site.log_pending(), 60, "a checkpoint by age")
    cp.close()
    assert not cp._thread.is_alive()
    # a clean stop with records pending: they are checkpointed, the log closed
    site2 = _logged_site(tmp_path, "b")
    cp2 = Checkpointer([site2], lambda: None, interval=3600)
    cp2.warm()
    _put(site2, 2)
    cp2.close()
    assert not site2.log_pending() and cp2.checkpoints == 1
    assert site2._log is not None and site2._log._segments == []


def test_a_full_segment_wakes_the_checkpoint_at_once(tmp_path: Path) -> None:
    site = _logged_site(tmp_path)
    cp = Checkpointer([site], lambda: None, interval=3600)
    keys = [_put(site, i, 100_000) for i in range(12)]  # more than one 1 MB segment
    wait_until(lambda: cp.checkpoints >= 1, 60, "the checkpoint of the full segment")
    assert cp._thread is not None
    assert all((site.root / k).exists() for k in keys)
    cp.close()


class _Ticks(threading.Event):
    """The checkpoint thread's wake-up event, recording each wait's time-out and returning at
    once; after `stop` waits it closes the checkpointer, so `_loop` runs in the test."""

    def __init__(self, cp: Checkpointer, stop: int) -> None:
        super().__init__()
        self.cp, self.stop, self.waits = cp, stop, list[float]()

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        if len(self.waits) >= self.stop:
            self.cp._closed.set()
        return True


def test_the_checkpoint_backs_off_while_it_fails_and_checkpoints_only_old_segments(
    tmp_path: Path,
) -> None:
    site = _logged_site(tmp_path)
    for i in range(12):  # more than one 1 MB segment: one is finished, ready to checkpoint
        _put(site, i, 100_000)
    fails = [7]

    def sync() -> None:
        if fails[0]:
            fails[0] -= 1
            raise OSError(5, "Input/output error")

    cp = Checkpointer([site], sync, interval=3600)
    _put(site, 99)  # a record in the current segment, which is young
    ticks = _Ticks(cp, stop=9)
    cp._due = ticks
    cp._loop()
    # waits of half the interval, at most 5 s, doubled after each failure up to 32 times,
    # and back to 5 s after a checkpoint that succeeds
    assert ticks.waits == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 160.0, 160.0, 5.0]
    assert fails == [0] and cp.checkpoints == 1
    # the young segment is left to a later checkpoint (or the clean stop)
    assert site.log_pending()
    cp.close()
    assert not site.log_pending() and cp.checkpoints == 2
    # a short interval: waits of half of it
    site2 = _logged_site(tmp_path, "b")
    cp2 = Checkpointer([site2], lambda: None, interval=4)
    ticks2 = _Ticks(cp2, stop=1)
    cp2._due = ticks2
    cp2._loop()
    assert ticks2.waits == [2.0]
    cp2.close()


def test_the_checkpoint_thread_is_started_once_and_never_after_a_stop(tmp_path: Path) -> None:
    site = _logged_site(tmp_path)
    cp = Checkpointer([site], lambda: None, interval=3600)
    cp.warm()
    thread = cp._thread
    assert thread is not None and thread.is_alive()
    # named in thread dumps, and a daemon: a process that dies without a clean stop exits
    assert thread.name == "checkpoint" and thread.daemon
    cp.warm()
    cp.started_writing()
    assert cp._thread is thread
    cp.close()
    assert not thread.is_alive()
    cp.warm()
    assert cp._thread is thread and not thread.is_alive()
    cp2 = Checkpointer([_logged_site(tmp_path, "b")], lambda: None, interval=3600)
    cp2.close()
    cp2.warm()
    cp2.started_writing()
    assert cp2._thread is None


def test_a_log_that_cannot_be_prepared_is_logged_and_checkpointing_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = _logged_site(tmp_path)
    wal_dir = site.root / WAL_DIR
    wal_dir.rmdir()
    wal_dir.write_bytes(b"")  # a file where the log's folder should be
    cp = Checkpointer([site], lambda: None, interval=3600)
    with caplog.at_level(logging.WARNING, logger="pacsgrid.archive.checkpoint"):
        cp.warm()
    assert [r.getMessage() for r in caplog.records] == [
        "cannot prepare the log of site fs: site 'fs': prepare the log: Not a directory"
    ]
    assert cp._thread is not None and cp._thread.is_alive()
    wal_dir.unlink()
    wal_dir.mkdir()
    cp.close()


def test_only_logged_sites_are_checkpointed(tmp_path: Path) -> None:
    site = _logged_site(tmp_path)
    cp = Checkpointer([site, object()], lambda: None, interval=3600)  # type: ignore[list-item]
    assert cp.sites == [site]
    cp.close()


# ---------------------------------------------------------------- storage/wal.py


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_records_that_do_not_fit_are_refused_and_a_full_segment_rotates(tmp_path: Path) -> None:
    rotated: list[int] = []
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB, on_rotate=lambda: rotated.append(1))
    assert log.segment_bytes == MB and log.max_record == MB - HEADER_SIZE
    with pytest.raises(ValueError, match=r"^record of \d+ bytes does not fit a segment$"):
        log.append("k", [b"x" * MB], _sha(b"x" * MB), replace=False)
    body = b"y" * 300_000
    receipts = [log.append(f"k{i}", [body], _sha(body), replace=False) for i in range(4)]
    assert rotated == [1]  # the fourth did not fit the first segment
    assert receipts[3].segment is not receipts[0].segment
    assert receipts[0].segment.rotated and not receipts[3].segment.rotated
    for r in receipts:
        log.wait(r)
    assert log.ready() == []  # its writers have not released their records
    for r in receipts[:3]:
        r.release()
        r.release()  # twice changes nothing
    assert log.ready() == [receipts[0].segment]
    assert receipts[0].segment.pending == 0 and log.records == 4


def test_a_record_of_exactly_the_room_left_fits(tmp_path: Path) -> None:
    """The largest record (max_record) is taken, and a record that fills what is left of the
    segment to the last byte goes into it; one byte more starts the next segment."""
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    whole = log.max_record - record_size(b"k", b"", 0)
    assert record_size(b"k", b"", whole) == log.max_record
    big = log.append("k", [b"z" * whole], _sha(b"z" * whole), replace=False)
    assert big.segment.tail == big.segment.size
    first = log.append("k", [b"a" * 1000], _sha(b"a" * 1000), replace=False)
    assert first.segment is not big.segment
    rest = first.segment.size - first.segment.tail - record_size(b"k", b"", 0)
    fill = log.append("k", [b"b" * rest], _sha(b"b" * rest), replace=False)
    assert fill.segment is first.segment and fill.segment.tail == fill.segment.size
    after = log.append("k", [b"c"], _sha(b"c"), replace=False)
    assert after.segment is not first.segment
    for r in (big, first, fill, after):
        log.wait(r)


def _die(log: SiteLog) -> list[DeadSegment]:
    """The process dies (its segments' files close, their locks go): what recovery finds."""
    for seg in log._segments:
        os.close(seg.fd)
    return dead_segments(log.directory)


def test_records_that_fill_a_segment_to_the_last_byte_are_recovered(tmp_path: Path) -> None:
    """A record's padding is written up to the record's end and no further. Recovery trusts
    only a segment file of the size its header gives, so a byte written past the end of a
    segment by its last record would lose every record in it. Two segments here end with a
    record (padded) that fills them to the last byte: one with a key, a note and the object;
    one staged."""
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    size = log.max_record - REC.size - len(b"inline") - len(b"its note") - 3
    assert record_size(b"inline", b"its note", size) == log.max_record  # 3 bytes of padding
    body = b"i" * size
    full = log.append("inline", [body], _sha(body), replace=False, note="its note")
    assert full.segment.tail == full.segment.size
    staged_size = record_size(b"staged", b"n", 0, b"x" * NAME_WIDTH)
    assert staged_size > REC.size + len(b"staged") + len(b"n") + NAME_WIDTH  # padded
    rest = log.max_record - staged_size
    filler = b"f" * (rest - REC.size - 1 - 2)
    assert record_size(b"f", b"", len(filler)) == rest
    first = log.append("f", [filler], _sha(filler), replace=False)
    assert first.segment is not full.segment
    big = b"the staged object"
    last = log.append("staged", [], _sha(big), replace=False, note="n", staged=True)
    assert last.segment is first.segment and last.segment.tail == last.segment.size
    fd = log.stage_open(last)
    os.write(fd, big)
    os.close(fd)
    log.staged(last)
    for r in (full, first, last):
        log.wait(r)
    dead = _die(log)
    found = {}
    for d in dead:
        for r in d.records():
            obj = d.object_of(r)
            found[r.key] = (obj and _sha(obj), r.note)
        d.close()
    assert found == {
        "inline": (_sha(body), "its note"),
        "f": (_sha(filler), ""),
        "staged": (_sha(big), "n"),
    }
    assert [os.stat(s.path).st_size for s in (full.segment, last.segment)] == [MB, MB]


def test_a_note_is_kept_to_its_first_4096_bytes(tmp_path: Path) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    note = "".join(chr(ord("a") + i % 26) for i in range(5000))
    r = log.append("k", [b"x"], _sha(b"x"), replace=False, note=note)
    log.wait(r)
    assert r.segment.tail == HEADER_SIZE + record_size(b"k", note[:4096].encode(), 1)
    dead = _die(log)
    assert [rec.note for d in dead for rec in d.records()] == [note[:4096]]
    for d in dead:
        d.close()


def test_a_note_cut_inside_a_character_is_recovered_with_a_replacement(tmp_path: Path) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    note = "a" * 4095 + "\u00e9" + "b"  # the cut at 4096 bytes halves the two bytes of the e
    log.wait(log.append("k", [b"x"], _sha(b"x"), replace=False, note=note))
    dead = _die(log)
    assert [rec.note for d in dead for rec in d.records()] == ["a" * 4095 + "\ufffd"]
    for d in dead:
        d.close()


def test_records_are_padded_to_eight_bytes() -> None:
    """The record layout on disk: a log written by one version is recovered by the next."""
    assert REC.size == 84
    assert record_size(b"k", b"", 3) == 88  # no padding
    assert record_size(b"k", b"", 4) == 96
    assert record_size(b"k", b"n", 0, b"x" * NAME_WIDTH) == 168


def test_recovery_finds_dead_segments_among_free_locked_and_unfinished_ones(
    tmp_path: Path,
) -> None:
    """Recovery takes every segment with records that no live process holds, whatever lies
    before it in the folder: a segment being created when its process died (removed), a
    free one, one a live process holds, one whose file is not the size its header gives
    (left alone). Freeing a recovered segment makes it free for the next process, even when
    a staged file its records name is gone already."""
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    body = b"inline object"
    log.wait(log.append("inline", [body], _sha(body), replace=False))
    big = b"the staged object"
    staged = log.append("staged", [], _sha(big), replace=False, staged=True)
    fd = log.stage_open(staged)
    os.write(fd, big)
    os.close(fd)
    log.staged(staged)
    log.wait(staged)
    (seg,) = log._segments
    for d in _die(log):
        d.close()
    directory = tmp_path / WAL_DIR
    dead = directory / f"{'f' * 32}.seg"  # sorts after all the others
    os.rename(seg.path, dead)
    raw = dead.read_bytes()
    (directory / "0.new").write_bytes(raw[:HEADER_SIZE])
    free = directory / f"{'1' * 32}.seg"
    free.write_bytes(raw)
    with open(free, "r+b") as fh:
        write_header(fh.fileno(), 0, MB)
    held = directory / f"{'2' * 32}.seg"
    held.write_bytes(raw)
    (directory / f"{'3' * 32}.seg").write_bytes(raw + b"\0" * 8)  # longer than its header says
    holder = os.open(held, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        found = dead_segments(directory)
    finally:
        os.close(holder)
    assert not (directory / "0.new").exists()
    assert [d.path for d in found] == [dead]
    assert [r.key for r in found[0].records()] == ["inline", "staged"]
    for name in os.listdir(directory / "data"):
        os.unlink(directory / "data" / name)
    found[0].free()
    fd = os.open(dead, os.O_RDONLY)
    try:
        assert read_header(fd) == (0, MB)
    finally:
        os.close(fd)


def test_a_reused_segment_gives_back_only_its_new_records(tmp_path: Path) -> None:
    """A segment is reused as it is, not cleared: new records of other sizes are written over
    the old ones (their padding lies on old bytes), and an old record follows the last new
    one. Recovery replays exactly the new records: the old one carries the segment's
    previous nonce and ends the scan; padding is never read."""
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    body = b"\xff" * 1000
    step = record_size(b"old0", b"", len(body))
    olds = [log.append(f"old{i}", [body], _sha(body), replace=False) for i in range(4)]
    for r in olds:
        log.wait(r)
        r.release()
    seg = olds[0].segment
    log.rotate_now()
    assert log.ready() == [seg]
    log.retire(seg)  # the spare now: a new nonce, the old records still in it
    a_body, b_body = b"a" * (step - 8 - REC.size - 1 - 3), b"b" * (step + 8 - REC.size - 1 - 3)
    a = log.append("a", [a_body], _sha(a_body), replace=False)
    b = log.append("b", [b_body], _sha(b_body), replace=False)
    assert a.segment.path == seg.path and a.segment.nonce != seg.nonce
    assert b.segment.tail == HEADER_SIZE + 2 * step  # where the third old record starts
    log.wait(b)
    raw = seg.path.read_bytes()
    assert raw[HEADER_SIZE + 2 * step + REC.size :].startswith(b"old2")
    dead = _die(log)
    assert [(r.key, r.payload) for d in dead for r in d.records()] == [
        ("a", a_body),
        ("b", b_body),
    ]
    for d in dead:
        d.close()


def test_each_wait_flushes_once_with_or_without_a_group_wait(tmp_path: Path) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB, group_wait=0.01)
    for i in range(3):
        r = log.append(f"k{i}", [b"x"], _sha(b"x"), replace=False)
        log.wait(r)
        log.wait(r)  # durable already: no second flush
        assert r.segment.durable == r.segment.appended and log.flushes == i + 1


def test_a_deleted_segment_fails_its_writers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment whose file is gone (the site wiped under the server) is no durable record:
    the flush fails with the reason logged, and the writer gets EIO."""
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    r = log.append("k", [b"x"], _sha(b"x"), replace=False)
    r.segment.path.unlink()
    with (
        caplog.at_level(logging.ERROR, logger="pacsgrid.storage.wal"),
        pytest.raises(LogError) as e,
    ):
        log.wait(r)
    assert e.value.errno == errno.EIO
    assert str(e.value) == f"[Errno 5] flush of {r.segment.path.name} failed"
    assert [m.getMessage() for m in caplog.records] == [
        f"flush of log segment {r.segment.path} failed: [Errno 2] segment was deleted (site wiped?)"
    ]


def test_a_failed_flush_of_the_staging_folder_fails_the_segments_with_staged_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The names of staged files are durable only through the flush of the staging folder:
    when it fails, every writer of the group fails and no segment holding a staged record is
    trusted again."""
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    real = wal.fsync_dir

    def failing(path: Path | str) -> None:
        if Path(path) == log.stage_dir:
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    earlier = log.append("e", [], _sha(b"big"), replace=False, staged=True)
    os.close(log.stage_open(earlier))
    log.staged(earlier)
    log.wait(earlier)  # durable, in a segment that is then rotated out
    log.rotate_now()
    plain = log.append("p", [b"x"], _sha(b"x"), replace=False)
    r = log.append("k", [], _sha(b"big"), replace=False, staged=True)
    fd = log.stage_open(r)
    os.close(fd)
    log.staged(r)
    monkeypatch.setattr(wal, "fsync_dir", failing)
    with caplog.at_level(logging.ERROR, logger="pacsgrid.storage.wal"), pytest.raises(LogError):
        log.wait(r)
    assert [m.getMessage() for m in caplog.records] == [
        f"flush of {log.stage_dir} failed: [Errno 5] Input/output error"
    ]
    assert r.segment.failed and r.segment is plain.segment
    assert earlier.segment is not r.segment and earlier.segment.failed  # holds staged names
    with pytest.raises(LogError):
        log.wait(plain)  # its record shared the failed flush
    monkeypatch.setattr(wal, "fsync_dir", real)
    again = log.append("p2", [b"y"], _sha(b"y"), replace=False)
    assert again.segment is not r.segment
    log.wait(again)


def test_every_staged_record_waits_for_its_own_flush_of_the_staging_folder(
    tmp_path: Path, dirs: list[str]
) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    umask = os.umask(0o022)
    os.umask(umask)
    for i in (1, 2, 3):
        r = log.append(f"k{i}", [], _sha(b"big"), replace=False, staged=True)
        os.close(log.stage_open(r))
        assert (os.stat(log.stage_dir / r.staged).st_mode & 0o777) == 0o644 & ~umask
        log.staged(r)
        assert r.stage_gen == i
        log.wait(r)
        assert dirs.count(str(log.stage_dir)) == i


def test_a_released_record_leaves_its_file_and_folders_to_the_checkpoint(tmp_path: Path) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    r = log.append("k", [b"x"], _sha(b"x"), replace=False)
    log.wait(r)
    log.note_written(r, "/site/a/b/obj", ["/site/a/b"])
    log.release(r.segment, "/site/a/c/obj", ["/site/a/c", "/site/a"])
    assert r.segment.written == ["/site/a/b/obj", "/site/a/c/obj"]
    assert r.segment.folders == {"/site/a/b", "/site/a/c", "/site/a"}


def test_a_failed_append_fails_its_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    first = log.append("k1", [b"a"], _sha(b"a"), replace=False)
    real = os.pwritev

    def full(fd: int, bufs: Sequence[Any], offset: int) -> int:
        if fd == first.segment.fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(LogError) as e:
        log.append("k2", [b"b"], _sha(b"b"), replace=False)
    assert e.value.errno == errno.ENOSPC
    assert (
        str(e.value) == f"[Errno 28] append to {first.segment.path.name}: No space left on device"
    )
    assert first.segment.failed
    second = log.append("k3", [b"c"], _sha(b"c"), replace=False)
    assert second.segment is not first.segment  # a failed segment takes no more records
    log.wait(second)


def test_a_writer_that_waited_for_another_flush_returns_only_once_its_record_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B appends while A's flush runs (that flush does not cover B's record): B waits for it,
    then leads a flush of its own; it never returns before its record is durable."""
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    a = log.append("a", [b"a"], _sha(b"a"), replace=False)
    real = os.fdatasync
    inside, go = threading.Event(), threading.Event()

    def held(fd: int) -> None:
        if not go.is_set():
            inside.set()
            assert go.wait(60)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    leader = threading.Thread(target=log.wait, args=(a,))
    leader.start()
    assert inside.wait(60)
    b = log.append("b", [b"b"], _sha(b"b"), replace=False)
    done: list[tuple[int, int]] = []

    def wait_b() -> None:
        log.wait(b)
        done.append((b.segment.durable, b.segment.appended))

    writer = threading.Thread(target=wait_b)
    writer.start()
    wait_until(lambda: log._waiting == 2, 60, "B waiting behind A's flush")
    go.set()
    leader.join(60)
    writer.join(60)
    assert done and done[0][0] >= done[0][1] == b.segment.appended
    assert log.flushes == 2


def test_a_tiny_segment_size_is_raised_to_a_megabyte(tmp_path: Path) -> None:
    assert SiteLog(tmp_path, segment_bytes=1000).segment_bytes == MB


def test_a_failed_flush_fails_every_writer_of_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    r1 = log.append("k1", [b"a"], _sha(b"a"), replace=False)
    real = os.fdatasync

    def failing(fd: int) -> None:
        if fd == r1.segment.fd:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(LogError):
        log.wait(r1)
    assert r1.segment.failed and r1.segment.durable < r1.segment.appended
    monkeypatch.setattr(os, "fdatasync", real)
    r2 = log.append("k2", [b"b"], _sha(b"b"), replace=False)
    assert r2.segment is not r1.segment  # a failed segment takes no more records
    log.wait(r2)


@pytest.fixture
def dirs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every folder the site log flushes (the real flush still runs)."""
    flushed: list[str] = []
    real = wal.fsync_dir
    monkeypatch.setattr(wal, "fsync_dir", lambda p: (flushed.append(str(p)), real(p))[1])
    return flushed


def test_a_staged_record_waits_for_the_flush_of_the_staging_folder(
    tmp_path: Path, dirs: list[str]
) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    log.warm()
    dirs.clear()
    r = log.append("k", [], _sha(b"big"), replace=False, staged=True)
    assert r.staged.endswith(".obj") and r.segment.staged == [r.staged]
    fd = log.stage_open(r)
    os.write(fd, b"big")
    os.close(fd)
    log.staged(r)
    assert r.stage_gen == 1
    log.wait(r)
    assert dirs == [str(log.stage_dir)]
    plain = log.append("k2", [b"x"], _sha(b"x"), replace=False)
    log.wait(plain)
    assert dirs == [str(log.stage_dir)]  # nothing new was staged: no flush of the folder


def test_retired_segments_become_the_spare_then_free_and_a_clean_stop_keeps_few(
    tmp_path: Path,
) -> None:
    directory = tmp_path / WAL_DIR
    log = SiteLog(directory, segment_bytes=MB, keep_free=1)
    log.warm()
    assert log._current is not None and log._spare is not None
    first = log.append("k", [b"x"], _sha(b"x"), replace=False)
    log.wait(first)
    first.release()
    log.rotate_now()
    assert log.ready() == [first.segment]
    spare = log._spare
    log.retire(first.segment)  # there is a spare already: the segment is freed
    assert log._spare is spare and first.segment.fd == -1
    assert log.has_records() is False
    log.close()
    segs = sorted(directory.glob("*.seg"))
    assert len(segs) == 1  # keep_free: the others were removed
    fd = os.open(segs[0], os.O_RDONLY)
    try:
        assert read_header(fd)[0] == 0  # free
    finally:
        os.close(fd)


@pytest.mark.parametrize("replaced_by", ["file", "nothing"])
def test_a_clean_stop_survives_a_log_folder_gone_or_turned_into_a_file(
    tmp_path: Path, replaced_by: str
) -> None:
    """A clean stop never raises because the log folder went away under it (an operator's
    `rm -r`, a site remounted): the segments are already closed, and there is nothing left
    to trim."""
    directory = tmp_path / WAL_DIR
    log = SiteLog(directory, segment_bytes=MB, keep_free=1)
    log.warm()
    for seg in directory.glob("*.seg"):
        seg.unlink()
    directory.rmdir()
    if replaced_by == "file":
        directory.write_bytes(b"not a folder")
    log.close()
    assert log._current is None and log._spare is None


def test_rotate_if_older_ends_only_an_old_segment_with_records(tmp_path: Path) -> None:
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    log.warm()
    log.rotate_if_older(0)
    assert log._current is not None  # empty: kept
    r = log.append("k", [b"x"], _sha(b"x"), replace=False)
    log.rotate_if_older(3600)
    assert log._current is r.segment
    log.rotate_if_older(0)
    assert log._current is None and r.segment.rotated


def test_a_site_without_its_sentinel_creates_no_segment(tmp_path: Path) -> None:
    site = _logged_site(tmp_path)
    (site.root / ".pacsgrid-site").unlink()
    with pytest.raises(SiteUnavailable):
        site.put(object_key("1.2", "1.2.3", "1.2.3.1"), [b"DICM"])


def test_recovery_skips_what_it_cannot_read_or_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """I/O errors in recovery's look at the log folder are skipped, not raised: a `.new` file
    another recovery removes first, a segment whose header cannot be read (EIO), and the
    close of a dead segment whose descriptor is already gone. The local disk makes none of
    these, so the system call is made to fail as the real case would."""
    log = SiteLog(tmp_path / WAL_DIR, segment_bytes=MB)
    body = b"inline object"
    log.wait(log.append("inline", [body], _sha(body), replace=False))
    for d in _die(log):
        d.close()
    directory = tmp_path / WAL_DIR
    (seg,) = [p for p in directory.iterdir() if p.suffix == ".seg"]
    unreadable = directory / f"{'0' * 32}.seg"  # sorts before the readable one
    unreadable.write_bytes(seg.read_bytes())
    (directory / "0.new").write_bytes(b"")
    real_unlink, real_pread = os.unlink, os.pread
    unreadable_fds: set[int] = set()

    def unlink(path: object, *args: object, **kw: object) -> None:
        if str(path).endswith(".new"):
            real_unlink(path, *args, **kw)  # type: ignore[arg-type]
            raise FileNotFoundError(errno.ENOENT, "removed by another recovery", str(path))
        real_unlink(path, *args, **kw)  # type: ignore[arg-type]

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}") == str(unreadable):
            unreadable_fds.add(fd)
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "pread", pread)
    found = dead_segments(directory)
    monkeypatch.undo()
    assert unreadable_fds
    assert [d.path for d in found] == [seg]
    assert [r.key for r in found[0].records()] == ["inline"]
    assert not (directory / "0.new").exists()
    os.close(found[0].fd)
    found[0].close()  # its descriptor is gone already: nothing to raise
