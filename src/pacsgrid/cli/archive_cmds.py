"""Commands that work on an archive without serving it: import, status, config-reference."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import asdict

from pacsgrid.archive import Archive, display_url
from pacsgrid.cli.common import add_archive_options, human_bytes, settings_from, setup_logging
from pacsgrid.migrate.importer import import_paths
from pacsgrid.progress import Progress
from pacsgrid.settings import describe_settings


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "import",
        help="store DICOM files and folders in the archive",
        description="Store files and folders (recursively, any file names) "
        "through the same ingest path as C-STORE. DICOMDIR and non-DICOM files "
        "are skipped and counted. Safe to re-run: stored objects are skipped.",
    )
    add_archive_options(p)
    p.add_argument("paths", nargs="+", type=_path, metavar="PATH")
    p.add_argument("--jobs", type=int, default=8, help="files stored in parallel (default 8)")
    p.set_defaults(func=run_import)

    p = sub.add_parser("status", help="what the archive holds, per level and per site")
    add_archive_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_status)

    p = sub.add_parser("config-reference", help="print the reference of every setting")
    p.set_defaults(func=lambda args: print(describe_settings()) or 0)


def _path(text: str):  # type: ignore[no-untyped-def]
    from pathlib import Path

    return Path(text)


def run_import(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings, quiet=sys.stderr.isatty())
    archive = Archive(settings, probe_interval=0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with Progress("import") as progress:
            summary = import_paths(
                archive, args.paths, jobs=max(1, args.jobs), progress=progress, stop=stop
            )
            elapsed = progress.summary()
    finally:
        archive.close()
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary.skipped.items()))
    print(
        f"stored {summary.stored} ({human_bytes(summary.bytes)}), duplicates "
        f"{summary.duplicates}, skipped {summary.skipped_total}"
        f"{' (' + skipped + ')' if skipped else ''}, failed {len(summary.failed)}"
    )
    for path, reason in summary.failed[:50]:
        print(f"  failed: {path}: {reason}")
    if len(summary.failed) > 50:
        print(f"  ... and {len(summary.failed) - 50} more (see the log)")
    print(f"  {elapsed}")
    if summary.interrupted:
        print("interrupted: run the same command again to continue")
        return 130
    return 1 if summary.failed else 0


def run_status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings, quiet=True)
    archive = Archive(settings, probe_interval=0)
    try:
        st = archive.status()
    finally:
        archive.close()
    if args.json:
        print(json.dumps(asdict(st), indent=2))
        return 0
    i = st.index
    print(
        f"patients {i.patients}  studies {i.studies}  series {i.series}  "
        f"instances {i.instances}  bytes {i.bytes} ({human_bytes(i.bytes)})"
    )
    print(f"index: {display_url(settings.database_url)}")
    for s in st.sites:
        state = "up" if s.up else f"DOWN ({s.reason})"
        free = f", {human_bytes(s.free_bytes)} free" if s.free_bytes is not None else ""
        print(
            f"site {s.name} [{s.role}, {s.location}] {s.url}: {state}; {s.objects} objects, "
            f"{human_bytes(s.bytes)}{free}"
        )
    return 0
