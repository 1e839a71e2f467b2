"""One archive node: DICOM workers plus the node's background components.

Layout of a running `pacsgrid serve`:
- with one worker: one process, one event loop, running the DICOM server and every component;
- with N workers: a supervisor process binds the DICOM port once and starts N worker processes
  that inherit the listening socket (each runs a DICOM server and nothing else); the supervisor
  runs the components (background jobs, the web face) and restarts a worker that dies. A worker
  never outlives its supervisor: the kernel sends it SIGTERM when the supervisor dies, even by
  SIGKILL (PR_SET_PDEATHSIG), and it watches its parent's pid as well; it then stops accepting
  and ends like on any SIGTERM. Workers also inherit the serve lock (pacsgrid.served), so a new
  `serve` of the archive waits for them rather than sharing the port with them.

A component is anything with `name` and `async run(stop)`: it works until `stop` is set, then
returns. `components()` lists what a node runs; a feature adds its line there.

The jobs (repair, the fixity audit, forwarding, commitment reports, the backup schedule, a
reindex) are built here, and only here, from the archive and the collaborators they need of it
(its index, typed by the part they use, its placement, its cache tier): no front end and no job
reaches behind the archive for them (tests/test_layout.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pacsgrid.archive import FORWARD, Archive
from pacsgrid.dicom.accept import RETIRED, LoadBoard
from pacsgrid.dicom.server import DicomServer
from pacsgrid.jobs.forward import Forwarder

if TYPE_CHECKING:
    from pacsgrid.jobs.fixity import Auditor
    from pacsgrid.jobs.reindex import Reindexer
    from pacsgrid.jobs.repair import Repairer
    from pacsgrid.progress import Progress
    from pacsgrid.settings import SiteSettings

log = logging.getLogger("pacsgrid.node")


class Component(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None: ...


@dataclass
class Listeners:
    """Sockets `pacsgrid serve` bound before anything started (so that a port in use fails
    start-up with one clear line): DICOM (None: TLS only), DICOM TLS, HTTP, HL7 (MLLP)."""

    dicom: socket.socket | None
    tls: socket.socket | None = None
    http: socket.socket | None = None
    hl7: socket.socket | None = None


def components(archive: Archive, listeners: Listeners | None = None) -> list[Component]:
    """Background components of this node, built from the archive's settings."""
    from pacsgrid.jobs.fixity import AuditComponent
    from pacsgrid.jobs.repair import RepairComponent

    index, placement = archive._index, archive._placement
    out: list[Component] = [
        RepairComponent(archive, index, placement, archive._cache),
        AuditComponent(archive, index, placement),
    ]
    if archive.settings.forward or archive.work_counts(FORWARD).get("pending"):
        out.append(Forwarder(archive, index))
    if any("store" in p.allow for p in archive.settings.peers) or archive.commitment.pending(1):
        from pacsgrid.jobs.commitment import CommitmentReporter

        out.append(CommitmentReporter(archive, index))  # storage commitment reports
    if listeners is not None and listeners.http is not None:
        from pacsgrid.web import WebComponent

        ssl_context = None
        if archive.settings.http.tls:
            from pacsgrid.tls import server_context

            ssl_context = server_context(archive.settings.dicom, verify_clients=False)
        out.append(WebComponent(archive, listeners.http, ssl_context))
    if listeners is not None and listeners.hl7 is not None:
        from pacsgrid.hl7.listener import Hl7Listener

        out.append(Hl7Listener(archive, listeners.hl7))
    if archive.settings.backup.interval > 0:
        from pacsgrid.jobs.backup import BackupSchedule

        out.append(BackupSchedule(archive.settings, index))
    return out


def repairer(
    archive: Archive, *, rate_mb: float | None = None, jobs: int | None = None
) -> Repairer:
    """A repair of the archive (`pacsgrid repair`; defaults from `repair.*`)."""
    from pacsgrid.jobs.repair import Repairer

    return Repairer(archive, archive._index, archive._placement, rate_mb=rate_mb, jobs=jobs)


def auditor(archive: Archive, *, rate_mb: float = 0.0, jobs: int = 2) -> Auditor:
    """A fixity audit of the archive's copies (`pacsgrid audit`)."""
    from pacsgrid.jobs.fixity import Auditor

    return Auditor(archive, archive._index, archive._placement, rate_mb=rate_mb, jobs=jobs)


def adopt_site(archive: Archive, name: str) -> int:
    """`pacsgrid sites init NAME` (see pacsgrid.jobs.repair.adopt_site)."""
    from pacsgrid.jobs.repair import adopt_site

    return adopt_site(archive._index, archive._placement, name)


