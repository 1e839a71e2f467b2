"""Index backups that never stop ingest, verified, rotated; and restore.

- SQLite: the online backup API copies the database in one read transaction (WAL mode: the
  archive keeps committing meanwhile), then the copy is gzip-compressed.
- PostgreSQL: `pg_dump` in custom format (compressed), reading from `backup.source`, else the
  standby of `index.read_database`, else the database: a dump is one snapshot and never blocks
  writers. The row counts of the backup point are taken in the same snapshot
  (`pg_export_snapshot` + `pg_dump --snapshot`).

Every backup has a manifest beside it (`<name>.json`: engine, counts at the backup point,
SHA-256 of the file). Verification restores the file into a scratch database (a temporary
SQLite file, or a scratch PostgreSQL database that is dropped afterwards) and compares its
counts with the manifest. A PostgreSQL role without CREATEDB cannot make a scratch database:
then every row of the dump is read back by pg_restore instead (no database needed) and
counted, and the manifest says so (`verify_method`). After a verified backup, backups beyond
`backup.keep` are deleted, oldest first; an unverified or failed backup never causes a
deletion.

A restore brings the index back to the backup point; objects stored since then are on the
sites but not in the restored index: `pacsgrid reindex --reconcile` adds them. It is refused
while `pacsgrid serve` runs on the archive (pacsgrid.served).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pacsgrid import served
from pacsgrid.errors import ConfigError, IndexUnavailable, PacsgridError
from pacsgrid.index import WorkQueue
from pacsgrid.jobs.loop import repeat
from pacsgrid.settings import Settings
from pacsgrid.storage.durable import fsync_dir

log = logging.getLogger(__name__)

TABLES = ("patient", "study", "series", "instance", "copy", "work")


class BackupError(PacsgridError):
    """A backup or restore did not complete; nothing was rotated away or overwritten."""


@dataclass
class Manifest:
    name: str  # file name of the backup, in the same folder
    engine: str  # sqlite | postgres
    created: float
    counts: dict[str, int]
    size: int = 0
    sha256: str = ""
    source: str = ""
    verified: bool = False
    verify_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    verify_method: str = ""  # restored | rows read (no scratch database could be made)

    def path_in(self, folder: Path) -> Path:
        return folder / self.name

    def write(self, folder: Path) -> Path:
        path = folder / (Path(self.name).name.split(".")[0] + ".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        _fsync_file(tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls(**json.loads(path.read_text()))


def engine_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite:") else "postgres"


# ---------------------------------------------------------------- backup


def backup(settings: Settings, *, verify: bool | None = None, keep: int | None = None) -> Manifest:
    """Take one backup of the index into `settings.backup_dir`; verify; rotate."""
    folder = settings.backup_dir
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"index-{stamp}"
    n = 1
    while any(folder.glob(base + ".*")):
        base = f"index-{stamp}-{n}"
        n += 1
    started = time.monotonic()
    url = settings.database_url
    if engine_of(url) == "sqlite":
        manifest = _backup_sqlite(Path(url[len("sqlite:///") :]), folder, base)
    else:
        source = settings.backup.source or settings.index.read_database or url
        manifest = _backup_postgres(source, folder, base)
    manifest.seconds = time.monotonic() - started
    manifest.write(folder)
    if settings.backup.verify if verify is None else verify:
        verify_backup(settings, folder / (base + ".json"))
        manifest = Manifest.read(folder / (base + ".json"))
        rotate(folder, settings.backup.keep if keep is None else keep)
    log.info(
        "backup %s: %s, %d instances, %.1fs%s",
        manifest.name,
        _human(manifest.size),
        manifest.counts.get("instance", 0),
        manifest.seconds,
        ", verified" if manifest.verified else "",
    )
    return manifest


def _backup_sqlite(db: Path, folder: Path, base: str) -> Manifest:
    if not db.exists():
        raise BackupError(f"no index at {db}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".backup-") as tmp:
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
        out = folder / (base + ".sqlite.gz")
        partial = out.with_suffix(".gz.partial")
        with open(copy, "rb") as fin, gzip.open(partial, "wb", compresslevel=6) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        return _publish(partial, out, "sqlite", counts, str(db))


def _backup_postgres(source: str, folder: Path, base: str) -> Manifest:
    import psycopg

    from pacsgrid.index.pg_connections import redact, with_timeouts

    out = folder / (base + ".pgdump")
    partial = out.with_suffix(".pgdump.partial")
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
    return _publish(partial, out, "postgres", counts, redact(source))


def _publish(
    partial: Path, out: Path, engine: str, counts: dict[str, int], source: str
) -> Manifest:
    """Make a finished backup file durable under its final name; its manifest."""
    _fsync_file(partial)
    os.replace(partial, out)
    fsync_dir(out.parent)
    return Manifest(out.name, engine, time.time(), counts, out.stat().st_size, _sha256(out), source)


# ---------------------------------------------------------------- verify and rotate


def verify_backup(settings: Settings, manifest_path: Path) -> Manifest:
    """Restore the backup into a scratch database and compare counts with its manifest."""
    m = Manifest.read(manifest_path)
    folder = manifest_path.parent
    path = m.path_in(folder)
    if _sha256(path) != m.sha256:
        raise BackupError(f"{path}: SHA-256 does not match its manifest (damaged file)")
    if m.engine == "sqlite":
        with tempfile.TemporaryDirectory(dir=folder, prefix=".verify-") as tmp:
            scratch = Path(tmp) / "scratch.sqlite"
            _gunzip(path, scratch)
            conn = sqlite3.connect(scratch)
            try:
                ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
                if ok != "ok":
                    raise BackupError(f"{path}: integrity check failed: {ok}")
                got = _sqlite_counts(conn)
            finally:
                conn.close()
        method = "restored"
    else:
        got, method = _verify_postgres(settings, path)
    if got != m.counts:
        raise BackupError(f"{path}: restored counts {got} differ from the backup's {m.counts}")
    m.verified = True
    m.verify_counts = got
    m.verify_method = method
    m.write(folder)
    return m


def _verify_postgres(settings: Settings, path: Path) -> tuple[dict[str, int], str]:
    """(row counts, how they were had): restored into a scratch database, or read from the
    dump when the role may not create one."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from pacsgrid.index.pg_connections import redact, with_timeouts

    server = settings.backup.scratch or settings.database_url
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


