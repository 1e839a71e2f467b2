"""The DICOM listener: each association on its own thread and event loop; graceful shutdown.

Several worker processes may accept on one inherited listening socket (see pacsgrid.node), so
both CPU cores work on DIMSE while SQLite/PostgreSQL and the filesystem see ordinary concurrent
clients; `pacsgrid.dicom.accept` gives each new association to the least busy worker.

Within a process, every association gets a thread running its own small event loop. A DICOM
association handles one request at a time, so its handlers call the archive directly and
block only their own association while an object is fsynced and indexed. That saves the
hand-off to a thread pool and back for every C-STORE, which was a quarter of the Python time
of a small-instance store.

Threads are bounded. A plain TCP connection gets no thread until its first PDU is in: it
waits in the `Lobby` on the acceptor's loop (see pacsgrid.dicom.lobby), so a flood of
connections that send nothing costs a file descriptor each, and only the newest few are kept.
A worker then holds at most `dicom.max_associations` association threads, at most
`dicom.max_associations_per_host` from one address. When a new association finds the worker
full, a thread whose connection is not an association (a TLS connection still in its
handshake or without its request, one whose association ended and that waits for the peer to
close) is closed to make room, as if its ARTIM timer had expired; when every thread serves a
live association, the request is rejected (transient, "local limit exceeded") on the
acceptor's own loop; a few such rejections run at once, beyond those the connection is
closed.

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
from pacsgrid.dicom.admission import Admission
from pacsgrid.dicom.lobby import Lobby
from pacsgrid.dicom.logs import Throttle
from pacsgrid.dicom.scp import ServerAssociation, ServiceContext

log = logging.getLogger("pacsgrid.dicom")

_REFUSING_AT_ONCE = 32  # rejections in progress on the acceptor's loop; beyond: closed
_EVICTED = Throttle()
_REFUSED = Throttle()
_UNSET = Throttle()


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind the DICOM port (raises OSError with the reason when it is taken)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(addr)
    sock.listen(socket.SOMAXCONN)  # a burst of connections waits here, not in SYN retries
    sock.setblocking(False)
    return sock


class DicomServer:
    """DIMSE on `sock`, and DICOM TLS on `tls_sock` when given (same services, same
    associations set, so shutdown treats both alike)."""

    def __init__(
        self,
        archive: Archive,
        sock: socket.socket | None,
        *,
        tls_sock: socket.socket | None = None,
        tls_context: ssl.SSLContext | None = None,
        board: LoadBoard | None = None,
    ) -> None:
        """`sock`: the plain DICOM port (None: TLS only); `board`: where the worker processes
        that accept on the same sockets publish their load (None: this process is the only
        one)."""
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
        d = archive.settings.dicom
        self.admission: Admission[ServerAssociation] = Admission(
            d.max_associations, d.max_associations_per_host
        )
        self._refusing: set[asyncio.Task[None]] = set()
        self.lobby = Lobby(
            self._first_pdu,
            capacity=d.max_associations,
            per_host=d.max_associations_per_host,
            timeout=d.artim_timeout,
            changed=self._publish_locked,
        )

    async def start(self) -> None:
        with self._lock:
            self._publish()
        listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        if self.sock is not None:
            listeners.append((self.sock, None))
        if self.tls_sock is not None and self.tls_context is not None:
            listeners.append((self.tls_sock, self.tls_context))
        for sock, context in listeners:
            acceptor = BalancedAcceptor(
                sock,
                functools.partial(self._arrived, context=context),
                load=self._load,
                board=self.board,
            )
            acceptor.start()
            self._acceptors.append(acceptor)

    def _arrived(self, conn: socket.socket, *, context: ssl.SSLContext | None) -> None:
        """A new connection: plain ones wait in the lobby, TLS ones get a thread at once."""
        try:
            host = str(conn.getpeername()[0])
        except OSError:  # reset before we got to it
            conn.close()
            return
        if context is None:
            self.lobby.enter(conn, host)
        else:
            self._start_association(conn, context, host, b"")

    def _first_pdu(self, conn: socket.socket, host: str, first: bytes) -> None:
        self._start_association(conn, None, host, first)

    def _start_association(
        self, conn: socket.socket, context: ssl.SSLContext | None, host: str, first: bytes
    ) -> None:
        assoc = ServerAssociation(self.service, first=first)
        assoc.sock = conn
        with self._lock:
            admitted, victims = self.admission.admit(host, assoc)
            if admitted:
                self._serial += 1
                thread = threading.Thread(
                    target=self._run_association,
                    args=(conn, context, assoc),
                    name=f"assoc-{self._serial}",
                    daemon=True,
                )
                self._threads.add(thread)
                self._publish()
        for victim in victims:
            victim.expire_soon()
        if victims:
            _EVICTED(
                "closed %d connection(s) that had not associated, to make room "
                "(dicom.max_associations %d, per host %d)",
                len(victims),
                self.admission.limit,
                self.admission.per_host,
            )
        if admitted:
            thread.start()
        else:
            self._refuse(conn, context, host, first)

    def _run_association(
        self, conn: socket.socket, context: ssl.SSLContext | None, assoc: ServerAssociation
    ) -> None:
        try:
            asyncio.run(self._serve_connection(conn, context, assoc))
        except Exception:
            log.exception("association thread failed")
        finally:
            with self._lock:
                self.admission.leave(assoc)
                self._threads.discard(threading.current_thread())
                self._publish()

    def _refuse(
        self, conn: socket.socket, context: ssl.SSLContext | None, host: str, first: bytes
    ) -> None:
        """Reject the association request of a connection over the limits, on this loop."""
        why = self.admission.refusal(host)
        if len(self._refusing) >= _REFUSING_AT_ONCE:
            _REFUSED("%s: connection from %s closed unanswered", why, host)
            conn.close()
            return
        _REFUSED("%s: rejecting the association request from %s", why, host)
        assoc = ServerAssociation(self.service, over_limit=why, first=first)
        task = asyncio.get_running_loop().create_task(self._serve_connection(conn, context, assoc))
        self._refusing.add(task)
        task.add_done_callback(self._refusing.discard)

    def _load(self) -> int:
        """Connections this process serves: association threads and the lobby's."""
        return len(self._threads) + len(self.lobby)

    def _publish(self) -> None:
        if self.board is not None:
            self.board.publish(self._load())

    def _publish_locked(self) -> None:
        with self._lock:
            self._publish()

    async def _serve_connection(
        self, conn: socket.socket, context: ssl.SSLContext | None, assoc: ServerAssociation
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: assoc,
                conn,
                ssl=context,
                ssl_handshake_timeout=assoc.fsm.artim if context is not None else None,
            )
        except Exception as e:  # a failed TLS handshake, a reset: this connection only
            _UNSET("connection could not be set up: %s", e)
            conn.close()
            return
        await assoc.finished()

    async def shutdown(self, grace: float) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self.lobby.close()
        for task in list(self._refusing):
            task.cancel()
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
