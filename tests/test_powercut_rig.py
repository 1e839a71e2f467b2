"""The power-cut rig's own model, pinned on small programs run on the recording filesystem:
what an fsync of a file and of its folder make durable, what a cut may do with the rest
(drop it, keep it, tear it in 4 KiB blocks, keep a size without its data), renames, hard links,
and SQLite in WAL mode on the rig."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.powercut.history import History, position
from tests.powercut.model import BLOCK, Model, Policy
from tests.powercut.mount import Mount, fuse_available

DROP = Policy(0.0, "drop")  # only what was made durable
KEEP = Policy(1.0, "keep")  # everything (what a process crash leaves)


class Rig:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.history = root / "history.log"
        self.mnt = root / "mnt"
        self.mount = Mount(root / "backing", self.mnt, self.history)
        self._cuts = 0

    def mark(self) -> int:
        return position(self.history)

    def state(self, mark: int, policy: Policy | None = None, seed: int = 1) -> dict[str, bytes]:
        """The files (path -> bytes; folders as b'/') a cut at `mark` leaves."""
        return tree(self.folder(mark, policy, seed))

    def folder(self, mark: int, policy: Policy | None = None, seed: int = 1) -> Path:
        """A plain folder holding what a cut at `mark` leaves."""
        history = History.load(self.history)
        self._cuts += 1
        out = self.root / f"cut-{self._cuts}"
        Model(history).cut(history.index_at(mark), seed, policy).materialize(out)
        return out


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): b"/" if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    missing = fuse_available()
    if missing:
        pytest.fail(missing)
    r = Rig(tmp_path)
    with r.mount:
        yield r


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        if sync:
            os.fdatasync(fh.fileno())


def test_a_synced_write_survives_and_an_unsynced_one_may_not(rig: Rig) -> None:
    f = rig.mnt / "f"
    write_file(f, b"A" * 100, sync=True)
    fsync_dir(rig.mnt)
    synced = rig.mark()
    with open(f, "ab") as fh:
        fh.write(b"B" * 50)
    later = rig.mark()
    assert rig.state(synced, DROP)["f"] == b"A" * 100
    assert rig.state(later, DROP)["f"] == b"A" * 100
    assert rig.state(later, KEEP)["f"] == b"A" * 100 + b"B" * 50
    assert rig.state(later, Policy(0.0, "zeros"))["f"] == b"A" * 100 + bytes(50)
    for seed in range(20):  # whatever the adversary does, the synced bytes stay
        assert rig.state(later, seed=seed)["f"][:100] == b"A" * 100


def test_a_name_needs_an_fsync_of_its_folder(rig: Rig) -> None:
    write_file(rig.mnt / "f", b"data", sync=True)  # the file's data is durable, its name not
    before = rig.mark()
    fsync_dir(rig.mnt)
    after = rig.mark()
    assert "f" not in rig.state(before, DROP)
    assert rig.state(before, KEEP)["f"] == b"data"
    for seed in range(10):
        assert rig.state(after, seed=seed)["f"] == b"data"


def test_a_new_folder_needs_its_parent_fsynced(rig: Rig) -> None:
    d = rig.mnt / "d"
    d.mkdir()
    write_file(d / "f", b"x", sync=True)
    fsync_dir(d)  # f is durable in d, but d itself is not in the root yet
    lost = rig.mark()
    fsync_dir(rig.mnt)
    kept = rig.mark()
    assert rig.state(lost, DROP) == {}
    assert rig.state(kept, DROP) == {"d": b"/", "d/f": b"x"}


def test_a_rename_is_atomic_and_durable_with_its_destination_folder(rig: Rig) -> None:
    (rig.mnt / "d").mkdir()
    write_file(rig.mnt / "a", b"content", sync=True)
    fsync_dir(rig.mnt)
    os.rename(rig.mnt / "a", rig.mnt / "d" / "b")
    pending = rig.mark()
    fsync_dir(rig.mnt / "d")
    durable = rig.mark()
    assert "a" in rig.state(pending, DROP) and "d/b" not in rig.state(pending, DROP)
    seen = set()
    for seed in range(30):
        state = rig.state(pending, Policy(0.5, "drop"), seed)
        names = {n for n in ("a", "d/b") if n in state}
        assert len(names) == 1, state  # old or new name, never both, never neither
        seen |= names
    assert seen == {"a", "d/b"}
    for seed in range(10):
        state = rig.state(durable, seed=seed)
        assert state.get("d/b") == b"content" and "a" not in state


def test_a_torn_append_keeps_some_blocks_and_zeros_or_old_data_in_others(rig: Rig) -> None:
    f = rig.mnt / "f"
    write_file(f, b"0" * BLOCK, sync=True)
    fsync_dir(rig.mnt)
    with open(f, "ab") as fh:
        fh.write(b"1" * BLOCK + b"2" * BLOCK + b"3" * BLOCK)  # one write of three blocks
    torn = rig.mark()
    blocks_seen: set[tuple[bool, ...]] = set()
    for seed in range(40):
        data = rig.state(torn, Policy(0.0, "torn"), seed)["f"]
        assert data[:BLOCK] == b"0" * BLOCK
        assert len(data) in (BLOCK, 4 * BLOCK)
        got = []
        for i, new in enumerate((b"1", b"2", b"3"), 1):
            block = data[i * BLOCK : (i + 1) * BLOCK]
            assert block in (new * BLOCK, bytes(BLOCK), b""), (seed, i)
            got.append(block == new * BLOCK)
        blocks_seen.add(tuple(got))
    assert any(0 < sum(g) < 3 for g in blocks_seen), blocks_seen  # partly applied
    assert (True, False, True) in blocks_seen or (False, True, False) in blocks_seen  # reordered
    zeros = rig.state(torn, Policy(0.0, "zeros"))["f"]
    assert zeros == b"0" * BLOCK + bytes(3 * BLOCK)  # the size survived without its data


def test_an_overwrite_tears_per_block_never_inside_one(rig: Rig) -> None:
    f = rig.mnt / "f"
    write_file(f, b"a" * 2 * BLOCK, sync=True)
    fsync_dir(rig.mnt)
    fd = os.open(f, os.O_WRONLY)
    os.pwrite(fd, b"b" * 2 * BLOCK, 0)
    os.pwrite(fd, b"c" * 100, 10)
    os.close(fd)
    mark = rig.mark()
    allowed0 = {b"a" * BLOCK, b"b" * BLOCK, b"b" * 10 + b"c" * 100 + b"b" * (BLOCK - 110)}
    for seed in range(30):
        data = rig.state(mark, Policy(0.0, "torn"), seed)["f"]
        assert data[:BLOCK] in allowed0
        assert data[BLOCK:] in (b"a" * BLOCK, b"b" * BLOCK)


def test_a_hard_link_and_its_temp_name_are_separate_names_of_one_file(rig: Rig) -> None:
    """The archive's named-temp-file write: temp file, fdatasync, link, unlink the temp name,
    fsync of the destination folder (not of the temp folder)."""
    (rig.mnt / ".incoming").mkdir()
    (rig.mnt / "d").mkdir()
    fsync_dir(rig.mnt)
    tmp, final = rig.mnt / ".incoming" / "t", rig.mnt / "d" / "x"
    write_file(tmp, b"object", sync=True)
    os.link(tmp, final)
    os.unlink(tmp)
    fsync_dir(rig.mnt / "d")
    mark = rig.mark()
    both = False
    for seed in range(30):
        folder = rig.folder(mark, Policy(0.5, "mixed"), seed)
        assert (folder / "d" / "x").read_bytes() == b"object"
        if (folder / ".incoming" / "t").exists():  # create kept, unlink lost: one inode
            assert os.stat(folder / ".incoming" / "t").st_ino == os.stat(folder / "d/x").st_ino
            both = True
    assert both


def test_o_sync_writes_are_durable_without_fsync(rig: Rig) -> None:
    write_file(rig.mnt / "f", b"", sync=True)
    fsync_dir(rig.mnt)
    fd = os.open(rig.mnt / "f", os.O_WRONLY | os.O_DSYNC)
    os.write(fd, b"sync")
    os.close(fd)
    assert rig.state(rig.mark(), DROP)["f"] == b"sync"


def test_o_tmpfile_is_not_offered_so_programs_fall_back_to_named_temp_files(rig: Rig) -> None:
    with pytest.raises(OSError) as e:
        os.open(rig.mnt, os.O_TMPFILE | os.O_WRONLY, 0o644)
    assert e.value.errno == errno.EOPNOTSUPP


def test_a_cut_is_reproducible_from_its_seed_and_index(rig: Rig) -> None:
    for i in range(8):
        write_file(rig.mnt / f"f{i}", os.urandom(3 * BLOCK), sync=i % 2 == 0)
    mark = rig.mark()
    assert rig.state(mark, seed=7) == rig.state(mark, seed=7)
    assert len({tuple(rig.state(mark, seed=s).items()) for s in range(6)}) > 1


def test_keeping_everything_at_the_end_is_the_backing_folder(rig: Rig) -> None:
    (rig.mnt / "d").mkdir()
    write_file(rig.mnt / "d" / "a", b"1" * 9000, sync=False)
    os.rename(rig.mnt / "d" / "a", rig.mnt / "b")
    os.link(rig.mnt / "b", rig.mnt / "d" / "c")
    with open(rig.mnt / "d" / "c", "r+b") as fh:
        fh.truncate(5000)
        fh.seek(7000)
        fh.write(b"tail")
    (rig.mnt / "e").mkdir()
    os.rmdir(rig.mnt / "e")
    assert rig.state(rig.mark(), KEEP) == tree(rig.root / "backing")


SQLITE_WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS t (who TEXT, n INTEGER, pad BLOB)")
for n in range(int(sys.argv[3])):
    db.execute("INSERT INTO t VALUES (?, ?, randomblob(3000))", (sys.argv[2], n))
    print(n, flush=True)
"""


