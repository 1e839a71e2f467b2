"""A batch of ingest's transaction sent over libpq directly (psycopg's `pq` layer).

Why: a batch of ingest on PostgreSQL is four statements in two round trips (BEGIN with the
lookups; the writes with COMMIT, index/filing.py). Sent through psycopg's cursors and
pipeline, they cost about 0.25 ms of Python per batch before pacsgrid builds a single row;
the same statements, prepared once per connection and sent straight to libpq, cost about
0.09 ms. On two cores shared with PostgreSQL, the client's CPU is part of every store.

`Wire` speaks the little that filing needs: `execute(sql, params)` queues a statement and
returns its `Result`, whose `fetchone`/`fetchall` wait for the queue to be answered (one
round trip for everything queued). Parameters go as text (str, int, float, bool, None, and
lists of str as PostgreSQL arrays); results come back as int, float, JSON or str by column
type. An error is raised as the psycopg exception of its SQLSTATE, so that the caller's
retry and connection rules (index/postgres.py, index/pg_connections.py) apply unchanged.

The connection stays a psycopg connection: `Wire` enters libpq's pipeline mode for the
transaction and leaves it, every result read, before the connection is used otherwise.
Statements are prepared under names of their own (`pacsgrid_<n>`), one per text and
parameter types, remembered per connection in `Prepared` once PostgreSQL confirmed them, so
one that an aborted pipeline skipped is prepared again next time.
"""

from __future__ import annotations

import json
import select
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as pgerr
from psycopg import pq

PREPARED_MAX = 256  # statements prepared per connection; beyond, they are sent unprepared

# Result column types decoded (others come back as str).
_INTS = {20, 21, 23, 26}  # int8, int2, int4, oid
_FLOATS = {700, 701}  # float4, float8
_JSON = {114, 3802}  # json, jsonb
_INT_ARRAYS = {1005, 1007, 1016}  # int2[], int4[], int8[]
# Parameter types declared when a statement is prepared (0: PostgreSQL infers it).
_INT8, _FLOAT8, _BOOL = 20, 701, 16


# A prepared statement is its text and the types declared for its parameters: the same text
# called with other Python types (an int where a float was) is another statement.
Key = tuple[str, tuple[int, ...]]


class Prepared:
    """The statements prepared on one connection: (SQL text, parameter types) to name."""

    def __init__(self) -> None:
        self.names: dict[Key, bytes] = {}
        self._next = 0

    def new_name(self) -> bytes:
        self._next += 1
        return f"pacsgrid_{self._next}".encode()


class Result:
    """The answer to one queued statement, filled in when its round trip is read."""

    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self._rows: list[tuple[Any, ...]] | None = None

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self._rows is None:
            self._wire.sync()
        assert self._rows is not None
        return self._rows

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self.fetchall()
        return rows[0] if rows else None


class Wire:
    """One transaction's statements in libpq's pipeline mode on `conn` (see module doc).

    Use as a context manager around the transaction; leaving it reads whatever is still
    queued, so that the connection is idle again; if that cannot be done (the connection
    broke, or an exception interrupted a read), it closes the connection."""

    def __init__(self, conn: psycopg.Connection[Any], prepared: Prepared) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._prepared = prepared
        # What is queued, in order: per statement its Result, or for a prepare None with
        # the statement's key and name (remembered once it succeeds); then a sync.
        self._queued: list[tuple[Result | None, Key | None, bytes]] = []
        self._preparing: dict[Key, bytes] = {}  # prepares queued, not confirmed yet
        self._broken = False  # a read failed half-way: the caller drops the connection

    def __enter__(self) -> Wire:
        self._pg.enter_pipeline_mode()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._queued and exc[0] is None:
                self.sync()
            elif self._queued:
                self._read(raise_errors=False)
        finally:
            if self._broken:
                # Answers left half-read (the connection broke, or an exception came in
                # between): whatever used it next would be given them as its own.
                self._conn.close()
            elif self._pg.pipeline_status != pq.PipelineStatus.OFF:
                self._pg.exit_pipeline_mode()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        """Queue `sql` (placeholders %s, as psycopg's) with `params`. No answer is waited
        for until a result is fetched or `sync` is called."""
        text = _numbered(sql)
        values = [_encode(p) for p in params]
        types = tuple(_type_of(p) for p in params)
        key = (text, types)
        name = self._prepared.names.get(key) or self._preparing.get(key)
        if name is None and len(self._prepared.names) + len(self._preparing) < PREPARED_MAX:
            name = self._preparing[key] = self._prepared.new_name()
            self._pg.send_prepare(name, text.encode(), types)
            self._queued.append((None, key, name))
        result = Result(self)
        if name is None:
            self._pg.send_query_params(text.encode(), values, types)
        else:
            self._pg.send_query_prepared(name, values)
        self._queued.append((result, None, b""))
        return result

    def sync(self) -> None:
        """Send everything queued and read every answer (raising the first error)."""
        self._read(raise_errors=True)

    def _read(self, *, raise_errors: bool) -> None:
        queued, self._queued = self._queued, []
        self._preparing = {}
        self._broken = True
        self._pg.pipeline_sync()
        first_error: psycopg.Error | None = None
        for result, key, name in queued:
            res = self._next_result()
            if res.status == pq.ExecStatus.FATAL_ERROR:
                first_error = first_error or _error(res)
            elif res.status == pq.ExecStatus.PIPELINE_ABORTED:
                pass
            elif key is not None:
                self._prepared.names[key] = name
            elif result is not None:
                result._rows = _rows(res)
            if self._next_result(end_of_statement=True) is not None:
                raise psycopg.InterfaceError("more than one result for one statement")
        sync = self._next_result()
        if sync.status != pq.ExecStatus.PIPELINE_SYNC:
            raise psycopg.InterfaceError(f"expected the end of a pipeline, got {sync.status}")
        self._broken = False
        if first_error is not None and raise_errors:
            raise first_error

    def _next_result(self, *, end_of_statement: bool = False) -> Any:
        """The next result from the server, waiting for it (None ends a statement's)."""
        pg = self._pg
        while True:
            while pg.flush():  # a large statement may not fit in the socket at once
                _wait(pg.socket, select.POLLIN | select.POLLOUT)
            pg.consume_input()
            if not pg.is_busy():
                res = pg.get_result()
                if res is None and not end_of_statement:
                    continue  # between a statement's results and the next statement
                return res
            _wait(pg.socket, select.POLLIN)