def reindexer(
    archive: Archive,
    site_settings: Sequence[SiteSettings],
    *,
    jobs: int = 2,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> Reindexer:
    """A reindex of the archive's sites named in `site_settings` into its index."""
    from pacsgrid.jobs.reindex import Reindexer

    names = {s.name for s in site_settings}
    sites = [s for s in archive._sites if s.name in names]
    return Reindexer(archive._index, sites, site_settings, jobs=jobs, progress=progress, stop=stop)


def _dicom_server(
    archive: Archive, listeners: Listeners, board: LoadBoard | None = None
) -> DicomServer:
    tls_context = None
    if listeners.tls is not None:
        from pacsgrid.tls import server_context

        tls_context = server_context(archive.settings.dicom)
    return DicomServer(
        archive, listeners.dicom, tls_sock=listeners.tls, tls_context=tls_context, board=board
    )


async def _run_components(
    archive: Archive, stop: asyncio.Event, listeners: Listeners | None = None
) -> None:
    tasks = [
        asyncio.create_task(_guard(c, stop), name=c.name) for c in components(archive, listeners)
    ]
    if tasks:
        await asyncio.gather(*tasks)


async def _guard(component: Component, stop: asyncio.Event) -> None:
    """Run a component; if it crashes, log it and start it again (with a pause)."""
    while not stop.is_set():
        try:
            await component.run(stop)
            return
        except Exception:
            log.exception("component %s failed; restarting it in 10s", component.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def run_single(archive: Archive, listeners: Listeners, grace: float) -> None:
    """One process: DICOM server and components on one event loop."""

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        archive.warm()
        server = _dicom_server(archive, listeners)
        await server.start()
        background = asyncio.create_task(_run_components(archive, stop, listeners))
        await stop.wait()
        log.info("stopping: no new associations")
        await server.shutdown(grace)
        await background

    try:
        asyncio.run(main())
    finally:
        archive.close()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_supervisor(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM when its supervisor dies (Linux), and exit at
    once if it already has (it may die between starting us and this call)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the pid watch remains
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor:
        raise SystemExit(f"pacsgrid worker: supervisor pid {supervisor} is gone; not starting")


async def _watch_supervisor(supervisor: int, stop: asyncio.Event) -> None:
    """Stop when the parent is no longer `supervisor` (where PR_SET_PDEATHSIG is missing)."""
    while not stop.is_set():
        if os.getppid() != supervisor:
            log.error("supervisor pid %d is gone: this worker stops", supervisor)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def run_worker(
    archive: Archive,
    listeners: Listeners,
    board: LoadBoard | None,
    grace: float,
    supervisor: int | None = None,
) -> None:
    """A worker process: the DICOM server only (the supervisor runs the components)."""

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        archive.warm()
        server = _dicom_server(archive, listeners, board)
        await server.start()
        watch = None
        if supervisor is not None:
            watch = asyncio.create_task(_watch_supervisor(supervisor, stop))
        log.info("worker ready: accepting DICOM associations")
        await stop.wait()
        await server.shutdown(grace)
        if watch is not None:
            await watch

    try:
        asyncio.run(main())
    finally:
        archive.close()


async def _recover_after(archive: Archive, pid: int) -> None:
    """Index what a dead worker wrote but did not commit, now rather than at the next restart:
    its stores were never acknowledged, but a sender that gave up would otherwise leave those
    objects invisible until then."""
    try:
        report = await asyncio.to_thread(archive.recover)
    except Exception:
        log.exception("recovery after worker pid %d failed", pid)
        return
    log.info(
        "worker pid %d: its site logs and ingest journal replayed (%d record(s), %d "
        "instance(s) indexed)",
        pid,
        report.records,
        report.indexed + report.journal,
    )


def run_supervisor(
    make_archive: Callable[[], Archive],
    listeners: Listeners,
    workers: int,
    grace: float,
    inherit: tuple[int, ...] = (),
) -> None:
    """Start `workers` worker processes on the inherited socket(s); run the components here.
    `inherit`: more descriptors the workers keep open for their whole life (the serve lock)."""
    sock = listeners.dicom
    board = LoadBoard.create(workers)
    argv = [sys.executable, "-m", "pacsgrid", *sys.argv[1:]]
    argv += ["--worker-parent", str(os.getpid())]
    fds = [board.fd, *inherit]
    if sock is not None:
        fd = sock.fileno()
        os.set_inheritable(fd, True)
        argv += ["--worker-fd", str(fd)]
        fds.append(fd)
    if listeners.tls is not None:
        tls_fd = listeners.tls.fileno()
        os.set_inheritable(tls_fd, True)
        argv += ["--worker-tls-fd", str(tls_fd)]
        fds.append(tls_fd)

    def spawn(slot: int) -> subprocess.Popen[bytes]:
        # Workers ignore the terminal's SIGINT: the supervisor passes SIGTERM on, so every
        # worker shuts down the same, graceful way.
        return subprocess.Popen(
            [*argv, "--worker-board", board.describe(slot)],
            pass_fds=tuple(fds),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        children = [spawn(slot) for slot in range(workers)]
        archive = make_archive()
        background = asyncio.create_task(_run_components(archive, stop, listeners))
        replays: set[asyncio.Task[None]] = set()  # a slow replay must not delay the next poll
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
                for i, proc in enumerate(children):
                    code = proc.poll()
                    if code is not None and not stop.is_set():
                        log.error("worker pid %d exited with %s; starting another", proc.pid, code)
                        board.set(i, RETIRED)
                        await asyncio.sleep(1)  # do not spin when a worker cannot start
                        children[i] = spawn(i)
                        replay = asyncio.create_task(_recover_after(archive, proc.pid))
                        replays.add(replay)
                        replay.add_done_callback(replays.discard)
            log.info("stopping %d worker(s)", len(children))
            for proc in children:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = asyncio.get_running_loop().time() + grace + 30
            for proc in children:
                while proc.poll() is None and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.1)
                if proc.poll() is None:
                    log.error("worker pid %d did not stop; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
            await asyncio.gather(*replays)  # before the archive they use is closed
            await background
        finally:
            archive.close()
            for s in (sock, listeners.tls, listeners.http, listeners.hl7):
                if s is not None:
                    s.close()

    asyncio.run(main())