def test_sqlite_in_wal_mode_keeps_every_commit_through_every_cut(rig: Rig) -> None:
    """Two processes commit to one database (fcntl locks and the -shm mmap on the rig); a
    commit that returned survives every cut after it, and the database is always intact."""
    db = rig.mnt / "db.sqlite"
    setup = sqlite3.connect(db, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("PRAGMA wal_autocheckpoint=50")  # checkpoints inside the recorded history
    setup.execute("CREATE TABLE t (who TEXT, n INTEGER, pad BLOB)")
    setup.close()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", SQLITE_WRITER, str(db), who, "60"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for who in ("p", "q")
    ]
    commits: list[tuple[int, str, int]] = []  # (mark when seen, writer, row number)

    def follow(w: subprocess.Popen[str], who: str) -> None:
        assert w.stdout is not None
        for line in w.stdout:
            commits.append((rig.mark(), who, int(line)))

    pairs = zip(writers, ("p", "q"), strict=True)
    readers = [threading.Thread(target=follow, args=pair) for pair in pairs]
    for t in readers:
        t.start()
    for w, t in zip(writers, readers, strict=True):
        assert w.wait(120) == 0
        t.join()
        assert w.stdout is not None
        w.stdout.close()
    history = History.load(rig.history)
    model = Model(history)
    checkpointed = any(op.kind == "write" and op.path == "/db.sqlite" for op in history.ops)
    assert checkpointed
    checked = 0
    for i, k in enumerate(range(0, len(history) + 1, max(1, len(history) // 60))):
        folder = rig.root / f"sqlite-cut-{k}"
        model.cut(k, seed=i).materialize(folder)
        conn = sqlite3.connect(folder / "db.sqlite")
        must = {(who, n) for mark, who, n in commits if history.index_at(mark) <= k}
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            rows = set(conn.execute("SELECT who, n FROM t")) if "t" in tables else set()
        finally:
            conn.close()
        assert must <= rows, (k, sorted(must - rows)[:5])
        checked += bool(must)
    assert checked > 20
