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

What is engine-specific (taking the copy, restoring it into a scratch database, restoring it)
is in pacsgrid.index.dumps; this module names, describes, verifies, rotates and schedules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pacsgrid import served
from pacsgrid.errors import ConfigError, PacsgridError
from pacsgrid.index import WorkQueue
from pacsgrid.index.dumps import (
    BackupError,
    IndexDumps,
    engine_of,
    fsync_file,
    index_dumps,
)
from pacsgrid.jobs.loop import repeat
from pacsgrid.settings import Settings
from pacsgrid.storage.durable import fsync_dir

log = logging.getLogger(__name__)


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
        fsync_file(tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls(**json.loads(path.read_text()))


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
    dumps = _dumps(settings, engine_of(url))
    out = folder / (base + dumps.suffix)
    partial = out.with_name(out.name + ".partial")
    counts, source = dumps.dump(partial)
    manifest = _publish(partial, out, dumps.engine, counts, source)
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


def _dumps(settings: Settings, engine: str) -> IndexDumps:
    url = settings.database_url
    return index_dumps(
        engine,
        url,
        source=settings.backup.source or settings.index.read_database or url,
        scratch=settings.backup.scratch or url,
    )


def _publish(
    partial: Path, out: Path, engine: str, counts: dict[str, int], source: str
) -> Manifest:
    """Make a finished backup file durable under its final name; its manifest."""
    fsync_file(partial)
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
    got, method = _dumps(settings, m.engine).check(path)
    if got != m.counts:
        raise BackupError(f"{path}: restored counts {got} differ from the backup's {m.counts}")
    m.verified = True
    m.verify_counts = got
    m.verify_method = method
    m.write(folder)
    return m


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
        _dumps(settings, m.engine).restore(backup_file, force=force)
    return m


# ---------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
