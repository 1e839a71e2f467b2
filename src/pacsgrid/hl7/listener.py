"""The MLLP listener (a node component, see pacsgrid.node): one task per connection.

Each connection is read one MLLP block at a time (the `hl7` package's stream reader); the
message is acted on in a worker thread (the archive's calls block) and its ACK written before
the next block is read, so the messages of a connection are applied in the order sent. A
connection silent for `hl7.idle_timeout`, a block that does not start with <VT>, or a block
larger than `hl7.max_message` closes the connection; the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from hl7.mllp import InvalidBlockError, start_hl7_server

from pacsgrid.archive import Archive
from pacsgrid.hl7.adt import answer, decode

log = logging.getLogger("pacsgrid.hl7")


class Hl7Listener:
    name = "hl7"

    def __init__(self, archive: Archive, sock: socket.socket) -> None:
        self.archive = archive
        self.sock = sock
        self._connections: set[asyncio.Task[None]] = set()
        self._inflight: set[asyncio.Future[str]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.archive.settings.hl7
        server = await start_hl7_server(self._serve, sock=self.sock, limit=settings.max_message)
        host, port = self.sock.getsockname()[:2]
        log.info("HL7 (MLLP) listener on %s:%d: ADT^A08, ADT^A40, ADT^A47", host, port)
        try:
            await stop.wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            # A message being applied is finished (not acknowledged: the sender sends it
            # again, and is answered that it was applied) before the archive closes.
            await asyncio.gather(*self._inflight, return_exceptions=True)
            await server.wait_closed()

    async def _serve(self, reader: Any, writer: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        peer = writer.get_extra_info("peername") or ("", 0)
        address = str(peer[0])
        idle = self.archive.settings.hl7.idle_timeout
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), idle)
                except TimeoutError:
                    log.info("HL7 connection from %s silent for %.0fs: closed", address, idle)
                    return
                except asyncio.IncompleteReadError:
                    return  # the sender closed the connection
                except (InvalidBlockError, ValueError) as e:
                    log.warning("HL7 connection from %s closed: %s", address, e)
                    return
                text = decode(bytes(block))
                work = loop.run_in_executor(None, answer, self.archive, text, address)
                self._inflight.add(work)
                work.add_done_callback(self._inflight.discard)
                reply = await asyncio.shield(work)
                writer.writeblock(reply.encode("utf-8", "replace"))
                await writer.drain()
        except (ConnectionError, OSError) as e:
            log.info("HL7 connection from %s lost: %s", address, e)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
