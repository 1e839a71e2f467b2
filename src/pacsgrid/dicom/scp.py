"""The archive's DICOM services: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET, and storage
commitment's N-ACTION (pacsgrid.dicom.commitment).

A thin front end: each handler decodes the request, calls `Archive`, and encodes the answer.
Each association runs on its own thread and event loop (see pacsgrid.dicom.server), so a
handler calls the archive directly: waiting for a disk or the database holds up only the
association that asked. Errors become statuses
through `pacsgrid.dicom.status`, so every service reports the same problem the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacsgrid.dicom import dimse, pdu
from pacsgrid.dicom.association import RELEASE_REQUESTED, Association, AssociationAborted
from pacsgrid.dicom.authentication import HostResolver, PeerCertificate, mismatch
from pacsgrid.dicom.commitment import n_action
from pacsgrid.dicom.dimse import Message
from pacsgrid.dicom.fsm import Event, State
from pacsgrid.dicom.identifier import Request, decode_request, encode_elements, response_elements
from pacsgrid.dicom.logs import Throttle
from pacsgrid.dicom.negotiation import MODEL_LEVELS, QR_MODELS, negotiate, service_of
from pacsgrid.dicom.retrieve import retrieve
from pacsgrid.dicom.status import comment, failure_status
from pacsgrid.errors import InvalidDataset, PacsgridError
from pacsgrid.model import UNIQUE_KEY

if TYPE_CHECKING:
    from pacsgrid.archive import Archive, Caller, IngestResult, Spool

log = logging.getLogger("pacsgrid.dicom")


@dataclass
class ServiceContext:
    """What every association of one server shares."""

    archive: Archive
    associations: set[ServerAssociation] = field(default_factory=set)
    resolver: HostResolver = field(default_factory=HostResolver)

    @property
    def ae_title(self) -> str:
        return self.archive.settings.dicom.ae_title


class ServerAssociation(Association):
    def __init__(
        self, service: ServiceContext, *, over_limit: str = "", first: bytes = b""
    ) -> None:
        """`over_limit`: why this connection is over the server's limits (then its
        association request is rejected, transiently, with 'local limit exceeded');
        `first`: bytes already read from the connection (in the lobby)."""
        d = service.archive.settings.dicom
        super().__init__(max_pdu=d.max_pdu, timeout=d.timeout, artim=d.artim_timeout)
        self.service = service
        self.archive = service.archive
        self.spill_threshold = service.archive.spill.threshold
        self.over_limit = over_limit
        self._first = first
        self.certificate: PeerCertificate | None = None
        self.on_tls = False
        self.caller: Caller | None = None
        self.busy = False
        self.counts: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._beside: set[asyncio.Task[None]] = set()  # see `spawn`
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sock: socket.socket | None = None  # for `expire_soon` before the loop runs
        self._handoff = threading.Lock()
        self._expired = False
        self.since = time.monotonic()

    def describe(self) -> str:
        return str(self.caller) if self.caller else self.peer_address

    @property
    def waiting(self) -> bool:
        """Not (or no longer) associated: connecting, awaiting its A-ASSOCIATE-RQ (Sta2),
        or awaiting the peer's close (Sta13). Such a connection may make room for another."""
        return self.fsm.state in (State.STA1, State.STA2, State.STA13)

    def expire_soon(self) -> None:
        """From any thread: close the connection if it is still `waiting`, as if its ARTIM
        timer expired. Before its loop runs (a TLS handshake, say) the socket is shut down."""
        with self._handoff:
            self._expired = True
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._expire)
        elif self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _expire(self) -> None:
        if self.fsm.state in (State.STA2, State.STA13):
            self.fsm.handle(Event.EVT18)

    def is_idle(self) -> bool:
        return not self.busy and not self._beside

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on this association's loop beside its requests (a storage commitment
        report being prepared): meanwhile the association is not idle, and it is finished
        only when `work` is done too."""
        task = asyncio.get_running_loop().create_task(work)
        self._beside.add(task)
        task.add_done_callback(self._beside.discard)

    async def finished(self) -> None:
        """Until the connection is closed and the request being handled (and any work
        beside it) is done."""
        await self.closed.wait()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._beside:
            await asyncio.gather(*self._beside, return_exceptions=True)

    def abort_soon(self) -> None:
        """`abort()` from any thread: it runs on the association's loop once the request
        being handled (a store being made durable, say) is done."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.abort)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with self._handoff:
            self._loop = asyncio.get_running_loop()
            expired = self._expired
        self.service.associations.add(self)
        self.certificate = PeerCertificate.from_ssl(transport.get_extra_info("ssl_object"))
        self.on_tls = transport.get_extra_info("sslcontext") is not None
        super().connection_made(transport)
        if expired:
            self._expire()
        elif self._first:  # read in the lobby: handled before anything the socket brings
            first, self._first = self._first, b""
            self.feed(first)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.service.associations.discard(self)
        if self.caller is not None:
            summary = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())) or "idle"
            log.info("association with %s closed: %s", self.caller, summary)

    def artim_expired(self, state: State) -> None:
        if state == State.STA2:
            _SILENT(
                "%s: no A-ASSOCIATE-RQ within %.0fs (dicom.artim_timeout), closing",
                self.describe(),
                self.fsm.artim,
            )

    # ------------------------------------------------------------------ negotiation
    def provider_rejection(self, rq: pdu.AssociateRQ) -> pdu.AssociateRJ | None:
        """What the upper layer itself refuses (AE-6), before the archive is asked."""
        why = ""
        rj = None
        if not rq.protocol_version & 1:
            why = "unsupported protocol version"
            rj = pdu.AssociateRJ(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_ACSE, pdu.RJ_PROTOCOL_VERSION)
        elif self.over_limit:
            why = self.over_limit
            rj = pdu.AssociateRJ(
                pdu.RJ_TRANSIENT, pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_LOCAL_LIMIT_EXCEEDED
            )
        elif rq.max_pdu and rq.max_pdu < pdu.MIN_PEER_MAX_PDU:
            why = (
                f"it accepts PDUs of at most {rq.max_pdu} bytes; we send at least "
                f"{pdu.MIN_PEER_MAX_PDU}"
            )
            rj = pdu.AssociateRJ(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_ACSE, pdu.RJ_NO_REASON)
        if rj is not None:
            log.warning(
                "association from %s@%s rejected: %s",
                rq.calling_ae,
                self.peer_address.rsplit(":", 1)[0],
                why,
            )
        return rj

    def on_associate_rq(self, rq: pdu.AssociateRQ) -> None:
        from pacsgrid.archive import Caller

        host = self.peer_address.rsplit(":", 1)[0]
        caller = Caller(rq.calling_ae, host)
        self.caller = caller
        if rq.application_context != pdu.APPLICATION_CONTEXT:
            self._reject(
                pdu.RJ_PERMANENT,
                pdu.RJ_SOURCE_USER,
                2,
                f"application context {rq.application_context!r} not supported",
            )
            return
        peer = self.archive.settings.peer(rq.calling_ae)
        problem = (
            mismatch(
                peer,
                host,
                self.certificate,
                on_tls=self.on_tls,
                resolver=self.service.resolver,
            )
            if peer is not None
            else ""
        )
        if problem:
            self.archive.audit(caller, "associate", "denied", "", problem)
            self._reject(
                pdu.RJ_PERMANENT,
                pdu.RJ_SOURCE_USER,
                pdu.RJ_CALLING_AE_NOT_RECOGNIZED,
                f"calling AE {rq.calling_ae!r} is a configured peer, but {problem}",
            )
            return
        if not self.archive.accepts_association(caller):
            self.archive.audit(caller, "associate", "denied", "", "unknown calling AE title")
            self._reject(
                pdu.RJ_PERMANENT,
                pdu.RJ_SOURCE_USER,
                pdu.RJ_CALLING_AE_NOT_RECOGNIZED,
                f"calling AE {rq.calling_ae!r} is not a configured peer and "
                "dicom.accept_unknown is false",
            )
            return
        result = negotiate(
            rq,
            lambda op: self.archive.may(caller, op),
            our_ae=self.service.ae_title,
            max_pdu=self.max_pdu,
        )
        for what in result.refused:
            operation = what.split(" ", 1)[0]
            self.archive.audit(caller, operation, "denied", "", f"{what}: context rejected")
            log.warning(
                "%s may not %s: presentation context rejected (not a configured peer, "
                "or not in its 'allow' list)",
                caller,
                what,
            )
        self.contexts = result.contexts
        self.peer_max_pdu = rq.max_pdu
        self.accept(result.ac)
        log.info(
            "association from %s accepted (%d of %d presentation contexts)",
            caller,
            len(result.contexts),
            len(rq.contexts),
        )
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def _reject(self, result: int, source: int, reason: int, why: str) -> None:
        log.warning("association from %s rejected: %s", self.describe(), why)
        self.reject(pdu.AssociateRJ(result, source, reason))

    def on_release_rq(self) -> None:
        self.requests.put_nowait(RELEASE_REQUESTED)  # answered after the requests before it

    def spool_for(self, command: dimse.Command) -> Spool | None:
        """A C-STORE's dataset larger than dicom.spill_mb goes to a spill file as it arrives."""
        if int(command.get(dimse.COMMAND_FIELD, 0)) != dimse.C_STORE_RQ:
            return None
        return self.archive.spool()

    # ------------------------------------------------------------------ request loop
    async def _serve(self) -> None:
        try:
            await self._serve_requests()
        finally:
            while not self.requests.empty():  # never handled: their spill files go now
                left = self.requests.get_nowait()
                if left is not None and left.spool is not None:
                    left.spool.close()

    async def _serve_requests(self) -> None:
        while True:
            msg = await self.requests.get()
            if msg is None:
                return
            if msg is RELEASE_REQUESTED:
                self.release_response()
                continue
            self.busy = True
            try:
                await self._handle(msg)
            except AssociationAborted:
                return
            except Exception:
                log.exception(
                    "%s: unexpected error handling %s",
                    self.describe(),
                    dimse.COMMAND_NAMES.get(msg.command_field, "a request"),
                )
                self.abort()
                return
            finally:
                self.busy = False
                if msg.spool is not None:
                    msg.spool.close()

    async def _handle(self, msg: Message) -> None:
        ctx = self.contexts[msg.context_id]  # received only on accepted contexts
        field = msg.command_field
        service = service_of(ctx.abstract_syntax)
        if field == dimse.C_ECHO_RQ:
            self.counts["echo"] += 1
            self._respond(msg, dimse.SUCCESS)
        elif _SERVICE_OF_COMMAND.get(field) != service:
            name = dimse.COMMAND_NAMES.get(field, f"command 0x{field:04X}")
            why = (
                f"{name} on presentation context {ctx.id} ({ctx.abstract_syntax}), "
                f"which is for {service}"
            )
            log.warning("%s: refused %s", self.describe(), why)
            self._respond(msg, dimse.UNRECOGNIZED_OPERATION, why)
        elif field == dimse.C_STORE_RQ:
            await self._c_store(msg, ctx.transfer_syntax)
        elif field == dimse.N_ACTION_RQ:
            await n_action(self, msg, ctx)
        elif field == dimse.C_FIND_RQ:
            await self._c_find(msg, ctx.abstract_syntax, ctx.transfer_syntax)
        else:
            await self._c_retrieve(msg, ctx.abstract_syntax, ctx.transfer_syntax)

    def _respond(
        self,
        msg: Message,
        status: int,
        error: str = "",
        dataset: bytes | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        """Send the response to `msg`; `counts`: sub-operation counters (remaining,
        completed, failed, warning) of a C-MOVE/C-GET."""
        cmd: dimse.Command = {
            dimse.AFFECTED_SOP_CLASS: msg.command.get(dimse.AFFECTED_SOP_CLASS, ""),
            dimse.COMMAND_FIELD: msg.command_field | 0x8000,
            dimse.MESSAGE_ID_RESPONDED: msg.message_id,
            dimse.STATUS: status,
        }
        if msg.command_field == dimse.C_STORE_RQ:
            cmd[dimse.AFFECTED_SOP_INSTANCE] = msg.command.get(dimse.AFFECTED_SOP_INSTANCE, "")
        if error:
            cmd[dimse.ERROR_COMMENT] = comment(error)
        for name, value in (counts or {}).items():
            cmd[_EXTRA[name]] = value
        self.send_message(msg.context_id, cmd, dataset)

    # ------------------------------------------------------------------ C-STORE
    async def _c_store(self, msg: Message, transfer_syntax: str) -> None:
        assert self.caller is not None
        try:
            result = self._ingest(msg, transfer_syntax, self.caller)
        except PacsgridError as e:
            status, text = failure_status(e)
            self.counts["store failed"] += 1
            log.warning(
                "C-STORE of %s from %s failed (status 0x%04X): %s",
                msg.command.get(dimse.AFFECTED_SOP_INSTANCE, "?"),
                self.caller,
                status,
                e,
            )
            self._respond(msg, status, text)
            return
        self.counts[result.outcome] += 1
        self._respond(msg, dimse.SUCCESS)

    def _ingest(self, msg: Message, transfer_syntax: str, caller: Caller) -> IngestResult:
        """Hand the dataset to the archive; a spill file is gone before the peer hears the
        outcome."""
        try:
            dataset = msg.spool if msg.spool is not None else msg.dataset
            if dataset is None:
                raise InvalidDataset("C-STORE-RQ without a dataset")
            return self.archive.ingest(
                dataset,
                transfer_syntax,
                caller,
                sop_class_uid=str(msg.command.get(dimse.AFFECTED_SOP_CLASS, "")),
            )
        finally:
            if msg.spool is not None:
                msg.spool.close()

    # ------------------------------------------------------------------ C-FIND
    def _request(self, msg: Message, abstract_syntax: str, transfer_syntax: str) -> Request:
        if msg.dataset is None:
            raise InvalidDataset("request without an identifier")
        request = decode_request(msg.dataset, transfer_syntax)
        model = QR_MODELS[abstract_syntax][1]
        if request.level not in MODEL_LEVELS[model]:
            raise InvalidDataset(
                f"level {request.level.value} is not part of this information model"
            )
        return request

    async def _c_find(self, msg: Message, abstract_syntax: str, transfer_syntax: str) -> None:
        assert self.caller is not None
        try:
            request = self._request(msg, abstract_syntax, transfer_syntax)
            caller = self.caller
            rows = list(self.archive.find(caller, request.query()))
        except PacsgridError as e:
            status, text = failure_status(e)
            if isinstance(e, InvalidDataset):
                status = dimse.DATASET_MISMATCH
            log.warning("C-FIND from %s failed (status 0x%04X): %s", self.caller, status, e)
            self._respond(msg, status, text)
            return
        self.counts["find"] += 1
        ae = self.service.ae_title
        for row in rows:
            if msg.message_id in self.cancelled:
                self.cancelled.discard(msg.message_id)
                self._respond(msg, dimse.CANCEL)
                return
            identifier = encode_elements(response_elements(request, row, ae), transfer_syntax)
            self._respond(msg, dimse.PENDING, dataset=identifier)
            await self.drain()
        self._respond(msg, dimse.SUCCESS)

    # ------------------------------------------------------------------ C-MOVE / C-GET
    async def _c_retrieve(self, msg: Message, abstract_syntax: str, transfer_syntax: str) -> None:
        assert self.caller is not None
        op = "move" if msg.command_field == dimse.C_MOVE_RQ else "get"
        try:
            request = self._request(msg, abstract_syntax, transfer_syntax)
            unique = UNIQUE_KEY[request.level]
            query = request.query()
            if not any(m.keyword == unique for m in query.matches):
                raise InvalidDataset(f"a {op} at {request.level.value} level needs {unique}")
            destination = None
            if op == "move":
                destination = self.archive.peer(str(msg.command.get(dimse.MOVE_DESTINATION, "")))
            records = self.archive.locate(self.caller, query, op, audit=False)
        except PacsgridError as e:
            status, text = failure_status(e)
            log.warning(
                "C-%s from %s failed (status 0x%04X): %s", op.upper(), self.caller, status, e
            )
            self._respond(msg, status, text)
            return
        self.counts[op] += 1
        await retrieve(self, msg, records, destination, transfer_syntax)


_SERVICE_OF_COMMAND = {
    dimse.N_ACTION_RQ: "commit",
    dimse.C_STORE_RQ: "store",
    dimse.C_FIND_RQ: "find",
    dimse.C_MOVE_RQ: "move",
    dimse.C_GET_RQ: "get",
}
_SILENT = Throttle(level=logging.INFO)  # connections that never associate: one line per 10s

_EXTRA = {
    "remaining": dimse.REMAINING,
    "completed": dimse.COMPLETED,
    "failed": dimse.FAILED,
    "warning": dimse.WARNING,
}
