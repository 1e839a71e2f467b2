"""Applied migrations never change: each is pinned by the SHA-256 of the SQL it runs.

An index upgraded by an older pacsgrid and one made fresh by this one must have the same
schema. So every migration in `pacsgrid.index.schema` is literal SQL (for each engine); a new
attribute or table is a new migration at the end. If a digest below changes, an applied
migration was edited: revert it and add a new one instead.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pacsgrid.index import schema

PINNED = {
    "sqlite": {
        "0001_core": "9bed70827ebc283ef73dd08baa4209ee1a2bffd0898c8952c5dcf1aa86ae01a4",
        "0002_work_queue": "ee8baee24e61f76274ba5e7887e4cf5a2a210d4e3c03c907a36c8ce434ea4ec6",
        "0003_sites": "8b5ef8129def75abef6f0efa7427501e837e9dba163c6f36114a7de4616febe6",
        "0003_migration_ledgers": (
            "f3a1673bfcca5c1d29a9bc45393a52e738ff221c39da0089a74cf97dedc1a1a0"
        ),
        "0003_web_auth": "70ebe0b61ad6a14a7a57eb9073d253b015066b1d08c77640ffa097287a9df3a0",
        "0003_scale": "1400fc8b07c8d65ca3445fd6c3df7d297e2591f685409833863f6be8552826e5",
        "0004_checkpoint_mark": (
            "bc6952d2a2f1f25d39003cef259482dbf6aca0a652c6ea1f829e79e84159270a"
        ),
        "0005_corrections": "df63ff924a57348a12d5fca03d95d34ea84215ea2de2c04cb9bfd83b4a5d047b",
        "0006_totals": "268ba913c8b09c01ff908f60bbcdc9620e1733c10386192a99eed53d9902fe1b",
        "0007_modalities_by_study": (
            "0871da4f2b96ba603dbb6fd21ee7734a025707d4f2c160a52d6f5f09c4a5ea07"
        ),
    },
    "postgres": {
        "0001_core": "c48dcdd94fe3c3760e1c6357b4b5f13ccd5fd9aa6bee6e3e1146428ed084a72c",
        "0002_work_queue": "1600deab466e366096a157729e5de15759693b8c3427cd5ccecd7daadd5a157c",
        "0003_sites": "16797f1664e79eb492b13025464fcc95d6307fbb76cfbda804e7075a9e7d74d7",
        "0003_migration_ledgers": (
            "89018b07b41482331605316e787f4eb5fa7bcbbba773eadf9ce872826d841982"
        ),
        "0003_web_auth": "95fce6f9d12afdf63e5669c471be3e42654d3dec08a5dc429209a58283effd76",
        "0003_scale": "37dfe3dd933d18fff727cf0794f5109aa2ad8353c36c4799781d15e28b9fd585",
        "0004_checkpoint_mark": (
            "424c5a52ca04d6545eb8b9618a97481678f7fb9de56fe68fee14a626c609f768"
        ),
        "0005_corrections": "5bf2202c8f36a96d2a2a3e72829903b9d1b011a324b364f35ce6d92a23e46356",
        "0006_totals": "268ba913c8b09c01ff908f60bbcdc9620e1733c10386192a99eed53d9902fe1b",
        "0007_modalities_by_study": (
            "0871da4f2b96ba603dbb6fd21ee7734a025707d4f2c160a52d6f5f09c4a5ea07"
        ),
    },
}
ENGINES = {"sqlite": schema.SQLITE_TYPES, "postgres": schema.POSTGRES_TYPES}


def digest(statements: list[str]) -> str:
    return hashlib.sha256(";\n".join(statements).encode()).hexdigest()


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_applied_migrations_are_unchanged(engine: str) -> None:
    """Every migration known here runs exactly the SQL it ran when it was first released;
    a migration added later must be pinned here too."""
    got = {name: digest(statements(ENGINES[engine])) for name, statements in schema.MIGRATIONS}
    assert got == PINNED[engine]


def test_migration_names_are_unique() -> None:
    names = [name for name, _ in schema.MIGRATIONS]
    assert len(names) == len(set(names))


@contextmanager
def first_migrations(n: int) -> Iterator[None]:
    """Pretend to be an older pacsgrid that knew only the first `n` migrations."""
    original = list(schema.MIGRATIONS)
    schema.MIGRATIONS[:] = original[:n]
    try:
        yield
    finally:
        schema.MIGRATIONS[:] = original


def sqlite_schema(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
    conn.close()
    return rows


def test_sqlite_upgraded_step_by_step_equals_fresh(tmp_path: Path) -> None:
    from pacsgrid.index.sqlite import SqliteIndex

    fresh, stepped = tmp_path / "fresh.sqlite", tmp_path / "stepped.sqlite"
    SqliteIndex(fresh).close()
    for n in range(1, len(schema.MIGRATIONS) + 1):
        with first_migrations(n):
            SqliteIndex(stepped).close()
    assert sqlite_schema(stepped) == sqlite_schema(fresh)


PG_SCHEMA = (
    "SELECT table_name, column_name, ordinal_position, data_type, column_default, is_nullable "
    "FROM information_schema.columns WHERE table_schema = 'public' "
    "ORDER BY table_name, ordinal_position",
    "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
    "ORDER BY tablename, indexname",
)


def pg_schema(url: str) -> list[list[tuple[Any, ...]]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return [[tuple(r) for r in conn.execute(q).fetchall()] for q in PG_SCHEMA]


def test_postgres_upgraded_step_by_step_equals_fresh(pg_server: Any) -> None:
    from pacsgrid.index.postgres import PostgresIndex

    fresh = pg_server.create_db("t_migrations_fresh")
    stepped = pg_server.create_db("t_migrations_stepped")
    try:
        PostgresIndex(fresh).close()
        for n in range(1, len(schema.MIGRATIONS) + 1):
            with first_migrations(n):
                PostgresIndex(stepped).close()
        assert pg_schema(stepped) == pg_schema(fresh)
    finally:
        pg_server.drop_db("t_migrations_fresh")
        pg_server.drop_db("t_migrations_stepped")


def test_a_new_attribute_does_not_change_an_applied_migration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adding an attribute to the catalogue needs a new migration; it cannot rewrite 0001."""
    from pacsgrid import model

    extra = model.Attribute("StationName", 0x00081010, "SH", model.Level.SERIES, "station_name")
    catalogue = (*model.ATTRIBUTES, extra)
    monkeypatch.setattr(model, "ATTRIBUTES", catalogue)
    monkeypatch.setattr(schema, "ATTRIBUTES", catalogue, raising=False)  # a copied name too
    core = dict(schema.MIGRATIONS)["0001_core"]
    assert digest(core(schema.SQLITE_TYPES)) == PINNED["sqlite"]["0001_core"]
