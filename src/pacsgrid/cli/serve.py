"""`pacsgrid serve`: run an archive node (see pacsgrid.node for its processes)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile

from pacsgrid import node, served
from pacsgrid.archive import Archive, display_url
from pacsgrid.cli.common import add_archive_options, overrides_from, setup_logging
from pacsgrid.dicom.accept import LoadBoard
from pacsgrid.dicom.server import listening_socket
from pacsgrid.errors import ConfigError
from pacsgrid.settings import Settings, load_settings, masked

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
    p.add_argument(
        "--workers", type=str, help="worker processes (default: one per CPU core, at least two)"
    )
    w = p.add_argument_group("web face and TLS")
    w.add_argument(
        "--http-port", type=str, help="serve DICOMweb, the dashboard and /metrics on this port"
    )
    w.add_argument("--http-bind", help="address the web server binds to (default 127.0.0.1)")
    w.add_argument(
        "--auth",
        choices=("auto", "on", "off"),
        help="web users/tokens required (default auto: on unless bound to loopback)",
    )
    w.add_argument("--viewer", metavar="DIR", help="prebuilt OHIF viewer to serve at /viewer/")
    w.add_argument("--tls-port", type=str, help="DICOM TLS port (needs --tls-cert, --tls-key)")
    w.add_argument("--tls-cert", metavar="PEM", help="certificate of the TLS listeners")
    w.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    w.add_argument("--tls-ca", metavar="PEM", help="CA bundle for client certificates")
    h = p.add_argument_group("HL7 patient updates")
    h.add_argument("--hl7-port", type=str, help="accept HL7 ADT messages (MLLP) on this port")
    h.add_argument("--hl7-bind", help="address the HL7 listener binds to (default 127.0.0.1)")
    p.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-tls-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-board", help=argparse.SUPPRESS)
    p.add_argument("--worker-parent", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def default_workers() -> int:
    """One DICOM worker process per core, at least two: with two or more, a supervisor
    restarts a worker that dies, so even a one-core machine keeps that. A worker gives each
    association a thread; two busy associations in one process share its GIL, but more
    processes than cores cost more:
    on 2 cores, four associations of 64x64 instances stored 603 instances/s over two workers
    against 569 over four (server CPU 1.78 against 2.06 ms per instance, medians of 8
    alternating rounds), 512x512 312 against 297. Processes that take turns on a core evict
    each other's caches, and each worker costs ~60 MB of memory and, on PostgreSQL, its own
    connections. (Two per core measured better only while the benchmark deleted files right
    before each ingest, a cost that fell on every new file.)"""
    return max(2, os.cpu_count() or 1)


def settings_for(args: argparse.Namespace) -> Settings:
    ov = overrides_from(args)
    for opt, key in (
        ("port", "dicom.port"),
        ("bind", "dicom.bind"),
        ("ae_title", "dicom.ae_title"),
        ("workers", "dicom.workers"),
        ("http_port", "http.port"),
        ("http_bind", "http.bind"),
        ("auth", "http.auth"),
        ("viewer", "http.viewer"),
        ("hl7_port", "hl7.port"),
        ("hl7_bind", "hl7.bind"),
        ("tls_port", "dicom.tls_port"),
        ("tls_cert", "dicom.tls_cert"),
        ("tls_key", "dicom.tls_key"),
        ("tls_ca", "dicom.tls_ca"),
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
    if args.worker_board is not None:
        if args.worker_parent is not None:
            node.die_with_supervisor(args.worker_parent)
        sock = None
        if args.worker_fd is not None:
            sock = socket.socket(fileno=args.worker_fd)
            sock.setblocking(False)
        tls_sock = None
        if args.worker_tls_fd is not None:
            tls_sock = socket.socket(fileno=args.worker_tls_fd)
            tls_sock.setblocking(False)
        board = LoadBoard.open(args.worker_board) if args.worker_board else None
        node.run_worker(
            Archive(settings),
            node.Listeners(sock, tls_sock),
            board,
            d.shutdown_grace,
            args.worker_parent,
        )
        return 0

    if any(p.tls for p in settings.peers):
        from pacsgrid.tls import check_peers

        check_peers(settings)  # a peer's bad CA, certificate or key fails here, with one line

    # The archive is ours (and stays ours while any of our processes lives): a previous server
    # of it that is still stopping (workers finishing their associations) is waited for, and a
    # restore cannot move the index aside under us.
    lock = served.hold_for_serving(settings.data_dir, wait=d.shutdown_grace + 30)

    # Prepare once, before any worker starts: create/upgrade the index schema, initialise new
    # sites, index what a crash left unindexed, and fail here, with one clear line, if
    # something is wrong.
    archive = Archive(settings, probe_interval=0)
    try:
        archive.recover()
    finally:
        archive.close()
    listeners = node.Listeners(_listen("dicom.port", d.bind, d.port) if d.port else None)
    if d.tls_port:
        from pacsgrid.tls import server_context

        server_context(d)  # a bad certificate or key fails here, with one line
        listeners.tls = _listen("dicom.tls_port", d.bind, d.tls_port)
    if settings.http.port:
        listeners.http = _listen("http.port", settings.http.bind, settings.http.port)
    if settings.hl7.port:
        listeners.hl7 = _listen("hl7.port", settings.hl7.bind, settings.hl7.port)
    workers = d.workers or default_workers()
    sites = ", ".join(f"{s.name}={masked(s.url)}" for s in settings.sites)
    log.info(
        "pacsgrid listening on %s:%s as %s (%d worker%s); index %s; sites %s",
        d.bind,
        d.port or "- (TLS only)",
        d.ae_title,
        workers,
        "s" if workers > 1 else "",
        display_url(settings.database_url),
        sites,
    )
    if d.tls_port:
        log.info("DICOM TLS on %s:%d", d.bind, d.tls_port)
    if workers == 1:
        node.run_single(Archive(settings), listeners, d.shutdown_grace)
        return 0
    # Workers count in their own processes: their metrics meet in a shared folder (see
    # pacsgrid.metrics), made fresh for this run and removed at the end.
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="pacsgrid-metrics-")
        from pacsgrid.metrics import enable_multiprocess

        enable_multiprocess(own_dir)
    try:
        node.run_supervisor(
            lambda: Archive(settings), listeners, workers, d.shutdown_grace, inherit=(lock,)
        )
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


def _listen(key: str, host: str, port: int) -> socket.socket:
    try:
        return listening_socket(host, port)
    except OSError as e:
        raise ConfigError(key, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
