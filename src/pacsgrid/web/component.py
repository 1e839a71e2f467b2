"""The web server as a node component (see pacsgrid.node): it runs in the supervisor process
when there are several DICOM workers, in the one process otherwise, on a socket `pacsgrid
serve` bound before anything started (so a taken port fails start-up with one line)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from aiohttp import web

from pacsgrid.archive import Archive
from pacsgrid.web.app import make_app

log = logging.getLogger("pacsgrid.web")


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
        site = web.SockSite(runner, self.sock, ssl_context=self.ssl_context)
        await site.start()
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
            await runner.cleanup()
