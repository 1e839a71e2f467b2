"""The embedded index: one SQLite file in WAL mode.

One write connection per process, used by the group committer's thread (serialised by a lock
for the rare direct writers); read connections in a pool, one per concurrent reader, so
queries never wait for a commit. `synchronous=FULL`: a commit is on disk when it returns, and
the group committer spreads that fsync over every instance in the batch. Several processes
(DICOM workers, CLI commands) may open the same file; SQLite's lock serialises their
transactions.

Ingest commits with `synchronous=NORMAL` (`add_batch(durable=False)`): in WAL mode the commit
is then written but not flushed, and the database stays consistent if the newest commits are
lost. The objects' site logs hold everything such a commit recorded until a checkpoint has
called `sync`, and recovery replays them into the index after a crash (docs/durability.md).
Every other write is flushed at commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index.schema import SQLITE_TYPES
from pacsgrid.index.sql import SqlIndex
from pacsgrid.index.sql_matching import SQLITE
from pacsgrid.storage.durable import mkdir_durable

LOCK_WAIT = 60.0  # seconds a correction waits for the one being made


class SqliteIndex(SqlIndex):
    dialect = SQLITE
    _PAGE_SITE = "+c.site"  # index/sites.py

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._lock = threading.Lock()
        self._all_conns: list[sqlite3.Connection] = []
        self._writer_durable = True
        # Read connections, shared by all threads: each DICOM association has a thread of its
        # own, so one connection per thread would open (and keep) one per association.
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        try:
            mkdir_durable(path.parent)
            self._lockfd = os.open(f"{path}.writelock", os.O_RDWR | os.O_CREAT, 0o644)
            self._writer = self._connect()
            self._apply_migrations(SQLITE_TYPES)
        except (sqlite3.Error, OSError) as e:
            raise IndexUnavailable(f"cannot open index {path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA busy_timeout = 30000")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA cache_size = -65536")
        with self._lock:
            self._all_conns.append(conn)
        return conn

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            try:
                conn = self._connect()
            except sqlite3.Error as e:
                raise IndexUnavailable(f"cannot open index {self.path}: {e}") from e
        try:
            yield conn
        finally:
            self._readers.put(conn)

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._reader() as conn:
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise IndexUnavailable(f"index query failed: {e}") from e

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._reader() as conn:
            try:
                return conn.execute(sql, params).fetchone()
            except sqlite3.Error as e:
                raise IndexUnavailable(f"index query failed: {e}") from e

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        # Writers in other processes (DICOM workers, a running import) queue on a blocking
        # flock rather than on SQLite's busy handler, which sleeps in steps of 1 to 100 ms:
        # the kernel wakes the next writer the moment the lock is free, and while this process
        # waits its group committer gathers a bigger batch.
        with self._lock:
            db = self._writer
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)
            try:
                try:
                    if durable != self._writer_durable:
                        db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                        self._writer_durable = durable
                    db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as e:
                    raise IndexUnavailable(f"index {self.path}: {e}") from e
                try:
                    yield db
                    db.execute("COMMIT")
                except sqlite3.Error as e:
                    _rollback(db)
                    raise IndexUnavailable(f"index {self.path}: {e}") from e
                except BaseException:
                    _rollback(db)
                    raise
            finally:
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    @contextmanager
    def corrections_lock(self) -> Iterator[None]:
        # A lock file beside the index: every process of the archive (workers, the HL7
        # listener, commands) waits for it; a process that dies releases it.
        try:
            fd = os.open(f"{self.path}.corrections.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise IndexUnavailable(f"cannot lock corrections of {self.path}: {e}") from e
        try:
            deadline, pause = time.monotonic() + LOCK_WAIT, 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise IndexUnavailable(
                            f"index {self.path}: another correction is being made and did "
                            f"not finish within {LOCK_WAIT:.0f} s"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.2)
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for conn in self._all_conns:
                with suppress(sqlite3.Error):
                    conn.close()
            self._all_conns.clear()
        self._readers = queue.SimpleQueue()
        if self._lockfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lockfd)
            self._lockfd = -1


def _rollback(db: sqlite3.Connection) -> None:
    with suppress(sqlite3.Error):
        db.execute("ROLLBACK")