def _wait(fd: int, events: int) -> None:
    """Until `fd` is ready. Unbounded here: the caller's deadline (pg_connections.deadline)
    shuts the socket down, which ends the wait with an error on the next read."""
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()


def _numbered(sql: str) -> str:
    """psycopg's %s placeholders as PostgreSQL's $1, $2, ... (filing's SQL has no %%)."""
    parts = sql.split("%s")
    out = [parts[0]]
    for n, part in enumerate(parts[1:], 1):
        out.append(f"${n}{part}")
    return "".join(out)


def _type_of(value: Any) -> int:
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        return _INT8
    if isinstance(value, float):
        return _FLOAT8
    return 0


# psycopg's refusal, word for word: a text parameter goes to libpq as a C string.
_NUL = "PostgreSQL text fields cannot contain NUL (0x00) bytes"


def _encode(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int | float):
        return repr(value).encode()
    if isinstance(value, str):
        if "\x00" in value:  # libpq would cut the text short there
            raise psycopg.DataError(_NUL)
        return value.encode()
    if isinstance(value, list | tuple):
        return _array(value).encode()
    raise TypeError(f"cannot send a {type(value).__name__} as a parameter")


def _array(values: Sequence[Any]) -> str:
    """A PostgreSQL array literal of text values (NULL for None)."""
    items = []
    for v in values:
        if v is None:
            items.append("NULL")
        else:
            s = str(v)
            if "\x00" in s:
                raise psycopg.DataError(_NUL)
            s = s.replace("\\", "\\\\").replace('"', '\\"')
            items.append(f'"{s}"')
    return "{" + ",".join(items) + "}"


def _rows(res: Any) -> list[tuple[Any, ...]]:
    if res.status != pq.ExecStatus.TUPLES_OK:
        return []
    decoders = [_decoder(res.ftype(c)) for c in range(res.nfields)]
    return [
        tuple(
            None if (raw := res.get_value(r, c)) is None else decoders[c](raw)
            for c in range(res.nfields)
        )
        for r in range(res.ntuples)
    ]


def _decoder(oid: int) -> Any:
    if oid in _INTS:
        return int
    if oid in _FLOATS:
        return float
    if oid in _JSON:
        return json.loads
    if oid in _INT_ARRAYS:
        return _int_array
    return _text


def _text(raw: bytes) -> str:
    return raw.decode()


def _int_array(raw: bytes) -> list[int]:
    inner = raw.decode().strip("{}")
    return [int(x) for x in inner.split(",")] if inner else []


def _error(res: Any) -> psycopg.Error:
    """The psycopg exception of a failed statement: psycopg's own mapping, so that a
    SQLSTATE it does not list takes the class of its SQLSTATE class (08xxx: a connection
    problem), as it would through a cursor."""
    return pgerr.error_from_result(res, encoding="utf-8")
