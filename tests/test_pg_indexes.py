"""Every C-FIND key the archive is asked for most has a PostgreSQL index that can serve it:
with sequential scans disabled, the plan of each STUDY-level query uses indexes only.

(At small sizes PostgreSQL rightly prefers scanning; `enable_seqscan = off` asks whether an
index *could* serve the query, which is what matters at a million instances, see
bench/find_scale.py.)"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pacsgrid.index import NewInstance, Query, open_index, parse_match
from pacsgrid.index.pg_connections import clean_params
from pacsgrid.index.postgres import PostgresIndex
from pacsgrid.index.sql import SqlIndex
from pacsgrid.index.sql_matching import ALIAS, POSTGRES, compile_where
from pacsgrid.model import Level
from tests.test_index_contract import inst

CASES = {
    "PatientID": ("P00042", "patient_id"),
    "PatientName": ("SMITH^AN*", "patient_name_like_idx"),
    "StudyDate": ("20240101-20240107", "study_date"),
    "AccessionNumber": ("A0000042", "study_accession"),
    "StudyInstanceUID": ("9.42", "study_uid_idx"),
    "ModalitiesInStudy": ("MR", "study_modality_pkey"),
}


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(CASES))
def test_study_level_query_is_served_by_an_index(pg_url: str, key: str) -> None:
    ix = open_index(pg_url)
    try:
        ix.add_batch(
            [
                inst(
                    f"1.{n}",
                    f"9.{n}",
                    f"9.{n}.1",
                    pid=f"P{n:05d}",
                    name=f"SMITH^ANNA^{n}" if n % 7 == 0 else f"JONES^BOB^{n}",
                    date=f"2024{1 + n % 12:02d}{1 + n % 28:02d}",
                    accession=f"A{n:07d}",
                    modality="MR" if n % 5 == 0 else "CT",
                )
                for n in range(300)
            ]
        )
        assert isinstance(ix, SqlIndex)
        value, index_name = CASES[key]
        match = parse_match(key, value)
        assert match is not None
        query = Query(Level.STUDY, (match,))
        exprs, _, joins = ix._select(Level.STUDY)
        where, params = compile_where(query, POSTGRES)
        sql = (
            f"SELECT {', '.join(exprs)} FROM {joins} WHERE {where} ORDER BY {ALIAS[Level.STUDY]}.pk"
        )
    finally:
        ix.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE")
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params).fetchall())
    assert "Seq Scan" not in plan, plan
    assert index_name in plan, plan


def test_read_connections_are_bounded(pg_url: str) -> None:
    """32 threads querying at once share `pool_size` read connections."""
    from concurrent.futures import ThreadPoolExecutor

    from pacsgrid.index.postgres import PostgresIndex

    ix = PostgresIndex(pg_url, pool_size=3)
    try:
        ix.add_batch([inst(f"1.{n}", f"9.{n}", f"9.{n}.1") for n in range(20)])
        peak = 0

        def work(_: int) -> int:
            rows = list(ix.find(Query(Level.STUDY)))
            with psycopg.connect(pg_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pacsgrid'"
                ).fetchone()
            assert row is not None
            return len(rows) * 0 + int(row[0])

        with ThreadPoolExecutor(32) as pool:
            for n in pool.map(work, range(200)):
                peak = max(peak, n)
        assert 1 <= peak <= 3 + 1  # the pool, plus the write connection
    finally:
        ix.close()


def test_a_deadlock_is_a_failed_transaction_on_a_sound_connection(pg_url: str) -> None:
    """Two transactions that lock two rows in opposite orders: PostgreSQL aborts one with
    'deadlock detected'. psycopg calls that an OperationalError, as it does a lost connection,
    but nothing of the transaction was committed and its connection still works, so the index
    runs the transaction again instead of reporting a COMMIT with an unknown outcome (a
    `pacsgrid import` on PostgreSQL failed a file that way)."""
    import threading

    from pacsgrid.index.pg_connections import connection_problem

    with psycopg.connect(pg_url, autocommit=True) as setup:
        setup.execute("CREATE TABLE t (k int PRIMARY KEY)")
        setup.execute("INSERT INTO t VALUES (1), (2)")
    first_locked, second_locked = threading.Event(), threading.Event()
    errors: list[psycopg.Error] = []

    def lock(first: int, second: int, mine: threading.Event, theirs: threading.Event) -> None:
        with psycopg.connect(pg_url) as conn:
            try:
                conn.execute("SELECT k FROM t WHERE k = %s FOR UPDATE", (first,))
                mine.set()
                assert theirs.wait(30)
                conn.execute("SELECT k FROM t WHERE k = %s FOR UPDATE", (second,))
                conn.commit()
            except psycopg.Error as e:
                errors.append(e)
                conn.rollback()
                assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is sound

    threads = [
        threading.Thread(target=lock, args=(1, 2, first_locked, second_locked)),
        threading.Thread(target=lock, args=(2, 1, second_locked, first_locked)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [type(e) for e in errors] == [psycopg.errors.DeadlockDetected]
    assert isinstance(errors[0], psycopg.OperationalError)
    assert not connection_problem(errors[0])


def _rows_read(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> dict[str, int]:
    """Rows the plan of `sql` reads from each table (kept or filtered out) when PostgreSQL
    merges the two primary keys: the plan it picks for these pages on a large index, forced
    here on a small one."""
    for setting in ("enable_seqscan", "enable_hashjoin", "enable_nestloop", "enable_sort"):
        conn.execute(f"SET {setting} = off")
    row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()
    assert row is not None

    def scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node.get("Plans", []):
            yield from scans(child)

    read: dict[str, int] = {}
    for n in scans(row[0][0]["Plan"]):
        if "Relation Name" in n:
            rows = int(n["Actual Rows"]) + int(n.get("Rows Removed by Filter", 0))
            read[n["Relation Name"]] = read.get(n["Relation Name"], 0) + rows
    return read


def test_pages_of_copies_read_only_the_instances_of_their_page(pg_url: str) -> None:
    """The repair scan and the audit page through the copies by instance key; each page must
    start reading `instance` at its cursor. Bounded only on the copy side, a page half-way
    through 10 million copies read 5 million instances (1.1 s per page)."""
    ix = open_index(pg_url)
    try:
        ix.add_batch([inst(f"1.{n}", f"9.{n // 10}", f"9.{n // 10}.1") for n in range(400)])
        assert isinstance(ix, SqlIndex)
        seen: list[tuple[str, Sequence[Any]]] = []
        read = ix._all

        def capture(sql: str, params: Sequence[Any] = ()) -> list[Any]:
            seen.append((ix._sql(sql), clean_params(params)))
            return read(sql, params)

        ix._all = capture  # type: ignore[method-assign]
        last = max(c.instance_pk for c in ix.site_copies("a", 0, 1000))
        seen.clear()
        assert len(ix.site_copies("a", last - 10, 5)) == 5
        assert len(ix.audit_candidates(["a"], 2e9, (last - 10, ""), 5)) == 5
    finally:
        ix.close()
    assert len(seen) == 2
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE")
        for sql, params in seen:
            read = _rows_read(conn, sql, params)
            assert set(read) == {"copy", "instance"}, (read, sql)
            assert max(read.values()) <= 7, (read, sql)


@pytest.mark.slow
def test_filing_scans_no_table_even_before_postgresql_has_analyzed_it(pg_url: str) -> None:
    """A new database's tables have no statistics (autovacuum analyzes them a minute later
    at the earliest): left to itself, the planner then scans a whole table for each
    batch's lookups, and keeps the plan as the table grows. The write connections rule
    that out: a batch's transaction shows index scans and no sequential scan of the tables
    it looks up (counted on a connection that has done nothing else: the schema's own
    index builds count as scans)."""
    ix = open_index(pg_url)
    try:
        for b in range(4):
            ix.add_batch(
                [inst(f"1.{b}.{n}", f"9.{b}.{n // 50}", f"9.{b}.{n // 10}") for n in range(200)]
            )
    finally:
        ix.close()
    counted = ("hidden_instance", "instance", "patient", "series", "study")

    def file_and_count(db: Any, items: list[NewInstance]) -> list[tuple[str, int, int]]:
        assert isinstance(ix, PostgresIndex)
        ix._file(db, items)
        rows = db.execute(
            "SELECT relname, seq_scan, coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables "
            "WHERE relname = ANY(%s) ORDER BY relname",
            [list(counted)],
        ).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    ix = open_index(pg_url)
    try:
        assert isinstance(ix, PostgresIndex)
        batch = [inst(f"1.9.{n}", f"9.4.{n // 50}", f"9.4.{n // 10}") for n in range(200)]
        counts = ix._run(file_and_count, batch)
    finally:
        ix.close()
    assert tuple(name for name, _, _ in counts) == counted
    assert [(name, seq) for name, seq, _ in counts if seq] == [], counts
    assert all(idx > 0 for _, _, idx in counts), counts


def test_a_studys_modality_rows_are_found_by_an_index(pg_url: str, tmp_path: Path) -> None:
    """A correction or a hidden instance replaces one study's ModalitiesInStudy rows; on
    either engine that statement reads them through an index, not the whole table."""
    statement = "DELETE FROM study_modality WHERE study_pk = 7"
    for url in (pg_url, f"sqlite:///{tmp_path / 'index.sqlite'}"):
        ix = open_index(url)
        ix.add_batch([inst(f"1.{n}", f"9.{n}", f"9.{n}.1", modality="MR") for n in range(50)])
        ix.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE")
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + statement).fetchall())
    assert "study_modality_study_idx" in plan, plan
    db = sqlite3.connect(tmp_path / "index.sqlite")
    try:
        plan = " ".join(str(r) for r in db.execute("EXPLAIN QUERY PLAN " + statement))
    finally:
        db.close()
    assert "study_modality_study_idx" in plan, plan
