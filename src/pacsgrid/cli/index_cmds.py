"""Commands for the index after a disaster: reindex (and reconcile), backup, restore."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from pacsgrid.archive import Archive, display_url
from pacsgrid.cli.common import add_archive_options, settings_from, setup_logging
from pacsgrid.progress import Progress


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "reindex",
        help="rebuild the index from the storage sites (or reconcile the two)",
        description="Read every object on every storage site and index what the index lacks: "
        "on an empty database this rebuilds the whole index. Parallel, resumable (run it "
        "again after an interruption), idempotent; the archive may keep serving meanwhile. "
        "--reconcile also lists index rows whose objects exist on no site (nothing is "
        "deleted).",
    )
    add_archive_options(p)
    p.add_argument(
        "--reconcile",
        action="store_true",
        help="also report index rows without any object, and copies their site lacks",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 2,
        help="reader processes (default: one per CPU core)",
    )
    p.add_argument(
        "--only-site",
        action="append",
        default=[],
        metavar="NAME",
        help="read only this site (repeatable; default: every site)",
    )
    p.add_argument("--report", type=Path, metavar="FILE", help="write every finding to FILE")
    p.set_defaults(func=run_reindex)

    p = sub.add_parser(
        "backup",
        help="back up the index (online, compressed, verified, rotated)",
        description="Back up the index while the archive runs: SQLite with its online backup "
        "API, PostgreSQL with pg_dump (from backup.source or index.read_database when set). "
        "The backup is verified by restoring it into a scratch database and comparing row "
        "counts; then backups beyond backup.keep are deleted, oldest first.",
    )
    add_archive_options(p)
    p.add_argument("--out", type=Path, metavar="DIR", help="backup folder (backup.dir)")
    p.add_argument("--keep", type=int, help="backups to keep (backup.keep)")
    p.add_argument("--no-verify", action="store_true", help="skip the verification restore")
    p.add_argument("--list", action="store_true", help="list the backups and exit")
    p.set_defaults(func=run_backup)

    p = sub.add_parser(
        "restore",
        help="restore the index from a backup",
        description="Restore an index backup into the database the settings (or --database) "
        "name. PostgreSQL: the database must exist and be empty. SQLite: the file must not "
        "exist, unless --force, which moves the current index aside (never deletes it). "
        "Refused while 'pacsgrid serve' runs on the archive (stop it first). Then "
        "run 'pacsgrid reindex --reconcile' to index what was stored after the backup.",
    )
    add_archive_options(p)
    p.add_argument("backup", type=Path, metavar="BACKUP", help="a .sqlite.gz or .pgdump file")
    p.add_argument("--force", action="store_true", help="SQLite: move an existing index aside")
    p.set_defaults(func=run_restore)


def run_reindex(args: argparse.Namespace) -> int:
    from pacsgrid.node import reindexer

    settings = settings_from(args)
    setup_logging(settings, quiet=sys.stderr.isatty())
    archive = Archive(settings, probe_interval=0)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    only = args.only_site
    site_settings = [s for s in settings.sites if not only or s.name in only]
    unknown = set(only) - {s.name for s in settings.sites}
    if unknown:
        archive.close()
        print(
            f"pacsgrid: config error: --only-site: no such site: {', '.join(sorted(unknown))}",
            file=sys.stderr,
        )
        return 2
    try:
        with Progress("reindex", unit="objects") as progress:
            job = reindexer(
                archive,
                site_settings,
                jobs=max(1, args.jobs),
                progress=progress,
                stop=stop,
            )
            try:
                report = job.run(reconcile=args.reconcile)
            except KeyboardInterrupt:
                stop.set()
                report = job.report
                report.interrupted = True
            elapsed = progress.summary()
    finally:
        signal.signal(signal.SIGTERM, previous)
        archive.close()
    r = report
    print(
        f"listed {r.listed} objects: indexed {r.indexed} new, {r.copies} copies added, "
        f"{r.already} already indexed, {len(r.unreadable)} unreadable, "
        f"{len(r.conflicts)} conflicts"
    )
    if r.corrections:
        print(f"  {r.corrections} correction(s) applied from the sites, in order")
    print(f"  {elapsed}")
    lines: list[str] = []
    for site, why in r.sites_down:
        lines.append(f"site down (not reindexed): {site}: {why}")
    for site, key, why in r.unreadable:
        lines.append(f"unreadable: {site}:{key}: {why}")
    for site, key, why in r.conflicts:
        lines.append(f"conflict: {site}:{key}: {why}")
    if args.reconcile and not r.interrupted:
        print(
            f"reconcile: {len(r.orphans)} index rows whose object exists on no site, "
            f"{len(r.missing_copies)} recorded copies missing from their site "
            "(nothing was deleted)"
        )
        for sop, keys in r.orphans:
            lines.append(f"no object on any site: {sop} ({', '.join(keys) or 'no copy recorded'})")
        for sop, site, key in r.missing_copies:
            lines.append(f"copy missing: {sop} on {site} ({key})")
    for line in lines[:50]:
        print(f"  {line}")
    if len(lines) > 50:
        print(f"  ... and {len(lines) - 50} more" + ("" if args.report else " (see --report)"))
    if args.report:
        args.report.write_text("\n".join(lines) + ("\n" if lines else ""))
        print(f"  findings written to {args.report}")
    if r.interrupted:
        print("interrupted: run the same command again to continue where it stopped")
        return 130
    return 1 if r.unreadable or r.sites_down else 0


def run_backup(args: argparse.Namespace) -> int:
    import dataclasses

    from pacsgrid.jobs.backup import backup, backups, describe

    settings = settings_from(args)
    if args.out is not None:
        settings = dataclasses.replace(
            settings, backup=dataclasses.replace(settings.backup, dir=args.out.resolve())
        )
    setup_logging(settings, quiet=True)
    if args.list:
        found = backups(settings.backup_dir)
        for m in found:
            print(describe(m))
        if not found:
            print(f"no backups in {settings.backup_dir}")
        return 0
    m = backup(settings, verify=not args.no_verify, keep=args.keep)
    print(f"backup written: {settings.backup_dir / m.name}")
    print(f"  {describe(m)}; took {m.seconds:.1f}s")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from pacsgrid.jobs.backup import restore

    settings = settings_from(args)
    setup_logging(settings, quiet=True)
    m = restore(settings, args.backup, force=args.force)
    counts = ", ".join(f"{k} {v}" for k, v in m.counts.items()) or "counts unknown"
    print(f"restored {args.backup} into {display_url(settings.database_url)}")
    print(f"  backup point: {counts}")
    print("  next: 'pacsgrid reindex --reconcile' indexes what was stored after the backup")
    return 0
