"""`pacsgrid migrate folder|pull`, `pacsgrid verify`, `pacsgrid forward status|retry`."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path

from pacsgrid.archive import FORWARD, Archive
from pacsgrid.cli.common import add_archive_options, human_bytes, settings_from, setup_logging
from pacsgrid.errors import ConfigError
from pacsgrid.progress import Progress
from pacsgrid.settings import PeerSettings, Settings, parse_peer


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "migrate",
        help="bring a legacy archive in: a folder tree, or a PACS over DICOM",
        description="Migrate from a legacy archive, with a ledger in the index so that every "
        "run continues where the last one stopped.",
    )
    msub = p.add_subparsers(dest="what", metavar="SOURCE", required=True)

    f = msub.add_parser(
        "folder",
        help="mirror a folder tree (re-runs read only new or changed files)",
        description="Ingest every DICOM file under SRC (any names, any nesting; DICOMDIR and "
        "non-DICOM files are skipped and listed). A ledger records each file, so a re-run "
        "reads only new or changed files. Files removed from SRC are reported; nothing is "
        "ever deleted from the archive.",
    )
    add_archive_options(f)
    f.add_argument("src", type=Path, metavar="SRC")
    f.add_argument("--jobs", type=int, default=8, help="files stored in parallel (default 8)")
    f.add_argument(
        "--every",
        metavar="DURATION",
        help="repeat a pass every DURATION (e.g. 30m, 4h) until stopped; the last pass after "
        "the legacy system stops writing is the cutover",
    )
    f.add_argument(
        "--retry-failed",
        action="store_true",
        help="read files that failed before again, even if they did not change",
    )
    f.set_defaults(func=run_folder)

    q = msub.add_parser(
        "pull",
        help="pull studies from a legacy PACS (C-FIND, then C-MOVE or C-GET)",
        description="Find the studies of a legacy PACS (C-FIND at STUDY level, sliced by "
        "date when it caps its answers) and retrieve each one into this archive. With C-MOVE "
        "(the default) the source sends to this archive's AE title, so 'pacsgrid serve' must "
        "be running and the source must know its host and port; --listen receives in this "
        "process instead; --get uses C-GET (no listener). Resumable: studies already complete "
        "are never retrieved again.",
    )
    add_archive_options(q)
    q.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="AET@HOST:PORT",
        help="the legacy PACS (over DICOM TLS when a [[peers]] entry of that AE title sets tls)",
    )
    _add_study_range(q)
    q.add_argument("--window", metavar="HH:MM-HH:MM", help="retrieve only in these hours")
    q.add_argument(
        "--max-rate", type=float, default=0.0, help="instances per second at most (default: any)"
    )
    q.add_argument("--parallel", type=int, default=1, help="studies retrieved at once (default 1)")
    q.add_argument("--get", action="store_true", help="use C-GET instead of C-MOVE")
    q.add_argument(
        "--listen",
        action="store_true",
        help="receive the C-MOVE sub-operations in this process (when 'serve' is not running)",
    )
    q.add_argument(
        "--attempts", type=int, default=3, help="retrievals of an incomplete study (default 3)"
    )
    q.add_argument(
        "--retry-failed", action="store_true", help="retry studies given up in earlier runs"
    )
    q.add_argument("--ae-title", help="this archive's AE title (default: dicom.ae_title)")
    q.add_argument("--port", help="this archive's DICOM port (default: dicom.port)")
    q.set_defaults(func=run_pull)

    v = sub.add_parser(
        "verify",
        help="compare a legacy source with the archive, instance by instance; write a report",
        description="Compare a legacy PACS (--against) or folder (--folder) with the archive "
        "study by study and instance by instance (SOP Instance UIDs; for folders also the "
        "SHA-256 of the pixel data), and retrieve --sample random old studies end to end. "
        "Writes verify.csv and verify.md; exits 1 when anything is missing or mismatched.",
    )
    add_archive_options(v)
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--against",
        metavar="AET@HOST:PORT",
        help="a legacy PACS (over DICOM TLS when a [[peers]] entry of that AE title sets tls)",
    )
    src.add_argument("--folder", type=Path, metavar="SRC", help="a legacy folder tree")
    v.add_argument(
        "--out", type=Path, metavar="DIR", help="report folder (default: DATA_DIR/reports/...)"
    )
    v.add_argument(
        "--sample", type=int, default=3, help="old studies retrieved end to end (default 3)"
    )
    _add_study_range(v)
    v.add_argument("--parallel", type=int, default=2, help="associations at once (default 2)")
    v.add_argument("--jobs", type=int, default=4, help="files checked at once (default 4)")
    v.add_argument("--ae-title", help="this archive's AE title (default: dicom.ae_title)")
    v.set_defaults(func=run_verify)

    fw = sub.add_parser(
        "forward",
        help="the forwarding queue of a parallel run",
        description="Forwarding rules ([[forward]] in the config) queue each newly received "
        "instance for its peers; 'pacsgrid serve' sends them. 'status' shows the queue and "
        "what was given up; 'retry' queues given-up instances again.",
    )
    fsub = fw.add_subparsers(dest="what", metavar="ACTION", required=True)
    st = fsub.add_parser("status", help="queued, sent and given-up instances per peer")
    add_archive_options(st)
    st.add_argument("--limit", type=int, default=20, help="given-up items listed (default 20)")
    st.set_defaults(func=run_forward_status)
    rt = fsub.add_parser("retry", help="queue every given-up instance again")
    add_archive_options(rt)
    rt.set_defaults(func=run_forward_retry)


def _add_study_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="DATE", help="only studies from this StudyDate on")
    p.add_argument("--until", metavar="DATE", help="only studies up to this StudyDate")
    p.add_argument(
        "--find-limit",
        type=int,
        default=0,
        metavar="N",
        help="the source answers at most N matches per C-FIND: split queries that reach it",
    )


def _stop_event() -> threading.Event:
    """An event SIGTERM and Ctrl-C set: work in flight finishes, nothing new starts."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def run_folder(args: argparse.Namespace) -> int:
    from pacsgrid.migrate.folder import migrate_pass, parse_duration

    every = parse_duration(args.every) if args.every else 0.0
    if not args.src.is_dir():
        raise ConfigError("SRC", f"not a folder: {args.src}")
    settings = settings_from(args)
    setup_logging(settings, quiet=sys.stderr.isatty())
    archive = Archive(settings, probe_interval=0)
    stop = _stop_event()
    code = 0
    try:
        while True:
            with Progress("migrate folder") as progress:
                summary = migrate_pass(
                    archive,
                    args.src,
                    jobs=max(1, args.jobs),
                    retry_failed=args.retry_failed,
                    progress=progress,
                    stop=stop,
                )
            _print_folder(summary)
            code = 130 if summary.interrupted else (1 if summary.failed else 0)
            if not every or stop.is_set():
                break
            print(f"next pass in {args.every} (Ctrl-C to stop)", flush=True)
            if stop.wait(every):
                break
    finally:
        archive.close()
    return code


