"""Copies of the index as of one moment, per engine: taking one, checking one by restoring
it into a scratch database, and restoring one (pacsgrid.jobs.backup names, describes, verifies,
rotates and schedules them; see there for what each engine does).

- SQLite: the online backup API in one read transaction, gzip-compressed (`.sqlite.gz`);
  checked by `PRAGMA integrity_check` and its row counts; restored by decompressing it in
  place (an existing index is moved aside with `force`, never deleted).
- PostgreSQL: `pg_dump` in custom format in an exported snapshot (`.pgdump`), with the row
  counts of that snapshot; checked in a scratch database (or, without CREATEDB, by reading
  every row of the dump); restored by `pg_restore` into an empty database.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pacsgrid.errors import IndexUnavailable, PacsgridError
from pacsgrid.storage.durable import fsync_dir

log = logging.getLogger("pacsgrid.jobs.backup")  # where backups have always logged

TABLES = ("patient", "study", "series", "instance", "copy", "work")


class BackupError(PacsgridError):
    """A backup or restore did not complete; nothing was rotated away or overwritten."""


class IndexDumps(Protocol):
    """One engine's copies of the index."""

    engine: str  # "sqlite" | "postgres", as recorded in a backup's manifest
    suffix: str  # of its files: ".sqlite.gz" | ".pgdump"

    def dump(self, partial: Path) -> tuple[dict[str, int], str]:
        """Write a copy of the index to `partial` (not yet durable); the row counts of the
        copy's moment and where it was read from (fit for a log: no password)."""
        ...

    def check(self, path: Path) -> tuple[dict[str, int], str]:
        """The row counts of the copy at `path`, restored into a scratch database, and how
        they were had ("restored", or "rows read" when no scratch database can be made)."""
        ...

    def restore(self, path: Path, *, force: bool = False) -> None:
        """Make the copy at `path` the index (see the engines for what must be empty)."""
        ...


@dataclass
class SqliteDumps:
    db: Path  # the index file (restore's target)
    engine = "sqlite"
    suffix = ".sqlite.gz"

    def dump(self, partial: Path) -> tuple[dict[str, int], str]:
        return _dump_sqlite(self.db, partial), str(self.db)

    def check(self, path: Path) -> tuple[dict[str, int], str]:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".verify-") as tmp:
            scratch = Path(tmp) / "scratch.sqlite"
            _gunzip(path, scratch)
            conn = sqlite3.connect(scratch)
            try:
                ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
                if ok != "ok":
                    raise BackupError(f"{path}: integrity check failed: {ok}")
                return _sqlite_counts(conn), "restored"
            finally:
                conn.close()

    def restore(self, path: Path, *, force: bool = False) -> None:
        _restore_sqlite(path, self.db, force)


@dataclass
class PostgresDumps:
    url: str  # the index database (restore's target)
    source: str  # where a dump reads from (a standby, or the database)
    scratch: str  # the server a scratch database for checks is made on
    engine = "postgres"
    suffix = ".pgdump"

    def dump(self, partial: Path) -> tuple[dict[str, int], str]:
        from pacsgrid.index.pg_connections import redact

        return _dump_postgres(self.source, partial), redact(self.source)

    def check(self, path: Path) -> tuple[dict[str, int], str]:
        return _verify_postgres(self.scratch, path)

    def restore(self, path: Path, *, force: bool = False) -> None:
        _restore_postgres(path, self.url)


def engine_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite:") else "postgres"


def index_dumps(engine: str, url: str, *, source: str = "", scratch: str = "") -> IndexDumps:
    """The copies of `engine` for the index at `url`; a PostgreSQL dump reads from `source`
    (default: `url`) and is checked on `scratch` (default: `url`'s server)."""
    if engine == "sqlite":
        return SqliteDumps(Path(url[len("sqlite:///") :]) if engine_of(url) == "sqlite" else Path())
    return PostgresDumps(url, source or url, scratch or url)


def _dump_sqlite(db: Path, partial: Path) -> dict[str, int]:
    if not db.exists():
        raise BackupError(f"no index at {db}")
    with tempfile.TemporaryDirectory(dir=partial.parent, prefix=".backup-") as tmp:
        copy = Path(tmp) / "index.sqlite"
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)  # one step: a consistent snapshot; writers go on (WAL)
        except sqlite3.Error as e:
            raise BackupError(f"SQLite backup of {db} failed: {e}") from e
        finally:
            src.close()
        counts = _sqlite_counts(dst)
        dst.close()
        with open(copy, "rb") as fin, gzip.open(partial, "wb", compresslevel=6) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        return counts


