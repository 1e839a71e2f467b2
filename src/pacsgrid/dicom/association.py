"""One DICOM association on one TCP connection, for either side, on asyncio.

pynetdicom runs each association in its own thread with a polling state machine, which costs
about 4.5 ms of CPU per C-STORE on this class of machine. Here the connection is an
`asyncio.BufferedProtocol`: the socket is read into one reusable buffer (asyncio's plain
`recv(256 KiB)` allocates and frees a quarter megabyte per read, ~18 us each), PDUs are framed
from it in `buffer_updated`, PDVs assembled into whole messages, and complete requests queued
for the association's task. Messages go out with one gather write (writev) of the PDU headers
and slices of the dataset, not a joined copy of the whole message. Responses to
requests *we* sent (C-STORE sub-operations of a C-GET or C-MOVE) are routed straight to the
coroutine waiting for them.

Subclasses implement the role: `pacsgrid.dicom.scp.ServerAssociation` (acceptor) and
`pacsgrid.dicom.scu.ClientAssociation` (requestor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pacsgrid.dicom import dimse, pdu
from pacsgrid.dicom.dimse import Command, Message

log = logging.getLogger("pacsgrid.dicom")

_HEADER = struct.Struct(">BBI")
_READ_SIZE = 256 * 1024  # what one read asks of the socket
_IOV_MAX = 1024  # buffers per writev (Linux)


class AssociationAborted(Exception):
    """The peer aborted, the connection dropped, or a protocol error forced an abort."""


@dataclass
class AcceptedContext:
    id: int
    abstract_syntax: str
    transfer_syntax: str
    scu: bool = True  # the requestor may send requests on it (normal direction)
    scp: bool = False  # the requestor accepts requests from us on it (C-GET storage)


class Association(asyncio.BufferedProtocol):
    def __init__(self, *, max_pdu: int, timeout: float) -> None:
        self.max_pdu = max_pdu  # what we accept
        self.peer_max_pdu = 16384  # what the peer accepts; set during negotiation
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.peer_address = ""
        self.contexts: dict[int, AcceptedContext] = {}
        self.requests: asyncio.Queue[Message | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.cancelled: set[int] = set()
        # Received bytes not yet framed are self._rbuf[self._start:self._end].
        self._rbuf = bytearray(_READ_SIZE)
        self._start = 0
        self._end = 0
        self._fd = -1  # the socket, for gather writes (-1: TLS or unknown, use the transport)
        self._parts: dict[bool, list[bytes]] = {True: [], False: []}
        self._command: Command | None = None
        self._command_ctx = 0
        self._waiters: dict[int, asyncio.Queue[Message]] = {}
        self._writable = asyncio.Event()
        self._writable.set()
        self._last_activity = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._next_message_id = 0

    # ------------------------------------------------------------------ transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport.get_extra_info("sslcontext") is None:
                self._fd = sock.fileno()
        peer = transport.get_extra_info("peername")
        self.peer_address = f"{peer[0]}:{peer[1]}" if peer else "?"
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        self._idle_handle = loop.call_later(self.timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_handle:
            self._idle_handle.cancel()
        self.closed.set()
        self._writable.set()
        self.requests.put_nowait(None)
        for q in self._waiters.values():
            q.put_nowait(Message(0, {dimse.COMMAND_FIELD: -1}))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_activity
        if self.closed.is_set():
            return
        if idle >= self.timeout and self.is_idle():
            log.warning("%s: no data for %.0fs, aborting the association", self.describe(), idle)
            self.abort()
            return
        self._idle_handle = loop.call_later(max(1.0, self.timeout - idle), self._check_idle)

    def is_idle(self) -> bool:
        """True when we are waiting for the peer (not busy on a request of theirs)."""
        return True

    def describe(self) -> str:
        return self.peer_address

    def get_buffer(self, sizehint: int) -> memoryview:
        """Room for the next read after the bytes not yet framed: moved to the front when
        the tail is short, the buffer enlarged when one PDU needs more."""
        free = len(self._rbuf) - self._end
        if free < _READ_SIZE // 4:
            pending = self._end - self._start
            if self._start:
                self._rbuf[:pending] = self._rbuf[self._start : self._end]
                self._start, self._end = 0, pending
            if len(self._rbuf) - pending < _READ_SIZE // 4:
                bigger = bytearray(max(2 * len(self._rbuf), pending + _READ_SIZE))
                bigger[:pending] = self._rbuf[:pending]
                self._rbuf = bigger
        return memoryview(self._rbuf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._last_activity = asyncio.get_running_loop().time()
        self._end += nbytes
        buf = self._rbuf
        pos = self._start
        end = self._end
        try:
            while end - pos >= 6:
                pdu_type, _, length = _HEADER.unpack_from(buf, pos)
                if end - pos - 6 < length:
                    if length > (self.max_pdu or 1 << 31) + 1024 and pdu_type == pdu.P_DATA_TF:
                        raise pdu.PDUError(
                            f"P-DATA-TF of {length} bytes exceeds our maximum "
                            f"PDU size {self.max_pdu}"
                        )
                    break
                body = memoryview(buf)[pos + 6 : pos + 6 + length]
                try:
                    self._handle_pdu(pdu_type, body)
                finally:
                    body.release()
                pos += 6 + length
                if self.closed.is_set() or self.transport is None:
                    break
        except (pdu.PDUError, ValueError) as e:
            log.warning("%s: protocol error, aborting: %s", self.describe(), e)
            self.abort(source=pdu.ABORT_SOURCE_PROVIDER, reason=pdu.ABORT_UNEXPECTED_PDU)
            return
        if pos == end:
            self._start = self._end = 0
        else:
            self._start = pos

    def _handle_pdu(self, pdu_type: int, body: memoryview) -> None:
        if pdu_type == pdu.P_DATA_TF:
            for ctx, mch, data in pdu.iter_pdvs(body):
                self._pdv(ctx, mch, data)
        elif pdu_type == pdu.A_ASSOCIATE_RQ:
            self.on_associate_rq(pdu.decode_associate_rq(bytes(body)))
        elif pdu_type == pdu.A_ASSOCIATE_AC:
            self.on_associate_ac(pdu.decode_associate_ac(bytes(body)))
        elif pdu_type == pdu.A_ASSOCIATE_RJ:
            self.on_associate_rj(pdu.decode_associate_rj(bytes(body)))
        elif pdu_type == pdu.A_RELEASE_RQ:
            self.on_release_rq()
        elif pdu_type == pdu.A_RELEASE_RP:
            self.on_release_rp()
        elif pdu_type == pdu.A_ABORT:
            self.on_abort(body[2] if len(body) > 2 else 0, body[3] if len(body) > 3 else 0)
        else:
            raise pdu.PDUError(f"unknown PDU type 0x{pdu_type:02X}")

    def _pdv(self, ctx: int, mch: int, data: memoryview) -> None:
        is_command = bool(mch & 0x01)
        parts = self._parts[is_command]
        parts.append(bytes(data))
        if not mch & 0x02:
            return
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        if is_command:
            command = dimse.decode_command(joined)
            if int(command.get(dimse.DATASET_TYPE, dimse.NO_DATASET)) == dimse.NO_DATASET:
                self._dispatch(Message(ctx, command))
            else:
                self._command, self._command_ctx = command, ctx
        else:
            if self._command is None:
                raise pdu.PDUError("dataset without a preceding command")
            msg = Message(self._command_ctx, self._command, joined)
            self._command = None
            self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        field = msg.command_field
        if field == dimse.C_CANCEL_RQ:
            self.cancelled.add(int(msg.command.get(dimse.MESSAGE_ID_RESPONDED, 0)))
            return
        if field & 0x8000:
            waiter = self._waiters.get(int(msg.command.get(dimse.MESSAGE_ID_RESPONDED, -1)))
            if waiter is None:
                log.warning(
                    "%s: unexpected %s", self.describe(), dimse.COMMAND_NAMES.get(field, hex(field))
                )
                return
            waiter.put_nowait(msg)
            return
        self.requests.put_nowait(msg)

    # ------------------------------------------------------------------ hooks
    def on_associate_rq(self, rq: pdu.AssociateRQ) -> None:
        raise pdu.PDUError("unexpected A-ASSOCIATE-RQ")

    def on_associate_ac(self, ac: pdu.AssociateAC) -> None:
        raise pdu.PDUError("unexpected A-ASSOCIATE-AC")

    def on_associate_rj(self, rj: pdu.AssociateRJ) -> None:
        raise pdu.PDUError("unexpected A-ASSOCIATE-RJ")

    def on_release_rq(self) -> None:
        self.send_raw(pdu.RELEASE_RP)
        self.close()

    def on_release_rp(self) -> None:
        self.close()

    def on_abort(self, source: int, reason: int) -> None:
        log.info(
            "%s: peer aborted the association (source %d, reason %d)",
            self.describe(),
            source,
            reason,
        )
        self.close()

    # ------------------------------------------------------------------ sending
    def send_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_message(
        self, context_id: int, command: Command, dataset: bytes | memoryview | None = None
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            raise AssociationAborted("connection closed")
        command[dimse.DATASET_TYPE] = dimse.NO_DATASET if dataset is None else dimse.HAS_DATASET
        pieces: list[bytes | memoryview] = pdu.encode_pdata(
            context_id, dimse.encode_command(command), True, self.peer_max_pdu
        )
        if dataset is not None:
            pieces += pdu.encode_pdata(context_id, dataset, False, self.peer_max_pdu)
        self._write(pieces)

    def _write(self, pieces: list[bytes | memoryview]) -> None:
        """Send now with writev while nothing is queued before us; what the socket does not
        take (or everything, on TLS) goes through the transport, which sends it when it can."""
        assert self.transport is not None
        if self._fd >= 0 and not self.transport.get_write_buffer_size():
            while pieces:
                try:
                    n = os.writev(self._fd, pieces[:_IOV_MAX])
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # let the transport meet the error and close the connection
                while n and pieces:
                    if n >= len(pieces[0]):
                        n -= len(pieces[0])
                        pieces.pop(0)
                    else:
                        pieces[0] = memoryview(pieces[0])[n:]
                        n = 0
        if pieces:
            self.transport.writelines(pieces)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if not self._writable.is_set():
            await self._writable.wait()
        if self.closed.is_set():
            raise AssociationAborted("connection closed")

    def new_message_id(self) -> int:
        self._next_message_id = (self._next_message_id % 0xFFFF) + 1
        return self._next_message_id

    async def request(
        self,
        context_id: int,
        command: Command,
        dataset: bytes | memoryview | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Send a request and wait for its (final, non-pending) response."""
        async for rsp in self.request_stream(context_id, command, dataset, timeout):
            if dimse.status_category(int(rsp.command.get(dimse.STATUS, 0))) != "pending":
                return rsp
        raise AssociationAborted("no final response")

    async def request_stream(
        self,
        context_id: int,
        command: Command,
        dataset: bytes | memoryview | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Message]:
        """Send a request; yield every response to it (pending ones, then the final one)."""
        msg_id = self.new_message_id()
        command[dimse.MESSAGE_ID] = msg_id
        q: asyncio.Queue[Message] = asyncio.Queue()
        self._waiters[msg_id] = q
        try:
            self.send_message(context_id, command, dataset)
            await self.drain()
            while True:
                rsp = await asyncio.wait_for(q.get(), timeout or self.timeout)
                if rsp.command_field == -1:
                    raise AssociationAborted("association closed while waiting for a response")
                yield rsp
                if dimse.status_category(int(rsp.command.get(dimse.STATUS, 0))) != "pending":
                    return
        except TimeoutError:
            raise AssociationAborted("timed out waiting for a response") from None
        finally:
            self._waiters.pop(msg_id, None)

    async def c_store(
        self,
        context_id: int,
        sop_class: str,
        sop_uid: str,
        dataset: bytes | memoryview,
        *,
        originator: tuple[str, int] | None = None,
    ) -> tuple[int, str]:
        """Send one instance; return (status, error comment)."""
        cmd: dimse.Command = {
            dimse.AFFECTED_SOP_CLASS: sop_class,
            dimse.COMMAND_FIELD: dimse.C_STORE_RQ,
            dimse.PRIORITY: 0,
            dimse.AFFECTED_SOP_INSTANCE: sop_uid,
        }
        if originator is not None:
            cmd[dimse.MOVE_ORIGINATOR_AE] = originator[0]
            cmd[dimse.MOVE_ORIGINATOR_ID] = originator[1]
        rsp = await self.request(context_id, cmd, dataset)
        return int(rsp.command.get(dimse.STATUS, 0)), str(rsp.command.get(dimse.ERROR_COMMENT, ""))

    def abort(self, source: int = pdu.ABORT_SOURCE_USER, reason: int = 0) -> None:
        self.send_raw(pdu.encode_abort(source, reason))
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ------------------------------------------------------------------ negotiation helpers
    def context_for(
        self, abstract_syntax: str, transfer_syntaxes: Sequence[str] | None = None
    ) -> AcceptedContext | None:
        for ctx in self.contexts.values():
            if ctx.abstract_syntax == abstract_syntax and (
                transfer_syntaxes is None or ctx.transfer_syntax in transfer_syntaxes
            ):
                return ctx
        return None
