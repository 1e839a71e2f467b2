"""The DICOM listener: one asyncio server per worker process, graceful shutdown.

Several worker processes may accept on one inherited listening socket (see pacsgrid.node), so
both CPU cores work on DIMSE while SQLite/PostgreSQL and the filesystem see ordinary concurrent
clients. On shutdown a server stops accepting, lets in-flight associations finish for
`dicom.shutdown_grace` seconds, aborts the rest, and waits for the stores already handed to
the thread pool: they either complete (durable and indexed) or were never acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor

from pacsgrid.archive import Archive
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
    ) -> None:
        self.archive = archive
        self.sock = sock
        self.tls_sock = tls_sock
        self.tls_context = tls_context
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="dicom")
        self.service = ServiceContext(archive, self.executor)
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(
            await loop.create_server(lambda: ServerAssociation(self.service), sock=self.sock)
        )
        if self.tls_sock is not None and self.tls_context is not None:
            self._servers.append(
                await loop.create_server(
                    lambda: ServerAssociation(self.service),
                    sock=self.tls_sock,
                    ssl=self.tls_context,
                    ssl_handshake_timeout=30,
                )
            )

    async def shutdown(self, grace: float) -> None:
        for server in self._servers:
            server.close()
        live = list(self.service.associations)
        if live:
            log.info("waiting up to %.0fs for %d association(s) to finish", grace, len(live))
            deadline = asyncio.get_running_loop().time() + grace
            while self.service.associations and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            for assoc in list(self.service.associations):
                log.warning("aborting association with %s at shutdown", assoc.describe())
                assoc.abort()
        # Stores already in the thread pool finish (durable + indexed) before we exit.
        self.executor.shutdown(wait=True)
        await asyncio.sleep(0)