def _print_folder(s: object) -> None:
    from pacsgrid.migrate.folder import PassSummary

    assert isinstance(s, PassSummary)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(s.skipped.items()))
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} pass over {s.source}: {s.seen} files, "
        f"{s.unchanged} unchanged (not read), {s.read} read ({human_bytes(s.bytes)}): "
        f"stored {s.stored}, duplicates {s.duplicates}, "
        f"skipped {sum(s.skipped.values())}{' (' + skipped + ')' if skipped else ''}, "
        f"failed {len(s.failed)}, removed from source {len(s.removed)}"
    )
    print(
        f"  {s.seconds:.1f}s, {s.files_per_second:.1f} files/s, {s.mb_per_second:.1f} MB/s"
        f"{', changed files: ' + str(len(s.changed)) if s.changed else ''}"
    )
    for path, reason in s.failed[:50]:
        print(f"  failed: {path}: {reason}")
    if len(s.failed) > 50:
        print(f"  ... and {len(s.failed) - 50} more failures (see the log)")
    if s.failed_before:
        print(
            f"  {s.failed_before} file(s) failed in an earlier pass and did not change "
            "(--retry-failed reads them again)"
        )
    for path in s.removed[:50]:
        print(f"  removed from the source (kept in the archive): {path}")
    if len(s.removed) > 50:
        print(f"  ... and {len(s.removed) - 50} more removed")
    if s.interrupted:
        print("interrupted: run the same command again to continue")
    sys.stdout.flush()


