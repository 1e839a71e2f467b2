"""Accepting connections on a listening socket that several worker processes share, so that
the least busy worker takes each new association.

Every worker's event loop is woken by each incoming connection, and asyncio's own accept loop
then takes every connection that is pending at once. Modalities that connect together (a
scanner with several senders, a migration with --parallel 4) therefore often all land on one
worker, on one core behind one GIL, while the other worker idles: four associations of small
instances stored 549 instances/s all on one worker, 650-810 spread two and two.

Here the workers publish how many associations each serves on a `LoadBoard` (a few integers
in memory the supervisor shares with them). A worker that serves no more than the least busy
of the others accepts at once; a busier one waits `step` per association it is ahead, then
accepts only if the connection is still there. So the least busy worker takes it, and a
connection still never waits more than `max_wait` when that worker is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("pacsgrid.dicom")

_SLOT = struct.Struct("=I")
RETIRED = 0xFFFFFFFF  # a slot whose worker is gone: never the least busy


class LoadBoard:
    """Live association counts of the workers sharing a port: one 32-bit slot per worker in
    a shared memory file, written only by its worker (and by the supervisor when it dies)."""

    def __init__(self, fd: int, slots: int, slot: int) -> None:
        self.fd = fd
        self.slots = slots
        self.slot = slot
        self._map = mmap.mmap(fd, slots * _SLOT.size)

    @classmethod
    def create(cls, slots: int) -> LoadBoard:
        """The supervisor's board (slot -1: it serves no associations itself)."""
        fd = os.memfd_create("pacsgrid-load", 0)
        os.ftruncate(fd, slots * _SLOT.size)
        board = cls(fd, slots, -1)
        for i in range(slots):
            board.set(i, RETIRED)
        return board

    def describe(self, slot: int) -> str:
        """What a worker is given on its command line to open the board."""
        return f"{self.fd}:{self.slots}:{slot}"

    @classmethod
    def open(cls, description: str) -> LoadBoard:
        fd, slots, slot = (int(x) for x in description.split(":"))
        return cls(fd, slots, slot)

    def set(self, slot: int, value: int) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, value)

    def publish(self, load: int) -> None:
        self.set(self.slot, load)

    def least_other(self) -> int:
        """The smallest load among the other live workers (RETIRED if there are none)."""
        return min(
            (
                _SLOT.unpack_from(self._map, i * _SLOT.size)[0]
                for i in range(self.slots)
                if i != self.slot
            ),
            default=RETIRED,
        )


class BalancedAcceptor:
    def __init__(
        self,
        sock: socket.socket,
        on_connection: Callable[[socket.socket], None],
        *,
        load: Callable[[], int],
        board: LoadBoard | None = None,
        step: float = 0.02,
        max_wait: float = 0.1,
    ) -> None:
        """`on_connection(conn)` takes over each accepted (non-blocking) connection;
        `load()`: connections this process serves now, counted from the moment they are
        handed over. Without a board (one worker) every connection is accepted at once."""
        self.sock = sock
        self.on_connection = on_connection
        self.load = load
        self.board = board
        self.step = step
        self.max_wait = max_wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        """Stop accepting (the socket stays open: other workers may still use it)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())

    def wait_before_accepting(self) -> float:
        if self.board is None:
            return 0.0
        ahead = self.load() - self.board.least_other()
        return min(self.step * ahead, self.max_wait) if ahead > 0 else 0.0

    def _readable(self) -> None:
        assert self._loop is not None
        wait = self.wait_before_accepting()
        if wait <= 0:
            self._accept_one()
            return
        # Leave it to a less busy worker; accept ourselves afterwards if it is still there.
        self._loop.remove_reader(self.sock.fileno())
        self._timer = self._loop.call_later(wait, self._after_wait)

    def _after_wait(self) -> None:
        assert self._loop is not None
        self._timer = None
        if self._closed:
            return
        self._accept_one()
        if not self._closed and self._timer is None:
            self._loop.add_reader(self.sock.fileno(), self._readable)

    def _accept_one(self) -> None:
        assert self._loop is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up
        except OSError as e:
            # Out of file descriptors or similar: stop for a second rather than spin.
            log.error("cannot accept DICOM connections: %s; retrying in 1s", e)
            self._loop.remove_reader(self.sock.fileno())
            self._timer = self._loop.call_later(1.0, self._after_wait)
            return
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.on_connection(conn)
