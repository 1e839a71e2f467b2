"""The PostgreSQL index (psycopg 3): several nodes on one database, failover, standby reads.

Connections:
- one write connection per process, used by the group committer (serialised by a lock for the
  rare direct writers), and a small pool of read connections (`index.pool_size`) shared by
  the reading threads, so a C-FIND never waits for a commit and a node holds a bounded number
  of connections;
- with a read-only conninfo (`index.read_database`), `find` and `instances` (C-FIND, C-MOVE,
  C-GET, QIDO) go to a standby; if it cannot answer, the primary does.

Failover. The `database` setting may name several hosts (`host=a,b port=5432,5432
target_session_attrs=read-write`, or the URL form): libpq connects to whichever is the primary.
A connection that breaks (the primary died, was demoted, or a statement timed out) is dropped
and the next call connects afresh, so the archive follows a promotion by itself. Every wait is
bounded, so that while no primary is reachable a C-STORE fails promptly with a failure status
(IndexUnavailable -> A700) and never hangs:
- `connect_timeout` per host, TCP keepalives and `tcp_user_timeout` (a frozen or unplugged
  server is noticed in seconds), unless the conninfo sets them itself;
- `statement_timeout` and `lock_timeout` on the server side.
A transaction is retried on a new connection only when it broke before COMMIT was sent (so
nothing can be applied twice), or when PostgreSQL aborted it for a retryable reason (deadlock,
serialization failure, a concurrent insert of the same UID). A commit whose outcome is unknown
raises: the store is not acknowledged, and the sender's retry finds the row (a duplicate) or
adds it.

Work claims use `FOR UPDATE SKIP LOCKED`, so nodes claiming at the same moment skip each
other's rows instead of waiting for them or taking them twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg import errors as pgerr

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index.base import AddResult, NewInstance
from pacsgrid.index.pg_connections import (
    ReadPool,
    clean_params,
    connection_problem,
    deadline,
    first_line,
    redact,
    with_timeouts,
)
from pacsgrid.index.schema import POSTGRES_TYPES
from pacsgrid.index.sql import SqlIndex
from pacsgrid.index.sql_matching import POSTGRES, Query
from pacsgrid.model import InstanceRecord

log = logging.getLogger(__name__)

# Errors after which the same transaction may simply run again.
RETRYABLE = (
    pgerr.SerializationFailure,
    pgerr.DeadlockDetected,
    pgerr.UniqueViolation,  # two nodes inserted the same new study/series/instance at once
    pgerr.LockNotAvailable,
)
STANDBY_RETRY = 30.0  # seconds the primary answers reads after the standby failed
MIGRATION_LOCK = 0x7061637367726964  # "pacsgrid": one node upgrades the schema at a time
CORRECTIONS_LOCK = 0x7061637363727274  # one correction at a time (index/corrections.py)


class PostgresIndex(SqlIndex):
    dialect = POSTGRES
    CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        url: str,
        *,
        read_url: str = "",
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        pool_size: int = 8,
    ) -> None:
        self.raw_url = url
        self.url = redact(url)
        try:
            self._dsn = with_timeouts(
                url, connect_timeout=connect_timeout, statement_timeout=statement_timeout
            )
            self._read_dsn = (
                with_timeouts(
                    read_url,
                    connect_timeout=connect_timeout,
                    statement_timeout=statement_timeout,
                    app="pacsgrid-read",
                )
                if read_url
                else ""
            )
        except psycopg.ProgrammingError as e:
            raise IndexUnavailable(f"invalid PostgreSQL conninfo: {e}") from None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._writer: psycopg.Connection[Any] | None = None
        self._all_conns: set[psycopg.Connection[Any]] = set()
        self._conns_lock = threading.Lock()
        self._closed = False
        self._standby_down_until = 0.0
        self.reconnects = 0
        # A server that hangs with its kernel alive (stopped, deadlocked) keeps the TCP
        # connection up and acknowledges what we send: neither keepalives nor
        # tcp_user_timeout notice, and its statement_timeout cannot fire. Past this deadline
        # the client shuts the socket down itself (pg_connections.deadline).
        self._deadline_s = statement_timeout + 2 * connect_timeout if statement_timeout else 0.0
        self._primary = ReadPool(
            lambda: self._connect(self._dsn), self._discard, pool_size, statement_timeout
        )
        self._standby = (
            ReadPool(
                lambda: self._connect(self._read_dsn), self._discard, pool_size, statement_timeout
            )
            if self._read_dsn
            else None
        )
        # Nodes starting together must not both create the schema: a session advisory lock
        # on a connection of its own (closing it releases the lock). Migrations (an index
        # built over millions of rows) run without the statement timeouts.
        self._migrating = True
        guard = self._connect(self._dsn)
        try:
            guard.execute("SET statement_timeout = 0")
            guard.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            self._apply_migrations(POSTGRES_TYPES)
        except psycopg.Error as e:
            raise IndexUnavailable(f"cannot open index {self.url}: {first_line(e)}") from e
        finally:
            self._migrating = False
            self._discard(guard)

    # ------------------------------------------------------------------ connections
    def _connect(self, dsn: str) -> psycopg.Connection[Any]:
        if self._closed:
            raise IndexUnavailable(f"index {self.url} is closed")
        try:
            conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as e:
            raise IndexUnavailable(
                f"cannot reach a writable PostgreSQL ({self.url}): {first_line(e)}"
            ) from e
        with self._conns_lock:
            self._all_conns.add(conn)
        return conn

    def _discard(self, conn: psycopg.Connection[Any] | None) -> None:
        if conn is None:
            return
        with self._conns_lock:
            self._all_conns.discard(conn)
        with suppress(Exception):
            conn.close()

    def _writer_conn(self) -> psycopg.Connection[Any]:
        """The write connection (caller holds self._lock); reconnects when it is broken."""
        if self._writer is not None and self._writer.closed:
            self._drop_writer()
        if self._writer is None:
            self._writer = self._connect(self._dsn)
            self.reconnects += 1
        return self._writer

    def _drop_writer(self) -> None:
        self._discard(self._writer)
        self._writer = None

    def _pool(self) -> ReadPool:
        reading = getattr(self._local, "reading", False) and self._standby is not None
        if reading and time.monotonic() < self._standby_down_until:
            return self._primary  # the standby failed recently: do not wait for it again
        return self._standby if reading and self._standby is not None else self._primary

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self._read(sql, params, many=True))

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._read(sql, params, many=False)

    def _read(self, sql: str, params: Sequence[Any], *, many: bool) -> Any:
        """A read on a pooled connection: on a broken connection, once more on a fresh one
        (reads are idempotent); a failing standby falls back to the primary."""
        last: Exception | None = None
        for attempt in range(3):
            pool = self._pool()
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = pool.take()
                with deadline(conn, self._deadline_s):
                    cur = conn.execute(self._sql(sql), clean_params(params))
                    result = cur.fetchall() if many else cur.fetchone()
                pool.give(conn)
                return result
            except IndexUnavailable as e:
                last = e
            except psycopg.Error as e:
                last = e
                if not connection_problem(e):
                    pool.give(conn)
                    raise IndexUnavailable(f"index query failed: {first_line(e)}") from e
                pool.discard(conn)
            if pool is self._standby:
                if time.monotonic() >= self._standby_down_until:
                    log.warning(
                        "standby cannot answer (%s); the primary answers queries for the "
                        "next %.0fs",
                        first_line(last),
                        STANDBY_RETRY,
                    )
                self._standby_down_until = time.monotonic() + STANDBY_RETRY
                continue
            if attempt >= 1:
                break
        if isinstance(last, IndexUnavailable):
            raise last
        raise IndexUnavailable(f"index query failed: {first_line(last)}") from last

    @contextmanager
    def _reading(self) -> Iterator[None]:
        before = getattr(self._local, "reading", False)
        self._local.reading = True
        try:
            yield
        finally:
            self._local.reading = before

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[psycopg.Connection[Any]]:
        """One write transaction on the write connection (no retry: see `_run`)."""
        with self._lock:
            conn = self._writer_conn()
            migrating = self._migrating
            try:
                with deadline(conn, 0 if migrating else self._deadline_s), conn.transaction():
                    if migrating:
                        conn.execute("SET LOCAL statement_timeout = 0")
                        conn.execute("SET LOCAL lock_timeout = 0")
                    yield conn
            except psycopg.Error as e:
                if connection_problem(e):
                    self._drop_writer()
                raise IndexUnavailable(f"index {self.url}: {first_line(e)}") from e

    def _run(self, fn: Any, *args: Any) -> Any:
        """Run fn(conn, *args) in a write transaction, retrying when that is safe."""
        last: Exception | None = None
        for attempt in range(5):
            with self._lock:
                try:
                    conn = self._writer_conn()
                except IndexUnavailable as e:
                    last = e
                    if attempt == 0:
                        continue  # a fresh connection right away: the old primary may be gone
                    raise
                committing = False
                try:
                    with deadline(conn, self._deadline_s):
                        conn.execute("BEGIN")
                        result = fn(conn, *args)
                        committing = True
                        conn.execute("COMMIT")
                    return result
                except psycopg.Error as e:
                    last = e
                    broken = connection_problem(e)
                    if broken:
                        self._drop_writer()
                    else:
                        with suppress(psycopg.Error):
                            conn.execute("ROLLBACK")
                    if committing and broken:
                        # COMMIT was sent: it may or may not have been applied.
                        raise IndexUnavailable(
                            f"index {self.url}: connection lost during COMMIT "
                            f"(outcome unknown, not acknowledged): {first_line(e)}"
                        ) from e
                    if not (broken or isinstance(e, RETRYABLE)):
                        raise IndexUnavailable(f"index {self.url}: {first_line(e)}") from e
                except BaseException:
                    with suppress(Exception):
                        conn.execute("ROLLBACK")
                    raise
            time.sleep(min(0.05 * 2**attempt, 1.0))
        raise IndexUnavailable(f"index {self.url}: {first_line(last)}") from last

    def _x(self, db: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return db.execute(self._sql(sql), clean_params(params))

    # ------------------------------------------------------------------ writes with retry
    def add_batch(self, items: Sequence[NewInstance], *, durable: bool = True) -> list[AddResult]:
        # Always a durable commit: an asynchronous one could be lost in a failover to the
        # standby while this node keeps running, and no log replay would bring it back.
        def body(db: Any) -> list[AddResult]:
            return [self._add_one(db, item) for item in items]

        return list(self._run(body))

    # ------------------------------------------------------------------ reads (standby)
    def find(self, query: Query) -> Iterator[dict[str, str]]:
        with self._reading():
            rows = list(super().find(query))
        return iter(rows)

    def instances(self, query: Query, *, visible: bool = False) -> list[InstanceRecord]:
        with self._reading():
            return super().instances(query, visible=visible)

    @contextmanager
    def corrections_lock(self) -> Iterator[None]:
        # An advisory lock held by a connection of its own: every node waits for it, and a
        # node that dies releases it with its connection.
        # The wait is bounded by the statement timeout.
        conn = self._connect(self._dsn)
        try:
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (CORRECTIONS_LOCK,))
            except psycopg.Error as e:
                raise IndexUnavailable(
                    f"index {self.url}: another correction is being made and did not finish "
                    f"in time ({first_line(e)})"
                ) from e
            yield
        finally:
            self._discard(conn)

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns = list(self._all_conns)
            self._all_conns.clear()
        for conn in conns:
            with suppress(Exception):
                conn.close()
        self._writer = None
        self._primary.clear()
        if self._standby is not None:
            self._standby.clear()
        self._local = threading.local()
