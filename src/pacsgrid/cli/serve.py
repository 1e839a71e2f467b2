"""`pacsgrid serve`: run an archive node (see pacsgrid.node for its processes)."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from pacsgrid import node
from pacsgrid.archive import Archive
from pacsgrid.cli.common import add_archive_options, overrides_from, setup_logging
from pacsgrid.dicom.server import listening_socket
from pacsgrid.errors import ConfigError
from pacsgrid.index import display_url
from pacsgrid.settings import Settings, load_settings

log = logging.getLogger("pacsgrid.serve")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the archive (DICOM listener)",
        description="Run the archive. With no options: DICOM on port 11112 as "
        "PACSGRID, SQLite index and one storage folder under ./pacsgrid-data.",
    )
    add_archive_options(p)
    p.add_argument("--port", type=str, help="DICOM port (default 11112)")
    p.add_argument("--bind", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--ae-title", help="AE title of the archive (default PACSGRID)")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="AET@HOST:PORT",
        help="a known peer: may query/retrieve, usable as C-MOVE destination (repeatable)",
    )
    p.add_argument("--workers", type=str, help="worker processes (default: one per CPU core)")
    p.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def settings_for(args: argparse.Namespace) -> Settings:
    ov = overrides_from(args)
    for opt, key in (
        ("port", "dicom.port"),
        ("bind", "dicom.bind"),
        ("ae_title", "dicom.ae_title"),
        ("workers", "dicom.workers"),
    ):
        value = getattr(args, opt)
        if value is not None:
            ov.values[key] = value
    ov.peers = list(args.peer)
    return load_settings(ov)


def run(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    setup_logging(settings)
    d = settings.dicom
    if args.worker_fd is not None:
        sock = socket.socket(fileno=args.worker_fd)
        sock.setblocking(False)
        node.run_worker(Archive(settings), sock, d.shutdown_grace)
        return 0

    # Prepare once, before any worker starts: create/upgrade the index schema, initialise new
    # sites, index what a crash left unindexed, and fail here, with one clear line, if
    # something is wrong.
    archive = Archive(settings, probe_interval=0)
    try:
        archive.recover()
    finally:
        archive.close()
    try:
        sock = listening_socket(d.bind, d.port)
    except OSError as e:
        raise ConfigError(
            "dicom.port", f"cannot listen on {d.bind}:{d.port}: {e.strerror or e}"
        ) from None
    workers = d.workers or os.cpu_count() or 1
    sites = ", ".join(f"{s.name}={s.url}" for s in settings.sites)
    log.info(
        "pacsgrid listening on %s:%d as %s (%d worker%s); index %s; sites %s",
        d.bind,
        d.port,
        d.ae_title,
        workers,
        "s" if workers > 1 else "",
        display_url(settings.database_url),
        sites,
    )
    if workers == 1:
        node.run_single(Archive(settings), sock, d.shutdown_grace)
    else:
        node.run_supervisor(lambda: Archive(settings), sock, workers, d.shutdown_grace)
    return 0
