"""The DICOM listener: each association on its own thread and event loop; graceful shutdown.

Several worker processes may accept on one inherited listening socket (see pacsgrid.node), so
both CPU cores work on DIMSE while SQLite/PostgreSQL and the filesystem see ordinary concurrent
clients; `pacsgrid.dicom.accept` gives each new association to the least busy worker.

Within a process, every association gets a thread running its own small event loop. A DICOM
association handles one request at a time, so its handlers call the archive directly and
block only their own association while an object is fsynced and indexed. That saves the
hand-off to a thread pool and back for every C-STORE, which was a quarter of the Python time
of a small-instance store.

On shutdown a server stops accepting, lets in-flight associations finish for
`dicom.shutdown_grace` seconds, aborts the rest, and waits for their threads: a store that was
under way either completes (durable and indexed) or was never acknowledged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import threading
import time

from pacsgrid.archive import Archive
from pacsgrid.dicom.accept import BalancedAcceptor, LoadBoard
from pacsgrid.dicom.scp import ServerAssociation, ServiceContext

log = logging.getLogger("pacsgrid.dicom")


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind the DICOM port (raises OSError with the reason when it is taken)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(addr)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class DicomServer:
    """DIMSE on `sock`, and DICOM TLS on `tls_sock` when given (same services, same
    associations set, so shutdown treats both alike)."""

    def __init__(
        self,
        archive: Archive,
        sock: socket.socket,
        *,
        tls_sock: socket.socket | None = None,
        tls_context: ssl.SSLContext | None = None,
        board: LoadBoard | None = None,
    ) -> None:
        """`board`: where the worker processes that accept on the same sockets publish their
        load (None: this process is the only one)."""
        self.archive = archive
        self.sock = sock
        self.tls_sock = tls_sock
        self.tls_context = tls_context
        self.service = ServiceContext(archive)
        self.board = board
        self._acceptors: list[BalancedAcceptor] = []
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._serial = 0

    async def start(self) -> None:
        with self._lock:
            self._publish()
        listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = [(self.sock, None)]
        if self.tls_sock is not None and self.tls_context is not None:
            listeners.append((self.tls_sock, self.tls_context))
        for sock, context in listeners:
            acceptor = BalancedAcceptor(
                sock,
                functools.partial(self._start_association, context=context),
                load=lambda: len(self._threads),
                board=self.board,
            )
            acceptor.start()
            self._acceptors.append(acceptor)

    def _start_association(self, conn: socket.socket, *, context: ssl.SSLContext | None) -> None:
        with self._lock:
            self._serial += 1
            thread = threading.Thread(
                target=self._run_association,
                args=(conn, context),
                name=f"assoc-{self._serial}",
                daemon=True,
            )
            self._threads.add(thread)
            self._publish()
        thread.start()

    def _run_association(self, conn: socket.socket, context: ssl.SSLContext | None) -> None:
        try:
            asyncio.run(self._serve_connection(conn, context))
        except Exception:
            log.exception("association thread failed")
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._publish()

    def _publish(self) -> None:
        if self.board is not None:
            self.board.publish(len(self._threads))

    async def _serve_connection(self, conn: socket.socket, context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, assoc = await loop.connect_accepted_socket(
                lambda: ServerAssociation(self.service),
                conn,
                ssl=context,
                ssl_handshake_timeout=30 if context is not None else None,
            )
        except Exception as e:  # a failed TLS handshake, a reset: this connection only
            log.warning("connection could not be set up: %s", e)
            conn.close()
            return
        await assoc.finished()

    async def shutdown(self, grace: float) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        live = list(self.service.associations)
        if live:
            log.info("waiting up to %.0fs for %d association(s) to finish", grace, len(live))
            deadline = time.monotonic() + grace
            while self.service.associations and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            for assoc in list(self.service.associations):
                log.warning("aborting association with %s at shutdown", assoc.describe())
                assoc.abort_soon()
        # A store under way finishes (durable + indexed) before we exit.
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 60)
        await asyncio.sleep(0)
