"""The web server as a node component (see pacsgrid.node): it runs in the supervisor process
when there are several DICOM workers, in the one process otherwise, on a socket `pacsgrid
serve` bound before anything started (so a taken port fails start-up with one line).

Connections are served by `_Connection`, aiohttp's protocol with two changes: a connection
that has not sent a complete request head within `http.idle_timeout` seconds (idle between
requests, or headers trickling in) is closed, and a request aiohttp cannot parse gets a short
problem document that repeats nothing of what was sent (aiohttp's own page quotes the request
line: whatever a client sent would be reflected back).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from aiohttp import web

from pacsgrid.archive import Archive
from pacsgrid.web.app import make_app
from pacsgrid.web.problems import problem_response

log = logging.getLogger("pacsgrid.web")


class _Connection(web.RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("error serving %s", request.remote, exc_info=exc)
            return problem_response(500, "internal error (see the server log)", close=True)
        log.info("unreadable HTTP request from %s (%s)", request.remote, type(exc).__name__)
        return problem_response(status, "malformed HTTP request", close=True)


class WebComponent:
    name = "web"

    def __init__(
        self, archive: Archive, sock: socket.socket, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.archive = archive
        self.sock = sock
        self.ssl_context = ssl_context

    async def run(self, stop: asyncio.Event) -> None:
        app = make_app(self.archive)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        server = runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        idle = self.archive.settings.http.idle_timeout

        def connection() -> _Connection:
            # aiohttp closes a connection whose handler waits for a request head longer than
            # keepalive_timeout, counted from the connection or the last response (data
            # arriving does not reset it): that is the idle and the slow-header timeout.
            return _Connection(
                server,
                loop=loop,
                keepalive_timeout=idle,
                access_log=None,  # type: ignore[arg-type]  # None turns access logs off
                logger=log,
            )

        listener = await loop.create_server(
            connection, sock=self.sock, ssl=self.ssl_context, backlog=128
        )
        host, port = self.sock.getsockname()[:2]
        scheme = "https" if self.ssl_context else "http"
        log.info(
            "web server on %s://%s:%d (DICOMweb at /dicom-web, dashboard at /); auth %s",
            scheme,
            host,
            port,
            "on" if self.archive.settings.web_auth_required else "off (loopback only)",
        )
        try:
            await stop.wait()
        finally:
            listener.close()
            await runner.cleanup()
