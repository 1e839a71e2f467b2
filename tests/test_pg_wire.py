"""Statements sent over libpq directly (pacsgrid.index.pg_wire) against a real PostgreSQL:
what goes in comes back, errors arrive as psycopg's exceptions and leave the connection
usable, a statement an aborted pipeline skipped is prepared again, and a connection cut
while a pipeline waits raises a connection error instead of hanging."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerr

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index import pg_wire
from pacsgrid.index.pg_connections import connection_problem
from pacsgrid.index.pg_wire import Prepared, Wire
from pacsgrid.index.postgres import PostgresIndex
from tests.test_index_contract import inst


@pytest.fixture
def conn(pg_url: str) -> Any:
    c = psycopg.connect(pg_url, autocommit=True)
    c.execute("CREATE TABLE t (pk BIGINT PRIMARY KEY, name TEXT NOT NULL)")
    yield c
    c.close()


def test_values_go_out_and_come_back_by_type(conn: Any) -> None:
    odd = ["plain", 'with "quotes"', "back\\slash", "comma, brace}{", "", "Müller^Ærø", None]
    with Wire(conn, Prepared()) as db:
        r = db.execute(
            "SELECT %s::int, %s::float8, %s::text, %s::bool, %s::text, "
            "array_length(%s::text[], 1), ARRAY[1, 2, 3]::int8[], "
            "json_build_object('a', 1, 'b', 'x')",
            (7, 0.25, "tekst", True, None, odd),
        )
        elements = [
            db.execute("SELECT (%s::text[])[%s::int]", (odd, n + 1)) for n in range(len(odd))
        ]
    assert r.fetchone() == (7, 0.25, "tekst", "t", None, len(odd), [1, 2, 3], {"a": 1, "b": "x"})
    assert [e.fetchone() for e in elements] == [(v,) for v in odd]


def test_a_result_fetched_mid_transaction_is_one_round_trip_for_what_was_queued(
    conn: Any,
) -> None:
    with Wire(conn, Prepared()) as db:
        db.execute("BEGIN")
        db.execute("INSERT INTO t VALUES (%s, %s)", (1, "one"))
        seen = db.execute("SELECT name FROM t WHERE pk = %s", (1,)).fetchone()
        db.execute("INSERT INTO t VALUES (%s, %s)", (2, "two"))
        db.execute("COMMIT")
    assert seen == ("one",)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)
    assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_an_error_is_psycopgs_and_the_connection_goes_on(conn: Any) -> None:
    prepared = Prepared()
    conn.execute("INSERT INTO t VALUES (1, 'one')")
    with pytest.raises(pgerr.UniqueViolation) as caught, Wire(conn, prepared) as db:
        db.execute("BEGIN")
        db.execute("INSERT INTO t VALUES (%s, %s)", (1, "again"))
        # Queued after the failure: skipped by the server, so never prepared.
        db.execute("UPDATE t SET name = %s WHERE pk = %s", ("later", 1))
        db.execute("COMMIT")
    assert not connection_problem(caught.value)
    assert caught.value.sqlstate == "23505"
    conn.execute("ROLLBACK")
    with Wire(conn, prepared) as db:  # the skipped statement is prepared this time
        db.execute("UPDATE t SET name = %s WHERE pk = %s", ("later", 1))
    assert conn.execute("SELECT name FROM t").fetchall() == [("later",)]
    # BEGIN's and the failed INSERT's prepares ran; the skipped COMMIT's never did.
    assert {text for text, _ in prepared.names} == {
        "BEGIN",
        "INSERT INTO t VALUES ($1, $2)",
        "UPDATE t SET name = $1 WHERE pk = $2",
    }


def test_a_large_statement_is_sent_whole(conn: Any) -> None:
    big = "x" * (8 << 20)  # far more than a socket buffer holds
    with Wire(conn, Prepared()) as db:
        db.execute("INSERT INTO t VALUES (%s, %s)", (1, big))
        length = db.execute("SELECT length(name) FROM t WHERE pk = %s", (1,))
    assert length.fetchone() == (len(big),)


def test_a_connection_cut_while_waiting_raises_a_connection_error(conn: Any, pg_url: str) -> None:
    pid = conn.info.backend_pid
    killer = psycopg.connect(pg_url, autocommit=True)
    started = threading.Event()

    def kill() -> None:
        started.wait(30)
        # Terminate the backend while the pipeline waits for pg_sleep's answer.
        for _ in range(300):
            row = killer.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if row and row[0] == "active":
                break
            threading.Event().wait(0.05)
        killer.execute("SELECT pg_terminate_backend(%s)", (pid,))

    t = threading.Thread(target=kill)
    t.start()
    try:
        with pytest.raises(psycopg.Error) as caught, Wire(conn, Prepared()) as db:
            r = db.execute("SELECT pg_sleep(%s)", (60.0,))
            started.set()
            r.fetchone()
        assert connection_problem(caught.value)
    finally:
        t.join(60)
        killer.close()


def test_past_the_prepared_statements_bound_statements_go_unprepared(
    conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pacsgrid.index.pg_wire.PREPARED_MAX", 1)
    prepared = Prepared()
    with Wire(conn, prepared) as db:
        db.execute("INSERT INTO t VALUES (%s, %s)", (1, "one"))
        second = db.execute("SELECT name, pk FROM t WHERE pk = ANY(%s)", ([1, 2],))
    assert second.fetchall() == [("one", 1)]
    assert [text for text, _ in prepared.names] == ["INSERT INTO t VALUES ($1, $2)"]


def test_a_statement_run_for_many_rows_is_prepared_once(conn: Any) -> None:
    prepared = Prepared()
    with Wire(conn, prepared) as db:
        for pk in range(50):
            db.execute("INSERT INTO t VALUES (%s, %s)", (pk, f"row {pk}"))
    on_server = conn.execute(
        "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pacsgrid%%'"
    ).fetchone()
    assert on_server == (1,)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (50,)


def test_an_exception_while_answers_are_read_closes_the_connection(
    conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interruption (KeyboardInterrupt, MemoryError, a value that cannot be decoded) in
    the middle of reading leaves answers unread: a connection kept in pipeline mode would
    hand them to the next transaction as its own, so the Wire closes it."""

    class Interrupted(Exception):
        pass

    prepared = Prepared()
    with Wire(conn, prepared) as db:  # the statements prepared beforehand
        for n in (1, 2, 3):
            db.execute("SELECT %s::int * " + str(n), (1,))
    rows = pg_wire._rows

    def interrupted(res: Any) -> Any:
        monkeypatch.setattr(pg_wire, "_rows", rows)
        raise Interrupted

    monkeypatch.setattr(pg_wire, "_rows", interrupted)
    with pytest.raises(Interrupted), Wire(conn, prepared) as db:
        db.execute("SELECT %s::int * 1", (10,))
        db.execute("SELECT %s::int * 2", (10,)).fetchone()
    answer = None
    with contextlib.suppress(psycopg.Error), Wire(conn, prepared) as db:
        answer = db.execute("SELECT %s::int * 3", (10,)).fetchone()
    assert answer is None, "given the answer of an earlier transaction's statement"
    assert conn.closed