def backups(folder: Path) -> list[Manifest]:
    """Manifests in `folder`, oldest first."""
    out = []
    for p in sorted(folder.glob("index-*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(Manifest.read(p))
    return sorted(out, key=lambda m: m.created)


def rotate(folder: Path, keep: int) -> list[str]:
    """Delete backups beyond the `keep` newest (the documented retention policy)."""
    removed = []
    all_backups = backups(folder)
    for m in all_backups[: max(0, len(all_backups) - max(1, keep))]:
        m.path_in(folder).unlink(missing_ok=True)
        (folder / (m.name.split(".")[0] + ".json")).unlink(missing_ok=True)
        removed.append(m.name)
        log.info("backup %s rotated out (keep %d)", m.name, keep)
    return removed


# ---------------------------------------------------------------- restore


def restore(settings: Settings, backup_file: Path, *, force: bool = False) -> Manifest:
    """Restore `backup_file` into the database the settings name (which must be empty, or,
    for SQLite with `force`, is moved aside, never deleted)."""
    manifest_path = backup_file.with_name(backup_file.name.split(".")[0] + ".json")
    if not backup_file.exists():
        raise BackupError(f"no such backup: {backup_file}")
    if manifest_path.exists():
        m = Manifest.read(manifest_path)
        if _sha256(backup_file) != m.sha256:
            raise BackupError(f"{backup_file}: SHA-256 does not match its manifest")
    else:
        engine = "sqlite" if backup_file.name.endswith(".sqlite.gz") else "postgres"
        m = Manifest(backup_file.name, engine, 0.0, {})
    url = settings.database_url
    if engine_of(url) != m.engine:
        raise ConfigError(
            "database", f"the backup is a {m.engine} index; the database setting is not ({url})"
        )
    # A server of this archive would go on writing into the index moved aside, and what it
    # acknowledged meanwhile would be missing from the restored one: refuse while it runs.
    with served.exclusive(settings.data_dir, "restore the index"):
        if m.engine == "sqlite":
            _restore_sqlite(backup_file, Path(url[len("sqlite:///") :]), force)
        else:
            _restore_postgres(backup_file, url)
    return m


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
    _fsync_file(partial)
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def describe(m: Manifest) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.created))
    state = "verified" if m.verified else "NOT verified"
    if m.verified and m.verify_method == "rows read":
        state = "verified (every row read; no scratch database)"
    return (
        f"{m.name}  {when} UTC  {_human(m.size)}  {m.counts.get('instance', 0)} instances, "
        f"{m.counts.get('study', 0)} studies  {state}"
    )


# ---------------------------------------------------------------- the schedule in `serve`


class BackupSchedule:
    """A node component: every `backup.interval` hours one node (whichever leases the
    period first, see Index.lease_job) takes a backup. A failed backup is logged as an
    error and tried again at the next period."""

    name = "backup-schedule"

    def __init__(self, settings: Settings, index: WorkQueue, *, tick: float = 30.0) -> None:
        self.settings = settings
        self.index = index
        self.tick = tick
        self.taken = 0
        self._owner = ""

    async def run(self, stop: asyncio.Event) -> None:
        self._owner = node_name()
        await repeat(stop, self._pass)

    async def _pass(self) -> float:
        """Take a backup if this node leases the period; returns the pause before asking
        again."""
        every = self.settings.backup.interval * 3600.0
        try:
            if await asyncio.to_thread(self.index.lease_job, "backup", self._owner, every):
                m = await asyncio.to_thread(backup, self.settings)
                self.taken += 1
                log.info("scheduled backup done: %s", describe(m))
        except PacsgridError as e:
            log.error("scheduled backup failed: %s", e)
        return min(every, self.tick)