def run_pull(args: argparse.Namespace) -> int:
    from pacsgrid.migrate.pull import PullOptions, parse_date, parse_window, pull

    peer = parse_peer(args.source, "--from")
    opts = PullOptions(
        since=parse_date(args.since, "--since") if args.since else None,
        until=parse_date(args.until, "--until") if args.until else None,
        window=parse_window(args.window) if args.window else None,
        max_rate=max(0.0, args.max_rate),
        parallel=max(1, args.parallel),
        use_get=args.get,
        listen=args.listen,
        find_limit=max(0, args.find_limit),
        attempts=max(1, args.attempts),
        retry_failed=args.retry_failed,
    )
    ov = _overrides(args)
    settings = settings_from(args, ov)
    peer = _as_configured(settings, peer)
    setup_logging(settings, quiet=sys.stderr.isatty())
    archive = Archive(settings, probe_interval=0)
    stop = _stop_event()
    try:
        with Progress("migrate pull", unit="studies") as progress:
            s = pull(archive, peer, opts, progress=progress, stop=stop)
    finally:
        archive.close()
    print(
        f"pull from {s.source}: {s.found} studies found ({s.queries} C-FIND), "
        f"{s.already_done} already complete, {s.retrieved} retrieved now; "
        f"done {s.done}, incomplete {len(s.incomplete)}, failed {len(s.failed)}"
    )
    print(
        f"  {s.instances} instances in {s.seconds:.1f}s ({s.instances_per_second:.1f} instances/s)"
    )
    for w in s.warnings:
        print(f"  warning: {w}")
    for uid, why in s.incomplete[:50]:
        print(f"  incomplete (retried next run): {uid}: {why}")
    for uid, why in s.failed[:50]:
        print(f"  failed (--retry-failed to try again): {uid}: {why}")
    if s.interrupted:
        print("interrupted: run the same command again to continue")
        return 130
    return 0 if not s.incomplete and not s.failed else 1


def _as_configured(settings: Settings, given: PeerSettings) -> PeerSettings:
    """AET@HOST:PORT from the command line; a configured peer of that AE title lends it its
    TLS settings (tls, CA, client certificate)."""
    known = settings.peer(given.ae_title)
    if known is None:
        return given
    return dataclasses.replace(known, host=given.host, port=given.port)


def _overrides(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pacsgrid.cli.common import overrides_from

    ov = overrides_from(args)
    if getattr(args, "ae_title", None):
        ov.values["dicom.ae_title"] = args.ae_title
    if getattr(args, "port", None):
        ov.values["dicom.port"] = args.port
    return ov


def run_verify(args: argparse.Namespace) -> int:
    from pacsgrid.migrate.pull import parse_date
    from pacsgrid.migrate.verify import verify_folder, verify_pacs, write_report

    peer = parse_peer(args.against, "--against") if args.against else None
    if args.folder is not None and not args.folder.is_dir():
        raise ConfigError("--folder", f"not a folder: {args.folder}")
    settings = settings_from(args, _overrides(args))
    if peer is not None:
        peer = _as_configured(settings, peer)
    setup_logging(settings, quiet=sys.stderr.isatty())
    archive = Archive(settings, probe_interval=0)
    stop = _stop_event()
    try:
        if peer is not None:
            with Progress("verify", unit="studies") as progress:
                report = verify_pacs(
                    archive,
                    peer,
                    since=parse_date(args.since, "--since") if args.since else None,
                    until=parse_date(args.until, "--until") if args.until else None,
                    find_limit=max(0, args.find_limit),
                    sample=max(0, args.sample),
                    parallel=max(1, args.parallel),
                    progress=progress,
                    stop=stop,
                )
        else:
            with Progress("verify") as progress:
                report = verify_folder(
                    archive, args.folder, jobs=max(1, args.jobs), progress=progress, stop=stop
                )
    finally:
        archive.close()
    out = args.out or settings.data_dir / "reports" / time.strftime("verify-%Y%m%d-%H%M%S")
    csv_path, md_path = write_report(report, out)
    print(md_path.read_text().rstrip())
    print(f"\nreport: {md_path}\n        {csv_path}")
    return 0 if report.ok else 1


def run_forward_status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings, quiet=True)
    archive = Archive(settings, probe_interval=0)
    try:
        counts = archive.work_counts(FORWARD)
        failures = archive.work_failures(FORWARD, max(1, args.limit))
    finally:
        archive.close()
    rules = settings.forward
    if not rules:
        print("no forwarding rules configured ([[forward]] in the config)")
    for r in rules:
        what = []
        if r.calling_ae:
            what.append("from " + ", ".join(r.calling_ae))
        if r.modality:
            what.append("modality " + ", ".join(r.modality))
        print(f"rule: forward to {r.to}{' (' + '; '.join(what) + ')' if what else ''}")
    print(
        f"queue: pending {counts.get('pending', 0)}, sent {counts.get('done', 0)}, "
        f"given up {counts.get('failed', 0)}"
    )
    for key, attempts, error in failures:
        sop, _, peer = key.rpartition(">")
        print(f"  given up after {attempts} attempts: {sop} -> {peer}: {error}")
    if failures:
        print("'pacsgrid forward retry' queues them again")
    return 1 if counts.get("failed", 0) else 0


def run_forward_retry(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings, quiet=True)
    archive = Archive(settings, probe_interval=0)
    try:
        n = archive.retry_failed_work(FORWARD)
    finally:
        archive.close()
    print(f"queued {n} given-up instance(s) again; a running 'pacsgrid serve' sends them")
    return 0
