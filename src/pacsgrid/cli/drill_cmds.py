"""`pacsgrid drill`: a fault drill against a small deployment the command starts itself."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "drill",
        help="fault drill: start a test deployment here, break it, check nothing was lost",
        description="Start a small deployment on this machine (two archive nodes behind "
        "HAProxy, PostgreSQL with a standby under Patroni, a SeaweedFS cluster, a folder "
        "site), drive ingest and retrieves from several DICOM clients, inject faults one "
        "after another and overlapping (a node killed and hung, the database primary "
        "killed, a volume server killed, the folder site filled, a node cut off the "
        "network), then check every acknowledged instance by C-FIND and a byte-compare "
        "C-GET. Prints a report: per fault, the time to the first success afterwards; lost "
        "acknowledged instances (must be 0). Needs root (a network namespace, a tmpfs), "
        "patroni, etcd, haproxy and PostgreSQL; touches nothing it did not start. Exit "
        "status 0 when nothing was lost and every fault was cleared, 1 otherwise, 130 on "
        "Ctrl-C (which clears the faults and stops everything the drill started).",
    )
    p.add_argument("--short", action="store_true", help="five steps, short holds (about 3 minutes)")
    p.add_argument("--hold", type=float, help="seconds each fault is held (default 20, --short 4)")
    p.add_argument("--store-clients", type=int, default=3, metavar="N")
    p.add_argument("--retrieve-clients", type=int, default=2, metavar="N")
    p.add_argument(
        "--rate", type=float, default=4.0, help="stores per second per store client (default 4)"
    )
    p.add_argument(
        "--max-instances", type=int, default=5000, help="stores per client at most (default 5000)"
    )
    p.add_argument(
        "--max-seconds", type=float, default=1800.0, help="stop the schedule after this long"
    )
    p.add_argument(
        "--write-quorum",
        type=int,
        default=1,
        choices=(1, 2),
        help="copies (of 2: folder and S3) durable before a store is acknowledged (default 1)",
    )
    p.add_argument("--report", type=Path, metavar="FILE", help="also write the report here")
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep the deployment's files (logs, sent instances) here; default: a temporary "
        "folder removed afterwards",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacsgrid.drill.deployment import Options
    from pacsgrid.drill.procs import DrillError
    from pacsgrid.drill.run import FULL, SHORT, Plan, main

    for name, value in (("--store-clients", args.store_clients), ("--rate", args.rate)):
        if value <= 0:
            raise DrillError(f"{name} must be positive")
    plan = Plan(
        SHORT if args.short else FULL,
        hold=args.hold if args.hold is not None else (4.0 if args.short else 20.0),
        stagger=2.0 if args.short else 5.0,
        store_clients=args.store_clients,
        retrieve_clients=args.retrieve_clients,
        store_rate=args.rate,
        max_instances=args.max_instances,
        max_seconds=args.max_seconds,
        options=Options(write_quorum=args.write_quorum),
    )
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return main(args.workdir.resolve(), plan, args.report)
    tmp = Path(tempfile.mkdtemp(prefix="pacsgrid-drill-"))
    try:
        return main(tmp, plan, args.report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
