"""`pacsgrid sites`, `pacsgrid repair`, `pacsgrid audit`: several sites, kept whole."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from pacsgrid.archive import Archive, SiteRow
from pacsgrid.cli.common import add_archive_options, human_bytes, settings_from, setup_logging
from pacsgrid.node import adopt_site, auditor, repairer
from pacsgrid.progress import Progress


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "sites",
        help="health and contents of every storage site; 'sites init NAME' adopts a volume",
        description="Without arguments: every site's health, objects, bytes, bad and missing "
        "copies, last fixity check, and how many objects lack copies. 'sites init NAME' "
        "takes an empty volume (a wiped or replaced disk, a new bucket) into service as "
        "site NAME: writes its sentinel and queues every copy it should hold for repair.",
    )
    add_archive_options(p)
    p.add_argument("action", nargs="?", choices=("list", "init"), default="list")
    p.add_argument("name", nargs="?", help="site to initialise (with 'init')")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_sites)

    p = sub.add_parser(
        "repair",
        help="bring every object to the policy's number of copies",
        description="Compare every healthy site with the index (copies that are gone are "
        "marked missing), queue every object with fewer healthy archive copies than "
        "replication.copies, and make the copies: read a good copy, check its SHA-256, write "
        "it, record it. Interrupted, it continues where it stopped when run again.",
    )
    add_archive_options(p)
    p.add_argument("--rate", type=float, metavar="MB/S", help="bandwidth limit (default: none)")
    p.add_argument("--jobs", type=int, metavar="N", help="copies made in parallel (default 4)")
    p.add_argument(
        "--no-scan", action="store_true", help="only drain the queue (skip listing the sites)"
    )
    p.set_defaults(func=run_repair)

    p = sub.add_parser(
        "audit",
        help="re-read copies and check their SHA-256; quarantine and repair bad ones",
        description="Read copies back and compare their SHA-256 with the index. A copy that "
        "does not match is moved aside (kept as evidence under .quarantine/ with a reason "
        "file) and recreated from a good copy; a copy that is gone is recreated. By default "
        "every copy not checked since the pass began; an interrupted pass resumes.",
    )
    add_archive_options(p)
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="audit only this site (repeatable)",
    )
    p.add_argument(
        "--older-than", type=float, metavar="DAYS", help="only copies not verified for DAYS days"
    )
    p.add_argument("--limit", type=int, metavar="N", help="check at most N copies")
    p.add_argument("--rate", type=float, default=0.0, metavar="MB/S", help="bandwidth limit")
    p.add_argument("--restart", action="store_true", help="start a new pass (do not resume)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=run_audit)


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0.0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def run_sites(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings, quiet=True)
    archive = Archive(settings, probe_interval=0)
    try:
        if args.action == "init":
            if not args.name:
                print("pacsgrid: sites init needs a site NAME", file=sys.stderr)
                return 2
            queued = adopt_site(archive, args.name)
            print(
                f"site {args.name} initialised; {queued} object(s) queued for repair "
                f"(run 'pacsgrid repair', or let 'pacsgrid serve' do it)"
            )
            return 0
        sites = archive.site_report()
    finally:
        archive.close()
    rows = [_site_row(s) for s in sites.sites]
    under = sites.under_replicated
    without_good_copy = sites.without_good_copy
    summary = {
        "copies": sites.copies,
        "write_quorum": sites.write_quorum,
        "under_replicated": under,
        "without_good_copy": without_good_copy,
        "copies_queued": sites.copies_queued,
        "copies_failed": sites.copies_failed,
    }
    if args.json:
        print(json.dumps({"sites": rows, **summary}, indent=2))
        return 1 if without_good_copy else 0
    print(
        f"policy: {summary['copies']} copies, write quorum {summary['write_quorum']}; "
        f"under-replicated objects: {under}; copies queued: {summary['copies_queued']}, "
        f"given up: {summary['copies_failed']}"
    )
    if without_good_copy:
        print(
            f"NO GOOD COPY on any site: {without_good_copy} object(s) ('pacsgrid audit' lists "
            "them and recovers what a kept S3 version allows)"
        )
    for row in rows:
        state = "up" if row["up"] else f"DOWN ({row['reason']})"
        extra = ""
        if row["role"] == "cache" and row.get("capacity"):
            extra = f" of {human_bytes(row['capacity'])}"
        if "object_lock" in row:
            extra += f"; versioning {row['versioning']}, object lock {row['object_lock']}"
        print(f"{row['name']} [{row['role']}, {row['location']}] {row['url']}: {state}")
        print(
            f"    {row['objects']} objects, {human_bytes(row['bytes'])}{extra}; "
            f"bad {row['bad']}, missing {row['missing']}; last audit "
            f"{_ago(row['last_verified'])} ({row['never_verified']} never checked)"
        )
    return 1 if without_good_copy else 0


def _site_row(site: SiteRow) -> dict[str, Any]:
    """A site as `pacsgrid sites --json` prints it."""
    st, copies = site.status, site.copies
    row: dict[str, Any] = {
        "name": st.name,
        "url": st.url,
        "location": st.location,
        "role": st.role,
        "up": st.up,
        "reason": st.reason,
        "objects": st.objects,
        "bytes": st.bytes,
        "bad": copies.bad,
        "missing": copies.missing,
        "last_verified": copies.last_verified,
        "never_verified": copies.never_verified,
    }
    if st.role == "cache":
        row["capacity"] = site.capacity
    row.update(site.details)
    return row


def run_repair(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings, quiet=sys.stderr.isatty())
    archive = Archive(settings, probe_interval=0)
    stop = _stop_event()
    try:
        job = repairer(archive, rate_mb=args.rate, jobs=args.jobs)
        with Progress("repair", unit="objects") as progress:
            report = job.run(stop, progress, scan=not args.no_scan)
            elapsed = progress.summary()
        down = archive.sites_down()
    finally:
        archive.close()
    for name, reason in down:
        print(f"site {name} is DOWN and was not checked: {reason}")
    for site, n in sorted(report.missing_found.items()):
        if n:
            print(f"site {site}: {n} recorded copies were gone (marked missing)")
    for site, n in sorted(report.unindexed.items()):
        if n:
            print(f"site {site}: {n} object(s) not in the index (see 'pacsgrid reindex')")
    c = report.counts
    print(
        f"repair: {c['copied']} objects copied ({human_bytes(report.bytes)}), "
        f"{c['complete']} already complete, {report.waiting} waiting for a site, "
        f"{len(report.failed)} given up, {len(report.lost)} without a good copy"
    )
    print(f"  {elapsed}")
    _print_lost(report.lost)
    for key, error in report.failed[:20]:
        print(f"  given up: {key}: {error}")
    if stop.is_set():
        print("interrupted: run the same command again to continue")
        return 130
    bad = report.waiting or report.failed or report.lost or down
    return 1 if bad else 0


def _print_lost(sops: list[str]) -> None:
    """The objects without a good copy anywhere: named every time, until they have one."""
    for sop in sops[:50]:
        print(f"  NO GOOD COPY on any site: {sop}")
    if len(sops) > 50:
        print(f"  ... and {len(sops) - 50} more without a good copy")


def run_audit(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings, quiet=sys.stderr.isatty())
    archive = Archive(settings, probe_interval=0)
    stop = _stop_event()
    before = time.time() - args.older_than * 86400 if args.older_than is not None else None
    try:
        audit = auditor(archive, rate_mb=args.rate)
        with Progress("audit", unit="copies") as progress:
            report = audit.run(
                stop,
                progress,
                sites=args.only or None,
                before=before,
                limit=args.limit,
                resume=not args.restart,
            )
            elapsed = progress.summary()
    finally:
        archive.close()
    if args.json:
        out = {
            "counts": dict(report.counts),
            "checked": report.checked,
            "bytes": report.bytes,
            "seconds": report.seconds,
            "resumed": report.resumed,
            "findings": [asdict(f) for f in report.findings],
            "without_good_copy": report.lost,
        }
        print(json.dumps(out, indent=2))
    else:
        c = report.counts
        print(
            f"audit: {report.checked} copies checked ({human_bytes(report.bytes)}): "
            f"{c['ok']} ok, {c['corrupt']} corrupt, {c['missing']} missing, "
            f"{c['unreachable']} unreachable{' (resumed pass)' if report.resumed else ''}"
        )
        print(f"  {elapsed}")
        for f in report.findings:
            print(f"  {f.problem}: {f.site} {f.key}: {f.action}")
        _print_lost(report.lost)
    if stop.is_set():
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    unrepaired = [f for f in report.findings if not f.repaired]
    return 1 if unrepaired or report.lost else 0
