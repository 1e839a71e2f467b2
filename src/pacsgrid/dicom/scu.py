"""Outgoing associations: C-MOVE sub-operations, forwarding, storage commitment reports,
pulling from a legacy PACS.

assoc = await connect("127.0.0.1", 11113, "PACSGRID", "STORESCP",
                      [(CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE])])
status = await assoc.c_store(ctx_id, sop_class, sop_uid, dataset_bytes)
await assoc.release()

`connect_to(peer, ...)` opens one to a configured peer, over DICOM TLS when the peer's
settings say so (pacsgrid.tls.client_context).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from pacsgrid.dicom import dimse, pdu
from pacsgrid.dicom.association import (
    RELEASE_REQUESTED,
    AcceptedContext,
    Association,
    AssociationAborted,
)
from pacsgrid.dicom.dimse import Message
from pacsgrid.dicom.fsm import Event, State
from pacsgrid.dicomfile.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from pacsgrid.settings import PeerSettings
from pacsgrid.tls import client_context

log = logging.getLogger("pacsgrid.dicom")

Proposal = tuple[str, Sequence[str]]  # abstract syntax, transfer syntaxes in preference order
StoreHandler = Callable[[Message, AcceptedContext], Awaitable[int]]


class AssociationRejected(Exception):
    def __init__(self, rj: pdu.AssociateRJ) -> None:
        super().__init__(
            f"association rejected (result {rj.result}, source {rj.source}, reason {rj.reason})"
        )
        self.rj = rj


class ClientAssociation(Association):
    requestor = True

    def __init__(
        self,
        rq: pdu.AssociateRQ,
        *,
        max_pdu: int,
        timeout: float,
        on_store: StoreHandler | None = None,
    ) -> None:
        super().__init__(max_pdu=max_pdu, timeout=timeout)
        self.rq = rq
        self._proposals = {pc.id: pc for pc in rq.contexts}
        self._established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._released: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_store = on_store
        self._serve_task: asyncio.Task[None] | None = None
        self.label = ""
        self.roles: dict[str, pdu.RoleSelection] = {}  # the acceptor's role selection replies

    def describe(self) -> str:
        return self.label or self.peer_address

    def transport_connected(self) -> None:
        self.fsm.handle(Event.EVT2, self.rq)  # AE-2: send the A-ASSOCIATE-RQ

    def on_associate_ac(self, ac: pdu.AssociateAC) -> None:
        self.peer_max_pdu = ac.max_pdu
        if ac.max_pdu and ac.max_pdu < pdu.MIN_PEER_MAX_PDU:
            self._fail(
                AssociationAborted(
                    f"{self.describe()} accepts PDUs of at most {ac.max_pdu} bytes, fewer "
                    f"than the {pdu.MIN_PEER_MAX_PDU} we send at least"
                )
            )
            self.abort()
            return
        roles = {r.sop_class_uid: r for r in ac.roles}
        self.roles = roles
        for pc in ac.contexts:
            proposed = self._proposals.get(pc.id)
            if proposed is None or pc.result != pdu.ACCEPTANCE or not pc.transfer_syntaxes:
                continue
            role = roles.get(proposed.abstract_syntax)
            self.contexts[pc.id] = AcceptedContext(
                pc.id,
                proposed.abstract_syntax,
                pc.transfer_syntaxes[0],
                scu=role.scu_role if role else True,
                scp=role.scp_role if role else False,
            )
        if not self._established.done():
            self._established.set_result(None)
        if self._on_store is not None:
            self._serve_task = asyncio.get_running_loop().create_task(self._serve())

    def on_associate_rj(self, rj: pdu.AssociateRJ) -> None:
        self._fail(AssociationRejected(rj))

    def on_release_rq(self) -> None:
        self.requests.put_nowait(RELEASE_REQUESTED)  # after the requests received before it

    def on_release_rp(self) -> None:
        if not self._released.done():
            self._released.set_result(None)

    def on_abort(self, source: int, reason: int) -> None:
        self._fail(AssociationAborted(f"peer aborted (source {source}, reason {reason})"))

    def on_provider_abort(self, why: str) -> None:
        self._fail(AssociationAborted(why))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._fail(AssociationAborted("connection closed"))

    def _fail(self, error: Exception) -> None:
        """Fail whoever waits for the association or its release (nobody may be waiting:
        the exception is marked retrieved so asyncio does not report it)."""
        for fut in (self._established, self._released):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()

    async def _serve(self) -> None:
        """Requests the peer sends us on this association: C-STORE of our C-GET."""
        assert self._on_store is not None
        while True:
            msg = await self.requests.get()
            if msg is None:
                return
            if msg is RELEASE_REQUESTED:
                self.release_response()
                continue
            ctx = self.contexts.get(msg.context_id)
            status = dimse.UNRECOGNIZED_OPERATION
            if msg.command_field == dimse.C_STORE_RQ and ctx is not None:
                try:
                    status = await self._on_store(msg, ctx)
                except Exception:
                    log.exception("%s: handling a C-STORE failed", self.describe())
                    status = dimse.UNABLE_TO_PROCESS
            self.send_message(
                msg.context_id,
                {
                    dimse.AFFECTED_SOP_CLASS: msg.command.get(dimse.AFFECTED_SOP_CLASS, ""),
                    dimse.COMMAND_FIELD: msg.command_field | 0x8000,
                    dimse.MESSAGE_ID_RESPONDED: msg.message_id,
                    dimse.AFFECTED_SOP_INSTANCE: msg.command.get(dimse.AFFECTED_SOP_INSTANCE, ""),
                    dimse.STATUS: status,
                },
            )

    # ------------------------------------------------------------------ operations
    async def c_echo(self) -> int:
        ctx = self.context_for("1.2.840.10008.1.1")
        if ctx is None:
            raise AssociationAborted("Verification was not accepted")
        rsp = await self.request(
            ctx.id,
            {dimse.AFFECTED_SOP_CLASS: ctx.abstract_syntax, dimse.COMMAND_FIELD: dimse.C_ECHO_RQ},
        )
        return int(rsp.command.get(dimse.STATUS, 0))

    async def c_find(self, context_id: int, identifier: bytes) -> AsyncIterator[Message]:
        ctx = self.contexts[context_id]
        async for rsp in self.request_stream(
            context_id,
            {
                dimse.AFFECTED_SOP_CLASS: ctx.abstract_syntax,
                dimse.COMMAND_FIELD: dimse.C_FIND_RQ,
                dimse.PRIORITY: 0,
            },
            identifier,
        ):
            yield rsp

    async def c_move(
        self, context_id: int, destination: str, identifier: bytes, timeout: float | None = None
    ) -> AsyncIterator[Message]:
        ctx = self.contexts[context_id]
        async for rsp in self.request_stream(
            context_id,
            {
                dimse.AFFECTED_SOP_CLASS: ctx.abstract_syntax,
                dimse.COMMAND_FIELD: dimse.C_MOVE_RQ,
                dimse.PRIORITY: 0,
                dimse.MOVE_DESTINATION: destination,
            },
            identifier,
            timeout,
        ):
            yield rsp

    async def c_get(
        self, context_id: int, identifier: bytes, timeout: float | None = None
    ) -> AsyncIterator[Message]:
        ctx = self.contexts[context_id]
        async for rsp in self.request_stream(
            context_id,
            {
                dimse.AFFECTED_SOP_CLASS: ctx.abstract_syntax,
                dimse.COMMAND_FIELD: dimse.C_GET_RQ,
                dimse.PRIORITY: 0,
            },
            identifier,
            timeout,
        ):
            yield rsp

    async def release(self, timeout: float = 10.0) -> None:
        """A-RELEASE request (Evt11); aborts when no A-RELEASE-RP comes in `timeout`."""
        if self.closed.is_set() or self.state != State.STA6:
            if not self.closed.is_set():
                self.abort()
            return
        self.fsm.handle(Event.EVT11)
        try:
            await asyncio.wait_for(asyncio.shield(self._released), timeout)
        except (TimeoutError, AssociationAborted):
            self.abort()
        if self._serve_task is not None:
            self._serve_task.cancel()
        # The connection is closed by us (AR-3) or, after an abort, by the peer or the ARTIM
        # timer: wait for it, so nothing is left open when the caller's loop ends.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), self.fsm.artim + 1)


async def connect(
    host: str,
    port: int,
    calling_ae: str,
    called_ae: str,
    proposals: Sequence[Proposal],
    *,
    max_pdu: int = 262144,
    timeout: float = 30.0,
    scp_roles: Sequence[str] = (),
    roles: Sequence[pdu.RoleSelection] = (),
    on_store: StoreHandler | None = None,
    tls: ssl.SSLContext | None = None,
) -> ClientAssociation:
    """Open an association; raise AssociationRejected, AssociationAborted or OSError (an
    ssl.SSLError when the TLS handshake fails).

    `scp_roles`: SOP classes for which we offer both roles (C-GET storage sub-operations);
    `roles`: other role selections as given (storage commitment reports: the SCP role only);
    `tls`: a client context (pacsgrid.tls.client_context) to connect over DICOM TLS.
    """
    if len(proposals) > 128:
        raise ValueError("at most 128 presentation contexts per association")
    contexts = [
        pdu.PresentationContext(2 * i + 1, abstract, list(syntaxes))
        for i, (abstract, syntaxes) in enumerate(proposals)
    ]
    rq = pdu.AssociateRQ(
        called_ae,
        calling_ae,
        contexts,
        max_pdu,
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION,
        {
            **{uid: pdu.RoleSelection(uid, True, True) for uid in scp_roles},
            **{r.sop_class_uid: r for r in roles},
        },
    )
    assoc = ClientAssociation(rq, max_pdu=max_pdu, timeout=timeout, on_store=on_store)
    assoc.label = f"{called_ae}@{host}:{port}"
    assoc.fsm.handle(Event.EVT1)  # AE-1: the transport connection is opened next
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.create_connection(
                lambda: assoc,
                host,
                port,
                ssl=tls,
                server_hostname=host if tls is not None else None,
                ssl_handshake_timeout=timeout if tls is not None else None,
            ),
            timeout,
        )
    except BaseException:
        if assoc.state == State.STA4:
            assoc.fsm.handle(Event.EVT17)  # the connection never opened (AA-4)
        raise
    try:
        await asyncio.wait_for(asyncio.shield(assoc._established), timeout)
    except TimeoutError:
        assoc.abort()
        raise AssociationAborted(
            f"no answer to the association request from {assoc.label}"
        ) from None
    return assoc


async def connect_to(
    peer: PeerSettings,
    calling_ae: str,
    proposals: Sequence[Proposal],
    *,
    timeout: float = 30.0,
    scp_roles: Sequence[str] = (),
    roles: Sequence[pdu.RoleSelection] = (),
    on_store: StoreHandler | None = None,
) -> ClientAssociation:
    """`connect` to a configured peer: its host, port and AE title, over DICOM TLS when its
    settings say so (its CA, the archive's client certificate: pacsgrid.tls)."""
    return await connect(
        peer.host,
        peer.port,
        calling_ae,
        peer.ae_title,
        proposals,
        timeout=timeout,
        scp_roles=scp_roles,
        roles=roles,
        on_store=on_store,
        tls=client_context(peer),
    )
