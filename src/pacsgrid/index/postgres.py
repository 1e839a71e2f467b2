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

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

import psycopg
from psycopg import errors as pgerr

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index.base import AddResult, NewInstance
from pacsgrid.index.changes import Change, Delete, Insert, Update, combined
from pacsgrid.index.filing import Lookups
from pacsgrid.index.pg_connections import (
    ReadPool,
    clean_params,
    clean_text,
    connection_problem,
    deadline,
    first_line,
    redact,
    with_timeouts,
)
from pacsgrid.index.pg_wire import Prepared, Wire
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
# Write connections per process: batches of ingest commit on whichever is free (the group
# committer runs that many at once), every other write on the first.
WRITE_CONNECTIONS = 2
# How long a batch of ingest may wait for the stores of its process that are writing their
# objects (index/commit.py): a batch costs about 1 ms of CPU between pacsgrid and
# PostgreSQL whatever it holds. Measured on 2 cores, 64x64 over 4 associations: 742
# instances/s without, 885 at 4 ms (8 ms: inconclusive, 741 beside a slow SQLite run).
GATHER_SECONDS = 0.004


class _Writer:
    """A write connection (None until first used, or after it broke) and its lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: psycopg.Connection[Any] | None = None
        self.prepared = Prepared()  # the batches' statements prepared on `conn`


class PostgresIndex(SqlIndex):
    dialect = POSTGRES
    CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"
    concurrent_batches = WRITE_CONNECTIONS  # batches of ingest commit on any free one
    gather_seconds = GATHER_SECONDS

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
        self._writers = [_Writer() for _ in range(WRITE_CONNECTIONS)]
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

    @contextmanager
    def _writer(self, any_free: bool) -> Iterator[_Writer]:
        """A write connection for one transaction: the first one, or (`any_free`, batches
        of ingest) whichever is free, so that concurrent batches share PostgreSQL's WAL
        flushes instead of queueing for one connection."""
        if any_free:
            for w in self._writers:
                if w.lock.acquire(blocking=False):
                    try:
                        yield w
                    finally:
                        w.lock.release()
                    return
        w = self._writers[0]
        with w.lock:
            yield w

    def _writer_conn(self, w: _Writer) -> psycopg.Connection[Any]:
        """The connection of `w` (its lock is held); reconnects when it is broken."""
        if w.conn is not None and w.conn.closed:
            self._drop_writer(w)
        if w.conn is None:
            conn = self._connect(self._dsn)
            try:
                # Filing's statements are prepared (psycopg does so after 5 runs) and every
                # lookup in them is by a unique key: plan them once. Left to itself,
                # PostgreSQL plans the lookup again for every batch (array parameters), at a
                # cost several times that of running it.
                conn.execute("SET plan_cache_mode = force_generic_plan")
                # Every write finds its rows by a key, but a table PostgreSQL has not
                # analyzed yet (a new index; a reindex into an empty database: autovacuum
                # analyzes a minute later at the earliest) looks tiny to the planner, which
                # then scans it whole for each batch, and the cached plan keeps doing so as
                # the table grows: a reindex of 10,000 objects spent half of the server's
                # time there. Schema migrations, which may rewrite whole tables, scan.
                conn.execute("SET enable_seqscan = off")
            except psycopg.Error as e:
                self._discard(conn)
                raise IndexUnavailable(f"index {self.url}: {first_line(e)}") from e
            w.conn, w.prepared = conn, Prepared()
            self.reconnects += 1
        return w.conn

    def _drop_writer(self, w: _Writer) -> None:
        self._discard(w.conn)
        w.conn = None

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
        (reads are idempotent); a failing standby falls back to the primary.

        A broken standby connection is first replaced by a fresh one before the primary is
        asked: with a multi-host `index.read_database`, the pooled connections may be on a
        server that has just died while another one of its hosts is up (after a failover,
        the old standby is the primary and vice versa). Only when a fresh connection fails
        too is the standby left alone for STANDBY_RETRY seconds."""
        last: Exception | None = None
        fresh_standby = False
        for attempt in range(4):
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
                if not fresh_standby and isinstance(last, psycopg.Error):
                    fresh_standby = True
                    pool.clear()  # its idle connections are likely on the same dead server
                    continue
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
        with self._writer(any_free=False) as w:
            conn = self._writer_conn(w)
            migrating = self._migrating
            try:
                with deadline(conn, 0 if migrating else self._deadline_s), conn.transaction():
                    if migrating:
                        conn.execute("SET LOCAL statement_timeout = 0")
                        conn.execute("SET LOCAL lock_timeout = 0")
                        conn.execute("SET LOCAL enable_seqscan = on")
                    yield conn
            except psycopg.Error as e:
                if connection_problem(e):
                    self._drop_writer(w)
                raise IndexUnavailable(f"index {self.url}: {first_line(e)}") from e

    def _run(self, fn: Any, *args: Any, pipeline: bool = False) -> Any:
        """Run fn(conn, *args) in a write transaction, retrying when that is safe.

        `pipeline`: in libpq's pipeline mode (index/pg_wire.py), BEGIN goes out with fn's
        first statements and COMMIT with its last ones, so the transaction costs only the
        round trips fn waits for (fn reads results at most where it needs them). The COMMIT
        is then sent with the writes: a connection lost while they are under way leaves the
        outcome unknown, and that is reported, never retried."""
        last: Exception | None = None
        for attempt in range(5):
            with self._writer(any_free=pipeline) as w:
                try:
                    conn = self._writer_conn(w)
                except IndexUnavailable as e:
                    last = e
                    if attempt == 0:
                        continue  # a fresh connection right away: the old primary may be gone
                    raise
                committing = False
                try:
                    with deadline(conn, self._deadline_s), self._session(conn, w, pipeline) as db:
                        db.execute("BEGIN")
                        result = fn(db, *args)
                        committing = True
                        db.execute("COMMIT")
                    return result
                except psycopg.Error as e:
                    last = e
                    broken = connection_problem(e)
                    if broken:
                        self._drop_writer(w)
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

    @staticmethod
    def _session(
        conn: psycopg.Connection[Any], w: _Writer, pipeline: bool
    ) -> AbstractContextManager[Any]:
        """What a transaction's statements go through: a `Wire` in pipeline mode, or the
        connection itself."""
        return Wire(conn, w.prepared) if pipeline else nullcontext(conn)

    # ------------------------------------------------------------------ writes with retry
    def add_batch(self, items: Sequence[NewInstance], *, durable: bool = True) -> list[AddResult]:
        # Always a durable commit: an asynchronous one could be lost in a failover to the
        # standby while this node keeps running, and no log replay would bring it back.
        # Two round trips per batch (index/filing.py): BEGIN with the lookups, then the
        # writes with COMMIT.
        return list(self._run(self._file, items, pipeline=True))

    # ------------------------------------------------------------------ filing hooks
    # Two nodes filing into one study take turns instead of overwriting its
    # ModalitiesInStudy (rows locked in primary key order: no deadlock between batches).
    STUDY_LOCK = " FOR UPDATE OF st"

    def _text_key(self, value: str) -> str:
        return clean_text(value)

    def _where_in(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        # One array parameter: the statement's text is the same for every batch size, so
        # psycopg prepares it once.
        return f"{column} = ANY(?)", [list(values)]

    def _look_up(self, db: Any, lookups: Lookups) -> tuple[list[list[Any]], dict[str, list[int]]]:
        """Step 1 as one statement: each lookup's rows as a JSON array of objects, and the
        fresh keys drawn from the tables' sequences (BIGSERIAL names them <table>_pk_seq;
        a key drawn and not used is a gap)."""
        parts: list[str] = []
        params: list[Any] = []
        for sql, p in lookups.queries(self.STUDY_LOCK, self._where_in):
            parts.append(f"(SELECT coalesce(json_agg(t), '[]') FROM ({sql}) t)")
            params += p
        need = lookups.new_rows_at_most()
        n = len(parts)
        for table, k in need.items():
            parts.append(f"ARRAY(SELECT nextval('{table}_pk_seq') FROM generate_series(1, ?))")
            params.append(k)
        row = db.execute(self._sql("SELECT " + ", ".join(parts)), clean_params(params)).fetchone()
        found = [[list(obj.values()) for obj in rows] for rows in row[:n]]
        return found, {table: list(pks) for table, pks in zip(need, row[n:], strict=True)}

    def _write(self, db: Any, changes: Sequence[Change]) -> None:
        """Step 2 as one statement (index/changes.py), after the deletes of replaced
        instances (one statement may not delete a SOP Instance UID and insert it again)."""
        rest: list[Insert | Update] = []
        for c in changes:
            if isinstance(c, Delete):
                sql = self._sql(c.statement())
                for row in c.rows:
                    db.execute(sql, row)
            else:
                rest.append(c)
        if rest:
            sql, params = combined([_clean(c) for c in rest])
            db.execute(self._sql(sql), params)

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
        for w in self._writers:
            w.conn = None
        self._primary.clear()
        if self._standby is not None:
            self._standby.clear()
        self._local = threading.local()


def _clean(change: Insert | Update) -> Insert | Update:
    """`change` with its text as PostgreSQL stores it (clean_params)."""
    rows = [clean_params(r) for r in change.rows]
    return dataclasses.replace(change, rows=rows)