def test_a_nul_in_text_is_refused_as_psycopg_refuses_it(conn: Any) -> None:
    """libpq takes a text parameter as a C string: sent, "a\\x00b" would be stored as "a"."""
    prepared = Prepared()
    for value in ("a\x00b", ["a", "b\x00c"]):
        with pytest.raises(psycopg.DataError) as through_psycopg:
            conn.execute("SELECT %s::text", (value,))
        with pytest.raises(psycopg.DataError) as caught, Wire(conn, prepared) as db:
            db.execute("SELECT %s::text", (value,)).fetchone()
        assert str(caught.value) == str(through_psycopg.value)
    with Wire(conn, prepared) as db:  # nothing was queued for the refused statements
        assert db.execute("SELECT %s::text", ("a",)).fetchone() == ("a",)


@pytest.mark.parametrize("sqlstate", ["08ZZZ", "40ZZZ", "57ZZZ", "23ZZZ"])
def test_an_error_psycopg_does_not_list_takes_the_class_psycopg_gives_it(
    conn: Any, sqlstate: str
) -> None:
    """A SQLSTATE missing from psycopg's table (a newer server's, a function's own) takes
    the class of its first two characters, as through a cursor: a connection problem
    stays one."""
    conn.execute(
        "CREATE FUNCTION fail(code text) RETURNS int LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'failed' USING ERRCODE = code; END $$"
    )
    with pytest.raises(psycopg.Error) as through_psycopg:
        conn.execute("SELECT fail(%s)", (sqlstate,))
    with pytest.raises(psycopg.Error) as caught, Wire(conn, Prepared()) as db:
        db.execute("SELECT fail(%s)", (sqlstate,)).fetchone()
    assert type(caught.value) is type(through_psycopg.value)
    assert caught.value.sqlstate == sqlstate
    assert connection_problem(caught.value) == connection_problem(through_psycopg.value)