def _dump_postgres(source: str, partial: Path) -> dict[str, int]:
    import psycopg

    from pacsgrid.index.pg_connections import redact, with_timeouts

    dsn = with_timeouts(source, connect_timeout=10, statement_timeout=0, app="pacsgrid-backup")
    pg_dump = _tool("pg_dump")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()
            assert snapshot is not None
            counts = {
                t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore[index]
                for t in TABLES
            }
            proc = subprocess.run(
                [
                    pg_dump,
                    "--format=custom",
                    "--compress=6",
                    "--no-owner",
                    f"--snapshot={snapshot[0]}",
                    f"--file={partial}",
                    f"--dbname={dsn}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            conn.execute("COMMIT")
    except psycopg.Error as e:
        partial.unlink(missing_ok=True)
        raise BackupError(f"cannot back up {redact(source)}: {e}") from e
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BackupError(f"pg_dump of {redact(source)} failed: {proc.stdout.strip()[-2000:]}")
    return counts


def _verify_postgres(server: str, path: Path) -> tuple[dict[str, int], str]:
    """(row counts, how they were had): restored into a scratch database, or read from the
    dump when the role may not create one."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from pacsgrid.index.pg_connections import redact, with_timeouts

    admin = with_timeouts(server, connect_timeout=10, statement_timeout=0, app="pacsgrid-verify")
    name = f"pacsgrid_verify_{os.getpid()}_{int(time.time())}"
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.errors.InsufficientPrivilege:
        log.warning(
            "the role of %s may not create databases (no CREATEDB): the backup is verified by "
            "reading every row of the dump instead of restoring it (set backup.scratch to a "
            "server where it may, for a full restore test)",
            redact(server),
        )
        return _dump_rows(path), "rows read"
    except psycopg.Error as e:
        raise BackupError(f"cannot create scratch database for verification: {e}") from e
    try:
        _pg_restore(path, make_conninfo(admin, dbname=name))
        with psycopg.connect(make_conninfo(admin, dbname=name)) as conn:
            counts = {
                t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore[index]
                for t in TABLES
            }
            return counts, "restored"
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _dump_rows(path: Path) -> dict[str, int]:
    """Row counts of the index tables in a pg_dump archive, from its data as pg_restore writes
    it out (`COPY table (...) FROM stdin;`, a line per row, `\\.`): decompresses and reads
    every row, with no database."""
    counts = dict.fromkeys(TABLES, 0)
    current: str | None = None
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [_tool("pg_restore"), "--data-only", "--file=-", str(path)],
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if current is not None:
                if line == b"\\.\n":
                    current = None
                else:
                    counts[current] += 1
            elif line.startswith(b"COPY ") and line.rstrip().endswith(b"FROM stdin;"):
                table = line.split()[1].decode().removeprefix("public.").strip('"')
                current = table if table in counts else None
        if proc.wait() != 0:
            errors.seek(0)
            text = errors.read().decode(errors="replace").strip()[-2000:]
            raise BackupError(f"pg_restore cannot read {path}: {text}")
    return counts


def _restore_sqlite(backup_file: Path, target: Path, force: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if not force:
            raise BackupError(
                f"{target} exists; restore into a new path (--database sqlite:///NEW) or "
                "use --force to move the current index aside"
            )
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = Path(str(target) + suffix)
            if old.exists():
                os.replace(old, Path(f"{target}.before-restore-{stamp}{suffix}"))
    partial = target.with_name(target.name + ".restoring")
    _gunzip(backup_file, partial)
    fsync_file(partial)
    os.replace(partial, target)
    fsync_dir(target.parent)


def _restore_postgres(backup_file: Path, url: str) -> None:
    import psycopg

    from pacsgrid.index.pg_connections import redact, with_timeouts

    dsn = with_timeouts(url, connect_timeout=10, statement_timeout=0, app="pacsgrid-restore")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            n = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchone()
    except psycopg.Error as e:
        raise IndexUnavailable(f"cannot reach {redact(url)}: {e}") from e
    if n and n[0]:
        raise BackupError(
            f"{redact(url)} is not empty ({n[0]} tables): restore into a new, empty database "
            "(CREATE DATABASE ...) and point the database setting at it"
        )
    _pg_restore(backup_file, dsn)


def _pg_restore(path: Path, dsn: str) -> None:
    proc = subprocess.run(
        [_tool("pg_restore"), "--no-owner", "--exit-on-error", f"--dbname={dsn}", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        raise BackupError(f"pg_restore of {path} failed: {proc.stdout.strip()[-2000:]}")


# ---------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/lib/postgresql/15/bin")
    if not found:
        raise BackupError(f"{name} not found: install PostgreSQL's client programs")
    return found


def _sqlite_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}


def _gunzip(src: Path, dst: Path) -> None:
    try:
        with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except (OSError, EOFError) as e:
        raise BackupError(f"{src}: cannot decompress: {e}") from e


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
