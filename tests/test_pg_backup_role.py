"""`pacsgrid backup` on PostgreSQL as a role without CREATEDB (a common hosted setup), on the
real PostgreSQL server of the session: the backup is verified all the same, by reading every
row of the dump back (no scratch database), says so, and restores."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from bench.synth import Spec, write
from tests.conftest import pacsgrid_cli

ROLE = "pacsgrid_nocreatedb"


@pytest.mark.slow
def test_backup_without_createdb_is_verified_by_reading_the_dump(pg_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    admin = pg_server.url()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{ROLE}_db" WITH (FORCE)')
        conn.execute(f'DROP DATABASE IF EXISTS "{ROLE}_back" WITH (FORCE)')
        conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
        conn.execute(f"CREATE ROLE {ROLE} LOGIN NOCREATEDB")
        conn.execute(f'CREATE DATABASE "{ROLE}_db" OWNER {ROLE}')
        conn.execute(f'CREATE DATABASE "{ROLE}_back" OWNER {ROLE}')
    url = f"host=127.0.0.1 port={pg_server.port} user={ROLE} dbname={ROLE}_db"
    data = tmp_path / "archive"
    try:
        files = write(Spec(studies=2, series=2, instances=3, size=16, seed="role"), tmp_path / "s")
        done = pacsgrid_cli("import", *files, "--data-dir", data, "--database", url)
        assert done.returncode == 0, done.stdout + done.stderr
        made = pacsgrid_cli("backup", "--data-dir", data, "--database", url)
        assert made.returncode == 0, made.stdout + made.stderr
        assert "verified (every row read; no scratch database)" in made.stdout, made.stdout
        (manifest,) = (data / "backups").glob("index-*.json")
        m = json.loads(manifest.read_text())
        assert m["verified"] and m["verify_method"] == "rows read"
        assert m["verify_counts"] == m["counts"] and m["counts"]["instance"] == len(files)
        back = url.replace(f"{ROLE}_db", f"{ROLE}_back")
        backup = data / "backups" / m["name"]
        restored = pacsgrid_cli("restore", backup, "--data-dir", data, "--database", back)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        status = pacsgrid_cli("status", "--data-dir", data, "--database", back)
        assert f"instances {len(files)}" in status.stdout, status.stdout
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{ROLE}_db" WITH (FORCE)')
            conn.execute(f'DROP DATABASE IF EXISTS "{ROLE}_back" WITH (FORCE)')
            conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