def test_a_connection_lost_once_commit_was_sent_is_an_unknown_outcome_never_retried(
    pg_url: str,
) -> None:
    """The batch's writes and its COMMIT go out together and are read when the Wire is
    left: a connection lost then may or may not have committed, so the store is refused
    (not acknowledged) and not run again. Run again, this batch would succeed: the writes
    wait only while `slow` says so, and the connection is cut after it stopped saying so."""
    index = PostgresIndex(pg_url)
    killer = psycopg.connect(pg_url, autocommit=True)
    try:
        index.add_batch([inst("1.1")])  # the write connection and its statements exist
        killer.execute("CREATE TABLE slow (on_ boolean NOT NULL)")
        killer.execute("INSERT INTO slow VALUES (true)")
        killer.execute(
            "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF (SELECT on_ FROM slow) THEN PERFORM pg_sleep(60); END IF; RETURN NEW; END $$"
        )
        killer.execute(
            "CREATE TRIGGER slow BEFORE INSERT ON instance FOR EACH ROW "
            "EXECUTE FUNCTION slow_insert()"
        )
        outcome: list[BaseException | list[Any]] = []

        def store() -> None:
            try:
                outcome.append(index.add_batch([inst("1.2")]))
            except BaseException as e:
                outcome.append(e)

        t = threading.Thread(target=store)
        t.start()
        try:
            pid = None
            for _ in range(600):
                row = killer.execute(
                    "SELECT pid FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE 'WITH w0 AS%%' AND wait_event = 'PgSleep'"
                ).fetchone()
                if row:
                    pid = row[0]
                    break
                threading.Event().wait(0.05)
            assert pid is not None, "the batch's writes never started"
            killer.execute("UPDATE slow SET on_ = false")
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        finally:
            t.join(120)
        assert len(outcome) == 1
        error = outcome[0]
        assert isinstance(error, IndexUnavailable), error
        assert "outcome unknown" in str(error)
        assert killer.execute("SELECT count(*) FROM instance WHERE sop_uid = '1.2'").fetchone() == (
            0,
        )
        assert index.add_batch([inst("1.2")])[0].outcome == "stored"  # a fresh connection
    finally:
        index.close()
        killer.close()


def test_one_text_called_with_other_types_is_another_statement(conn: Any) -> None:
    """A statement's parameter types are declared when it is prepared: the same text called
    later with an int where a float was, or a str, must not be read as the first types."""
    prepared = Prepared()
    with Wire(conn, prepared) as db:
        as_float = db.execute("SELECT %s", (0.5,))
        as_int = db.execute("SELECT %s", (2**63 - 1,))
        as_text = db.execute("SELECT %s::text", ("tekst",))
    assert as_float.fetchone() == (0.5,)
    assert as_int.fetchone() == (2**63 - 1,)
    assert as_text.fetchone() == ("tekst",)
    with Wire(conn, prepared) as db:  # and again, from the statements now prepared
        again = db.execute("SELECT %s", (2**63 - 1,))
    assert again.fetchone() == (2**63 - 1,)
