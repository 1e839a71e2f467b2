"""Where a new plain TCP connection waits for its first PDU: on the acceptor's loop, without a
thread, with a small buffer, for at most the ARTIM timeout.

An association thread is started only once the first PDU is there: a whole A-ASSOCIATE-RQ
(up to `pdu.MAX_ASSOCIATE_PDU`), or the header of anything else (which the state machine then
answers with A-ABORT, PS3.8 Sta2). The thread's association is handed the socket and the bytes
read so far. A flood of connections that send nothing therefore costs a file descriptor each,
and only while it fits: the lobby holds at most `capacity` connections, `per_host` from one
address, and makes room by closing the oldest (of that address first). A real peer sends its
request right after connecting, so it leaves the lobby long before it is the oldest.

DICOM TLS connections do not wait here: their handshake comes first, on their own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pacsgrid.dicom import pdu
from pacsgrid.dicom.logs import Throttle

_HEADER = struct.Struct(">BBI")
_CLOSED = Throttle()


@dataclass(eq=False)
class Waiting:
    sock: socket.socket
    host: str
    since: float = field(default_factory=time.monotonic)
    data: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None


class Lobby:
    def __init__(
        self,
        ready: Callable[[socket.socket, str, bytes], None],
        *,
        capacity: int,
        per_host: int,
        timeout: float,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        """`ready(sock, host, first_bytes)` takes over a connection whose first PDU is in;
        `changed()` is called whenever a connection enters or leaves (the load changed)."""
        self.ready = ready
        self.changed = changed
        self.capacity = capacity
        self.per_host = per_host
        self.timeout = timeout
        self._waiting: dict[int, Waiting] = {}  # by file descriptor
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def enter(self, sock: socket.socket, host: str) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self.per_host and self._from(host) >= self.per_host:
            self._leave(self._oldest(host), f"more than {self.per_host} from {host} waiting")
        if len(self._waiting) >= self.capacity:
            self._leave(self._oldest(None), f"more than {self.capacity} waiting")
        w = Waiting(sock, host)
        w.timer = loop.call_later(self.timeout, self._expired, w)
        self._waiting[sock.fileno()] = w
        loop.add_reader(sock.fileno(), self._readable, w)
        self.changed()

    def close(self) -> None:
        """Close every waiting connection (shutdown)."""
        for w in list(self._waiting.values()):
            self._drop(w)

    def _from(self, host: str) -> int:
        return sum(1 for w in self._waiting.values() if w.host == host)

    def _oldest(self, host: str | None) -> Waiting | None:
        return min(
            (w for w in self._waiting.values() if host is None or w.host == host),
            key=lambda w: w.since,
            default=None,
        )

    def _leave(self, w: Waiting | None, why: str) -> None:
        if w is not None:
            _CLOSED("closed a connection from %s that sent nothing yet: %s", w.host, why)
            self._drop(w)

    def _expired(self, w: Waiting) -> None:
        w.timer = None
        _CLOSED(
            "no A-ASSOCIATE-RQ from %s within %.0fs (dicom.artim_timeout)", w.host, self.timeout
        )
        self._drop(w)

    def _drop(self, w: Waiting) -> None:
        self._release(w)
        w.sock.close()

    def _release(self, w: Waiting) -> None:
        if self._waiting.pop(w.sock.fileno(), None) is None:
            return
        if w.timer is not None:
            w.timer.cancel()
        if self._loop is not None:
            self._loop.remove_reader(w.sock.fileno())
        self.changed()

    def _readable(self, w: Waiting) -> None:
        try:
            chunk = w.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(w)  # the peer went away before associating
            return
        w.data += chunk
        if len(w.data) < 6:
            return
        pdu_type, _, length = _HEADER.unpack_from(w.data)
        if (
            pdu_type == pdu.A_ASSOCIATE_RQ
            and length <= pdu.MAX_ASSOCIATE_PDU
            and len(w.data) < 6 + length
        ):
            return  # the rest of the request is on its way
        self._release(w)
        with contextlib.suppress(OSError):
            self.ready(w.sock, w.host, bytes(w.data))
