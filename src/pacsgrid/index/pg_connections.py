"""PostgreSQL connections that never wait forever: timeouts added to a conninfo, a bounded
pool of read connections, a client-side deadline, and the classification of errors into
"this connection is broken" and "this statement failed".

Used by pacsgrid.index.postgres; kept apart so that the index module is about the index.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg import errors as pgerr
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from pacsgrid.errors import IndexUnavailable

log = logging.getLogger("pacsgrid.index.postgres")


def with_timeouts(
    url: str, *, connect_timeout: float, statement_timeout: float, app: str = "pacsgrid"
) -> str:
    """`url` (conninfo or URL) plus bounded waits, unless it sets them itself."""
    given = conninfo_to_dict(url)
    extra: dict[str, Any] = {}
    defaults = {
        "connect_timeout": max(1, round(connect_timeout)),
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": int(max(connect_timeout, 1) * 2000),
        "application_name": app,
    }
    for k, v in defaults.items():
        if k not in given:
            extra[k] = v
    options = str(given.get("options", "") or "")
    if "statement_timeout" not in options and statement_timeout > 0:
        ms = int(statement_timeout * 1000)
        extra["options"] = (
            f"{options} -c statement_timeout={ms} -c lock_timeout={ms} "
            f"-c idle_in_transaction_session_timeout={max(ms * 2, 60000)}"
        ).strip()
    return make_conninfo(url, **extra)


def redact(url: str) -> str:
    """The conninfo without its password, for logs and error messages."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable conninfo>"
    if "password" in d:
        d["password"] = "***"
    hosts = d.get("host", "")
    ports = d.get("port", "")
    return f"postgresql {hosts}:{ports}/{d.get('dbname', '')}".replace("::", ":")


class ReadPool:
    """At most `size` read connections shared by every thread of the process (the DICOM
    thread pool has 32 threads; a connection each, times workers and nodes, would exhaust
    PostgreSQL's max_connections). A thread waits for a free connection for at most
    `wait` seconds, then the read fails (IndexUnavailable), as a slow statement would."""

    def __init__(self, connect: Any, drop: Any, size: int, wait: float) -> None:
        self._connect = connect
        self._drop = drop
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max(1, size))
        self._wait = wait if wait > 0 else None

    def take(self) -> psycopg.Connection[Any]:
        if not self._slots.acquire(timeout=self._wait if self._wait is not None else -1):
            raise IndexUnavailable("every index read connection is busy (index.pool_size)")
        try:
            while True:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    return self._connect()  # type: ignore[no-any-return]
                if not conn.closed:
                    return conn
                self._drop(conn)
        except BaseException:
            self._slots.release()
            raise

    def give(self, conn: psycopg.Connection[Any] | None) -> None:
        if conn is None:
            return
        if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
            self._drop(conn)
        else:
            self._idle.put(conn)
        self._slots.release()

    def discard(self, conn: psycopg.Connection[Any] | None) -> None:
        if conn is None:
            return
        self._drop(conn)
        self._slots.release()

    def clear(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            self._drop(conn)


class _Watchdog:
    """One thread for every deadline of the process (a timer thread per statement would
    cost more than the statement). The thread is woken only when a new deadline falls
    before the moment it sleeps until: deadlines of one length arrive in the order they
    fall due, so most statements arm and disarm without waking it (a wake per statement
    cost a context switch and a turn of the GIL each)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, int, float]] = {}  # token -> (due, fd, seconds)
        self._next = 0
        self._thread: threading.Thread | None = None
        self._sleeps_until = 0.0  # when the thread wakes by itself (0: it is awake)

    def arm(self, fd: int, seconds: float) -> int:
        with self._cond:
            self._next += 1
            due = time.monotonic() + seconds
            self._armed[self._next] = (due, fd, seconds)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pg-deadline", daemon=True)
                self._thread.start()
            if self._sleeps_until > 0 and due < self._sleeps_until:
                self._cond.notify()
            return self._next

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [t for t, (when, _, _) in self._armed.items() if when <= now]
                # The socket is taken (dup) while the lock is held: its owner cannot have
                # disarmed and closed it yet, so the descriptor is still that socket and not
                # one a later open reused the number of.
                fired = [self._take(*self._armed.pop(t)[1:]) for t in due]
                if not fired:
                    soonest = min((w for w, _, _ in self._armed.values()), default=now + 60)
                    self._sleeps_until = max(now + 0.01, soonest)
                    self._cond.wait(self._sleeps_until - now)
                    self._sleeps_until = 0.0
                    continue
            for seconds, sock in fired:
                log.error("index statement exceeded %.0fs: dropping the connection", seconds)
                if sock is None:
                    continue
                try:
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                finally:
                    sock.close()

    @staticmethod
    def _take(fd: int, seconds: float) -> tuple[float, socket.socket | None]:
        """(seconds, a socket object of its own on `fd`'s socket, or None if it is gone)."""
        try:
            own = os.dup(fd)
        except OSError:
            return seconds, None
        try:
            return seconds, socket.socket(fileno=own)
        except OSError:
            os.close(own)
            return seconds, None


_WATCHDOG = _Watchdog()


@contextmanager
def deadline(conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
    """Break `conn` (shut its socket down) if the block runs longer than `seconds`: the
    waiting call then fails with a connection error instead of waiting forever."""
    if seconds <= 0:
        yield
        return
    token = _WATCHDOG.arm(conn.fileno(), seconds)
    try:
        yield
    finally:
        _WATCHDOG.disarm(token)


def clean_params(params: Sequence[Any]) -> Sequence[Any]:
    """PostgreSQL text cannot hold NUL: the patient key separator and the odd NUL a modality
    leaves in a value become U+241E (the same mapping on every write and lookup)."""
    if not any(isinstance(p, str) and "\x00" in p for p in params):
        return params
    return [clean_text(p) if isinstance(p, str) else p for p in params]


def clean_text(value: str) -> str:
    """One text value as PostgreSQL stores it (see clean_params)."""
    return value.replace("\x00", "\u241e")


def connection_problem(e: BaseException) -> bool:
    """True when the connection itself is unusable (server gone, read-only after a demotion,
    admin shutdown), as opposed to an error in one statement.

    A deadlock, a serialization failure or a lock not available are OperationalErrors to
    psycopg but not connection problems: the server aborted the transaction (nothing of it
    was committed) and the connection is fine, so the transaction can simply run again."""
    if isinstance(e, pgerr.DeadlockDetected | pgerr.SerializationFailure | pgerr.LockNotAvailable):
        return False
    if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return isinstance(
        e,
        pgerr.ReadOnlySqlTransaction
        | pgerr.AdminShutdown
        | pgerr.CrashShutdown
        | pgerr.CannotConnectNow
        | pgerr.IdleInTransactionSessionTimeout,
    )


def first_line(e: BaseException | None) -> str:
    text = str(e) if e is not None else "unknown error"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__
