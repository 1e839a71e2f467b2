"""`pacsgrid commitment`: the storage commitment reports not delivered yet, and those given up."""

from __future__ import annotations

import argparse
import time

from pacsgrid.archive import Archive
from pacsgrid.cli.common import add_archive_options, settings_from, setup_logging


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "commitment",
        help="storage commitment reports waiting for their requester",
        description="A modality asks for storage commitment; 'pacsgrid serve' verifies the "
        "instances and reports back, on the modality's association or on a new one, retrying "
        "until the report is delivered or given up (commitment.max_attempts). 'status' lists "
        "reports not yet delivered and those given up (exit status 1 if any); 'retry' queues "
        "the given-up ones again.",
    )
    csub = p.add_subparsers(dest="what", metavar="ACTION", required=True)
    st = csub.add_parser("status", help="pending, sent and given-up reports")
    add_archive_options(st)
    st.add_argument("--limit", type=int, default=20, help="reports listed per state (default 20)")
    st.set_defaults(func=run_status)
    rt = csub.add_parser("retry", help="queue every given-up report again")
    add_archive_options(rt)
    rt.set_defaults(func=run_retry)


def _archive(args: argparse.Namespace) -> Archive:
    settings = settings_from(args)
    setup_logging(settings, quiet=True)
    return Archive(settings, probe_interval=0)


def run_status(args: argparse.Namespace) -> int:
    archive = _archive(args)
    try:
        counts = archive.commitment.counts()
        pending = archive.commitment.pending(max(1, args.limit))
        given_up = archive.commitment.given_up(max(1, args.limit))
    finally:
        archive.close()
    print(
        f"storage commitment reports: pending {counts.get('pending', 0)}, "
        f"sent {counts.get('done', 0)}, given up {counts.get('failed', 0)}"
    )
    now = time.time()
    for w in pending:
        requester, _, transaction = w.key.rpartition("/")
        if w.claimed_by:
            state = f"being verified or sent by {w.claimed_by}"
        elif w.not_before > now:
            state = f"next attempt in {w.not_before - now:.0f}s"
        else:
            state = "due now"
        error = f"; last error: {w.error}" if w.error else ""
        what = f"{requester} transaction {transaction}"
        print(f"  pending: {what} ({w.attempts} attempts, {state}{error})")
    for key, attempts, error in given_up:
        requester, _, transaction = key.rpartition("/")
        what = f"{requester} transaction {transaction}"
        print(f"  given up after {attempts} attempts: {what}: {error}")
    if given_up:
        print("'pacsgrid commitment retry' queues them again")
    return 1 if counts.get("failed", 0) else 0


def run_retry(args: argparse.Namespace) -> int:
    archive = _archive(args)
    try:
        n = archive.commitment.retry_given_up()
    finally:
        archive.close()
    print(f"queued {n} given-up report(s) again; a running 'pacsgrid serve' delivers them")
    return 0
