"""One DICOM association on one TCP connection, for either side, on asyncio.

pynetdicom runs each association in its own thread with a polling state machine, which costs
about 4.5 ms of CPU per C-STORE on this class of machine. Here the connection is an
`asyncio.BufferedProtocol`: the socket is read into one reusable buffer (asyncio's plain
`recv(256 KiB)` allocates and frees a quarter megabyte per read, ~18 us each), PDUs are framed
from it in `buffer_updated`, PDVs assembled into whole messages, and complete requests queued
for the association's task. A dataset that grows past `spill_threshold` goes on arriving into
the spool `spool_for` gives (the acceptor's C-STORE: a spill file, see pacsgrid.archive.spool),
so that a large object never sits in memory. Messages go out with one gather write (writev)
of the PDU headers and slices of the dataset, not a joined copy of the whole message. Responses to
requests *we* sent (C-STORE sub-operations of a C-GET or C-MOVE) are routed straight to the
coroutine waiting for them.

What may happen when is decided by the upper layer state machine of PS3.8
(`pacsgrid.dicom.fsm`): this class frames PDUs and reports each as an event, and carries out
the actions the machine asks for. A PDU is read whole only when the action of its event reads
it, and only up to the limit for its type (`pacsgrid.dicom.pdu.MAX_ASSOCIATE_PDU`, our maximum
PDU length for P-DATA-TF); before an association exists nothing but an A-ASSOCIATE-RQ is
read at all, and the ARTIM timer bounds how long a peer may take to send it.

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
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from pacsgrid.dicom import dimse, pdu
from pacsgrid.dicom.dimse import Command, Message
from pacsgrid.dicom.fsm import (
    READS_PDU,
    TABLE,
    Abort,
    Event,
    Indication,
    State,
    StateMachine,
    Violation,
)
from pacsgrid.dicom.logs import Throttle

if TYPE_CHECKING:
    from pacsgrid.archive import Spool

log = logging.getLogger("pacsgrid.dicom")
_GARBAGE = Throttle()

_HEADER = struct.Struct(">BBI")
_FIRST_READ = 16 * 1024  # the buffer until the association is established
_READ_SIZE = 256 * 1024  # what one read asks of the socket once it is
_IOV_MAX = 1024  # buffers per writev (Linux)
_ASSOCIATED = frozenset(range(State.STA6, State.STA12 + 1))

_EVENT_OF_PDU = {
    pdu.A_ASSOCIATE_RQ: Event.EVT6,
    pdu.A_ASSOCIATE_AC: Event.EVT3,
    pdu.A_ASSOCIATE_RJ: Event.EVT4,
    pdu.P_DATA_TF: Event.EVT10,
    pdu.A_RELEASE_RQ: Event.EVT12,
    pdu.A_RELEASE_RP: Event.EVT13,
    pdu.A_ABORT: Event.EVT16,
}

# Queued for the association's task in place of a request: the peer asked for release
# (answered once every request received before it has been answered).
RELEASE_REQUESTED = Message(0, {dimse.COMMAND_FIELD: -2})


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
    requestor = False  # which side of the association this is (PS3.8 calls it the role)

    def __init__(self, *, max_pdu: int, timeout: float, artim: float = 10.0) -> None:
        self.max_pdu = max_pdu  # what we accept
        self.peer_max_pdu = 16384  # what the peer accepts; set during negotiation
        self.timeout = timeout
        self.fsm = StateMachine(self, requestor=self.requestor, artim=artim)
        self.transport: asyncio.Transport | None = None
        self.peer_address = ""
        self.contexts: dict[int, AcceptedContext] = {}
        self.requests: asyncio.Queue[Message | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.cancelled: set[int] = set()
        # Received bytes not yet framed are self._rbuf[self._start:self._end].
        self._read_size = _FIRST_READ  # _READ_SIZE once associated
        self._rbuf = bytearray(_FIRST_READ)
        self._start = 0
        self._end = 0
        self._skip = 0  # bytes of a PDU body still to be dropped unread
        self._unframed = False  # an unknown PDU type: the stream can no longer be framed
        self._fd = -1  # the socket, for gather writes (-1: TLS or unknown, use the transport)
        self._parts: dict[bool, list[bytes]] = {True: [], False: []}
        self._dataset_bytes = 0  # of the dataset being received in memory (self._parts)
        self._spool: Spool | None = None  # the dataset being received, once it spilled
        self.spill_threshold = 0  # a larger dataset may go to `spool_for` (0: never)
        self._command: Command | None = None
        self._command_ctx = 0
        self._waiters: dict[int, asyncio.Queue[Message]] = {}
        self._writable = asyncio.Event()
        self._writable.set()
        self._last_activity = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._next_message_id = 0

    @property
    def state(self) -> State:
        return self.fsm.state

    @property
    def established(self) -> bool:
        return self.fsm.state in _ASSOCIATED

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
        self._last_activity = asyncio.get_running_loop().time()
        self.transport_connected()

    def transport_connected(self) -> None:
        """Evt5 on the acceptor (the requestor overrides it with Evt2)."""
        self.fsm.handle(Event.EVT5)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fsm.state != State.STA1:
            self.fsm.handle(Event.EVT17)
        if self._idle_handle:
            self._idle_handle.cancel()
        self.closed.set()
        self._writable.set()
        if self._spool is not None:  # a dataset the peer never finished
            self._spool.close()
            self._spool = None
        self.requests.put_nowait(None)
        for q in self._waiters.values():
            q.put_nowait(Message(0, {dimse.COMMAND_FIELD: -1}))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ------------------------------------------------------------------ idle timer
    def _associated(self) -> None:
        """The association is established (AE-3 or AE-7): room for large PDUs, and the idle
        timer of `timeout` (the ARTIM timer covers the states before and after)."""
        self._read_size = _READ_SIZE
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        self._idle_handle = loop.call_later(self.timeout, self._check_idle)

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_activity
        if self.closed.is_set() or not self.established:
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

    # ------------------------------------------------------------------ receiving
    def get_buffer(self, sizehint: int) -> memoryview:
        """Room for the next read after the bytes not yet framed: moved to the front when
        the tail is short, the buffer enlarged when one PDU needs more."""
        size = self._read_size
        free = len(self._rbuf) - self._end
        if free < size // 4:
            pending = self._end - self._start
            if self._start:
                self._rbuf[:pending] = self._rbuf[self._start : self._end]
                self._start, self._end = 0, pending
            if len(self._rbuf) - pending < size // 4:
                bigger = bytearray(max(2 * len(self._rbuf), pending + size))
                bigger[:pending] = self._rbuf[:pending]
                self._rbuf = bigger
        return memoryview(self._rbuf)[self._end :]

    def feed(self, data: bytes) -> None:
        """Bytes read from the connection before this protocol owned it."""
        if len(self._rbuf) - self._end < len(data):
            bigger = bytearray(self._end + len(data) + self._read_size)
            bigger[: self._end] = self._rbuf[: self._end]
            self._rbuf = bigger
        self._rbuf[self._end : self._end + len(data)] = data
        self.buffer_updated(len(data))

    def buffer_updated(self, nbytes: int) -> None:
        """Frame PDUs from the bytes received and report each to the state machine."""
        self._last_activity = asyncio.get_running_loop().time()
        self._end += nbytes
        buf = self._rbuf
        pos = self._start
        end = self._end
        fsm = self.fsm
        try:
            while pos < end:
                if self._skip:
                    n = min(self._skip, end - pos)
                    self._skip -= n
                    pos += n
                    continue
                if self._unframed or fsm.state in (State.STA1, State.STA4):
                    pos = end  # nothing more to read here: only the close is awaited
                    break
                if end - pos < 6:
                    break
                pdu_type, _, length = _HEADER.unpack_from(buf, pos)
                event = _EVENT_OF_PDU.get(pdu_type)
                if event is None:
                    self._unframed = True
                    self._violation(
                        pdu.ABORT_UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02X}"
                    )
                    continue
                if fsm.action_for(event) not in READS_PDU:
                    # Ignored or answered with an abort: the header says enough.
                    pos += 6
                    self._skip = length
                    fsm.handle(event)
                    continue
                limit = self._limit(pdu_type)
                if length > limit:
                    pos += 6
                    self._skip = length
                    self._violation(
                        pdu.ABORT_INVALID_PARAMETER,
                        f"{pdu.NAMES[pdu_type]} of {length} bytes exceeds the {limit} we read",
                    )
                    continue
                if end - pos - 6 < length:
                    break
                body = memoryview(buf)[pos + 6 : pos + 6 + length]
                pos += 6 + length
                try:
                    self._received(pdu_type, event, body)
                finally:
                    body.release()
        except (pdu.PDUError, ValueError) as e:
            self._violation(pdu.ABORT_INVALID_PARAMETER, str(e))
            pos = end
        if pos >= end:
            self._start = self._end = 0
        else:
            self._start = pos

    def _limit(self, pdu_type: int) -> int:
        if pdu_type == pdu.P_DATA_TF:
            return (self.max_pdu or 1 << 31) + pdu.PDATA_SLACK
        if pdu_type in (pdu.A_ASSOCIATE_RQ, pdu.A_ASSOCIATE_AC):
            return pdu.MAX_ASSOCIATE_PDU
        return pdu.MAX_SHORT_PDU

    def _received(self, pdu_type: int, event: Event, body: memoryview) -> None:
        """Decode a PDU its action reads (a malformed one is Evt19) and hand it over."""
        payload: Any = None
        if pdu_type == pdu.P_DATA_TF:
            payload = pdu.iter_pdvs(body)
        elif pdu_type == pdu.A_ASSOCIATE_RQ:
            payload = pdu.decode_associate_rq(bytes(body))
        elif pdu_type == pdu.A_ASSOCIATE_AC:
            payload = pdu.decode_associate_ac(bytes(body))
        elif pdu_type == pdu.A_ASSOCIATE_RJ:
            payload = pdu.decode_associate_rj(bytes(body))
        elif pdu_type == pdu.A_ABORT:
            payload = Abort(body[2], body[3]) if len(body) >= 4 else Abort()
        self.fsm.handle(event, payload)

    def _violation(self, reason: int, text: str) -> None:
        """An invalid PDU (Evt19): logged once, then aborted as the state machine says."""
        if self.fsm.state in (State.STA1, State.STA4, State.STA13):
            if self.fsm.state == State.STA13:
                self.fsm.handle(Event.EVT19, Violation(reason, text))
            return
        if self.fsm.state == State.STA2:  # anyone can connect and send garbage: throttled
            _GARBAGE("%s: protocol error before association, aborting: %s", self.describe(), text)
        else:
            log.warning("%s: protocol error, aborting: %s", self.describe(), text)
        self.fsm.handle(Event.EVT19, Violation(reason, text))

    def _pdv(self, ctx: int, mch: int, data: memoryview) -> None:
        if ctx not in self.contexts:
            raise pdu.PDUError(f"a message on presentation context {ctx}, which was not accepted")
        is_command = bool(mch & 0x01)
        if not is_command and (self._spool is not None or self._spills(len(data))):
            self._spooled(data, bool(mch & 0x02))
            return
        parts = self._parts[is_command]
        parts.append(bytes(data))
        if not mch & 0x02:
            return
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self._dataset_bytes = 0
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

    def _spills(self, more: int) -> bool:
        """Whether the dataset being received moves to a spool now (it grew past the
        threshold and the role takes it): its fragments so far go there first."""
        self._dataset_bytes += more
        if not self.spill_threshold or self._dataset_bytes <= self.spill_threshold:
            return False
        if self._command is None:
            return False  # no command: refused once the dataset is complete
        spool = self.spool_for(self._command)
        if spool is None:
            return False
        parts = self._parts[False]
        for part in parts:
            spool.write(part)
        parts.clear()
        self._dataset_bytes = 0
        self._spool = spool
        return True

    def _spooled(self, data: memoryview, last: bool) -> None:
        assert self._spool is not None and self._command is not None
        self._spool.write(data)
        if not last:
            return
        msg = Message(self._command_ctx, self._command, None, self._spool)
        self._spool = self._command = None
        self._dispatch(msg)

    def spool_for(self, command: Command) -> Spool | None:
        """Where a dataset larger than `spill_threshold` goes as it arrives (None: memory)."""
        return None

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

    # ------------------------------------------------------------------ the state machine's side
    def indicate(self, what: Indication, payload: Any) -> None:
        """A primitive for the service user (called by the state machine)."""
        if what is Indication.P_DATA:
            for ctx, mch, data in payload:
                self._pdv(ctx, mch, data)
        elif what is Indication.ASSOCIATE:
            self.on_associate_rq(payload)
        elif what is Indication.ACCEPTED:
            self._associated()
            self.on_associate_ac(payload)
        elif what is Indication.REJECTED:
            self.on_associate_rj(payload)
        elif what is Indication.RELEASE:
            self.on_release_rq()
        elif what is Indication.RELEASE_COLLISION:
            self.release_response()
        elif what is Indication.RELEASED:
            self.on_release_rp()
        elif what is Indication.ABORT:
            self.on_abort(payload.source, payload.reason)
        elif what is Indication.P_ABORT:
            self.on_provider_abort(str(payload))

    def send_pdu(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_pdata(self, message: tuple[int, bytes, bytes | memoryview | None]) -> None:
        context_id, command, dataset = message
        pieces: Iterable[bytes | memoryview] = pdu.pdata_pieces(
            context_id, command, True, self.peer_max_pdu
        )
        self._write(pieces)
        if dataset is not None:
            self._write(pdu.pdata_pieces(context_id, dataset, False, self.peer_max_pdu))

    def close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def open_transport(self) -> None:
        """AE-1: `pacsgrid.dicom.scu.connect` opens the connection right after."""

    def artim_expired(self, state: State) -> None:
        """Before the ARTIM timer closes the connection (Evt18)."""
        log.info("%s: ARTIM timer expired in %s, closing the connection", self.describe(), state)

    def provider_rejection(self, rq: pdu.AssociateRQ) -> pdu.AssociateRJ | None:
        """AE-6: an A-ASSOCIATE-RJ when the provider itself cannot take the request."""
        return None

    # ------------------------------------------------------------------ hooks
    def on_associate_rq(self, rq: pdu.AssociateRQ) -> None:
        """A-ASSOCIATE indication: answer with `accept()` or `reject()`."""

    def on_associate_ac(self, ac: pdu.AssociateAC) -> None:
        """A-ASSOCIATE confirmation (accept)."""

    def on_associate_rj(self, rj: pdu.AssociateRJ) -> None:
        """A-ASSOCIATE confirmation (reject); the connection is closed."""

    def on_release_rq(self) -> None:
        """A-RELEASE indication: answer with `release_response()` once done."""
        self.release_response()

    def on_release_rp(self) -> None:
        """A-RELEASE confirmation; the connection is closed."""

    def on_abort(self, source: int, reason: int) -> None:
        log.info(
            "%s: peer aborted the association (source %d, reason %d)",
            self.describe(),
            source,
            reason,
        )

    def on_provider_abort(self, why: str) -> None:
        """A-P-ABORT indication: the connection closed, or the provider aborted."""

    # ------------------------------------------------------------------ primitives we send
    def accept(self, ac: pdu.AssociateAC) -> None:
        """A-ASSOCIATE response (accept), Evt7."""
        self.fsm.handle(Event.EVT7, ac)
        self._associated()

    def reject(self, rj: pdu.AssociateRJ) -> None:
        """A-ASSOCIATE response (reject), Evt8."""
        self.fsm.handle(Event.EVT8, rj)

    def release_response(self) -> None:
        """A-RELEASE response, Evt14 (ignored when the association is gone meanwhile)."""
        if (self.fsm.state, Event.EVT14) in TABLE:
            self.fsm.handle(Event.EVT14)

    def abort(self, source: int = pdu.ABORT_SOURCE_USER, reason: int = 0) -> None:
        """A-ABORT request (Evt15). Before an association exists, and while waiting for the
        peer to close, there is nothing to abort: the connection is closed as if the ARTIM
        timer had expired."""
        state = self.fsm.state
        if (state, Event.EVT15) in TABLE:
            self.fsm.handle(Event.EVT15, Abort(source, reason))
        elif (state, Event.EVT18) in TABLE:
            self.fsm.handle(Event.EVT18)

    def close(self) -> None:
        """Close the connection at once, whatever the state (the loop is going away)."""
        self.close_transport()

    # ------------------------------------------------------------------ sending
    def send_message(
        self, context_id: int, command: Command, dataset: bytes | memoryview | None = None
    ) -> None:
        """P-DATA request (Evt9): one DIMSE message, fragmented to the peer's PDU size."""
        if (self.fsm.state, Event.EVT9) not in TABLE or self.transport is None:
            raise AssociationAborted(f"no association to send on ({self.fsm.state})")
        if self.transport.is_closing():
            raise AssociationAborted("connection closed")
        command[dimse.DATASET_TYPE] = dimse.NO_DATASET if dataset is None else dimse.HAS_DATASET
        self.fsm.handle(Event.EVT9, (context_id, dimse.encode_command(command), dataset))

    def _write(self, pieces: Iterable[bytes | memoryview]) -> None:
        """Send with writev, a batch of buffers at a time, while nothing is queued before us;
        what the socket does not take (or everything, on TLS) goes through the transport,
        which sends it when it can."""
        assert self.transport is not None
        it: Iterator[bytes | memoryview] = iter(pieces)
        while True:
            batch = list(islice(it, _IOV_MAX))
            if not batch:
                return
            if self._fd >= 0 and not self.transport.get_write_buffer_size():
                batch = self._writev(batch)
            if batch:
                self.transport.writelines(batch)

    def _writev(self, batch: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """Write what the socket takes now; return the rest."""
        first = 0
        while first < len(batch):
            try:
                n = os.writev(self._fd, batch[first:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # let the transport meet the error and close the connection
            while n and first < len(batch):
                size = len(batch[first])
                if n >= size:
                    n -= size
                    first += 1
                else:
                    batch[first] = memoryview(batch[first])[n:]
                    n = 0
        return batch[first:]

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
