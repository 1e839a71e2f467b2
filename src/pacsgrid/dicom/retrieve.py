"""Retrieve sub-operations, shared by C-MOVE (to another AE) and C-GET (back on the same
association): read each instance from the archive, pick a presentation context, convert the
transfer syntax only when the receiver did not accept the stored one, send, and report progress
with pending responses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pacsgrid.dicom import dimse
from pacsgrid.dicom.association import AcceptedContext, Association, AssociationAborted
from pacsgrid.dicom.identifier import failed_uids_identifier
from pacsgrid.dicom.scu import AssociationRejected, ClientAssociation, connect_to
from pacsgrid.dicomfile.header import EXPLICIT_LE, IMPLICIT_LE, UNCOMPRESSED
from pacsgrid.dicomfile.transcode import TranscodeError, transcode
from pacsgrid.errors import PacsgridError
from pacsgrid.model import InstanceRecord
from pacsgrid.settings import PeerSettings

if TYPE_CHECKING:
    from pacsgrid.dicom.dimse import Message
    from pacsgrid.dicom.scp import ServerAssociation

log = logging.getLogger("pacsgrid.dicom")

FALLBACK = (EXPLICIT_LE, IMPLICIT_LE)


def proposals_for(records: Sequence[InstanceRecord]) -> list[tuple[str, list[str]]]:
    """Contexts to propose to a C-MOVE destination: for every SOP class, each stored transfer
    syntax as is, plus the uncompressed ones to fall back to. At most 128 (PS3.8 limit)."""
    wanted: dict[str, list[str]] = {}
    for r in records:
        syntaxes = wanted.setdefault(r.sop_class_uid, [])
        if r.transfer_syntax not in syntaxes:
            syntaxes.append(r.transfer_syntax)
    out: list[tuple[str, list[str]]] = []
    for sop_class, syntaxes in wanted.items():
        for ts in syntaxes:
            out.append((sop_class, [ts]))
        if not all(ts in syntaxes for ts in FALLBACK):
            out.append((sop_class, list(FALLBACK)))
    if len(out) > 128:
        log.warning("retrieve needs %d presentation contexts; proposing the first 128", len(out))
    return out[:128]


def pick_context(
    contexts: Iterable[AcceptedContext], sop_class: str, stored_ts: str
) -> tuple[AcceptedContext | None, str]:
    """The context to send on, and the transfer syntax to send in."""
    fallback = None
    for ctx in contexts:
        if ctx.abstract_syntax != sop_class:
            continue
        if ctx.transfer_syntax == stored_ts:
            return ctx, stored_ts
        if ctx.transfer_syntax in UNCOMPRESSED and (
            fallback is None or ctx.transfer_syntax == EXPLICIT_LE
        ):
            fallback = ctx
    if fallback is not None:
        return fallback, fallback.transfer_syntax
    return None, ""


async def retrieve(
    requester: ServerAssociation,
    msg: Message,
    records: list[InstanceRecord],
    destination: PeerSettings | None,
    qr_syntax: str,
) -> None:
    total = len(records)
    completed = failed = warning = 0
    failed_uids: list[str] = []
    archive = requester.archive
    sender: Association = requester
    target: ClientAssociation | None = None
    if destination is not None and records:
        try:
            target = await connect_to(
                destination,
                requester.service.ae_title,
                proposals_for(records),
                timeout=archive.settings.dicom.timeout,
            )
        except (OSError, AssociationRejected, AssociationAborted, TimeoutError) as e:
            why = (
                f"cannot open an association to {destination.ae_title}@{destination.host}:"
                f"{destination.port}: {e or type(e).__name__}"
            )
            log.warning("C-MOVE from %s: %s", requester.caller, why)
            requester._respond(
                msg,
                dimse.OUT_OF_RESOURCES_SUBOPS,
                why,
                counts={"remaining": 0, "completed": 0, "failed": total, "warning": 0},
            )
            _audit(requester, destination, records, 0, total)
            return
        sender = target
        usable = list(target.contexts.values())
    else:
        usable = [c for c in requester.contexts.values() if c.scp]
    originator = (
        (requester.caller.ae_title, msg.message_id) if target and requester.caller else None
    )
    loop = asyncio.get_running_loop()
    cancelled = False
    # Read-ahead: the next instance is read (and its SHA-256 checked) while the current one is
    # on the wire and the receiver writes it, so storage and network overlap instead of taking
    # turns. The association has a thread of its own, so the read runs inline once the
    # current instance is in the socket. At most two objects are held in memory.
    ahead = _prepare(requester, usable, records[0], loop) if records else None
    try:
        for done, record in enumerate(records, 1):
            if msg.message_id in requester.cancelled or requester.closed.is_set():
                cancelled = True
                break
            assert ahead is not None
            current = ahead
            ahead = _prepare(requester, usable, records[done], loop) if done < total else None
            status = await _send_one(sender, record, await current, originator)
            category = dimse.status_category(status)
            if category == "success":
                completed += 1
            elif category == "warning":
                warning += 1
            else:
                failed += 1
                failed_uids.append(record.sop_uid)
            if done < total:
                requester._respond(
                    msg,
                    dimse.PENDING,
                    counts={
                        "remaining": total - done,
                        "completed": completed,
                        "failed": failed,
                        "warning": warning,
                    },
                )
                await requester.drain()
    finally:
        if ahead is not None:
            ahead.cancel()
        if target is not None:
            await target.release()
    if cancelled:
        requester.cancelled.discard(msg.message_id)
        final = dimse.CANCEL
    elif failed == 0 and warning == 0:
        final = dimse.SUCCESS
    elif completed == 0 and warning == 0:
        final = dimse.OUT_OF_RESOURCES_SUBOPS
    else:
        final = dimse.WARNING_SUBOPS
    identifier = failed_uids_identifier(failed_uids, qr_syntax) if failed_uids else None
    counts = {"completed": completed, "failed": failed, "warning": warning}
    if cancelled:
        counts["remaining"] = total - completed - failed - warning
    requester._respond(msg, final, dataset=identifier, counts=counts)
    _audit(requester, destination, records, completed + warning, failed)
    if failed:
        log.warning(
            "C-%s from %s: %d of %d sub-operations failed",
            "MOVE" if destination else "GET",
            requester.caller,
            failed,
            total,
        )


def _audit(
    requester: ServerAssociation,
    destination: PeerSettings | None,
    records: list[InstanceRecord],
    sent: int,
    failed: int,
) -> None:
    if requester.caller is not None:
        operation = "move" if destination is not None else "get"
        requester.archive.retrieved(requester.caller, operation, records, sent, failed)


_Prepared = tuple[AcceptedContext, "bytes | memoryview"] | int


def _prepare(
    requester: ServerAssociation,
    usable: list[AcceptedContext],
    record: InstanceRecord,
    loop: asyncio.AbstractEventLoop,
) -> asyncio.Task[_Prepared]:
    """Start reading `record` for sending; the task gives (context, bytes to send) or, when
    it cannot be sent, the sub-operation's failure status."""
    return loop.create_task(_load(requester, usable, record))


async def _load(
    requester: ServerAssociation,
    usable: list[AcceptedContext],
    record: InstanceRecord,
) -> _Prepared:
    archive = requester.archive
    ctx, send_ts = pick_context(usable, record.sop_class_uid, record.transfer_syntax)
    if ctx is None:
        log.warning(
            "cannot send %s: the receiver accepted no context for SOP class %s",
            record.sop_uid,
            record.sop_class_uid,
        )
        return dimse.UNABLE_TO_PROCESS
    try:
        obj = archive.read(record, requester.caller)
        dataset: bytes | memoryview = obj.dataset
        if send_ts != obj.transfer_syntax:
            dataset = transcode(dataset, obj.transfer_syntax, send_ts)
    except (PacsgridError, TranscodeError) as e:
        log.warning("cannot send %s: %s", record.sop_uid, e)
        return dimse.UNABLE_TO_PROCESS
    return ctx, dataset


async def _send_one(
    sender: Association,
    record: InstanceRecord,
    prepared: _Prepared,
    originator: tuple[str, int] | None,
) -> int:
    if isinstance(prepared, int):
        return prepared
    ctx, dataset = prepared
    try:
        status, error = await sender.c_store(
            ctx.id, record.sop_class_uid, record.sop_uid, dataset, originator=originator
        )
    except AssociationAborted as e:
        log.warning("sending %s to %s failed: %s", record.sop_uid, sender.describe(), e)
        return dimse.UNABLE_TO_PROCESS
    if dimse.status_category(status) == "failure":
        log.warning(
            "%s refused %s: status 0x%04X %s", sender.describe(), record.sop_uid, status, error
        )
    return status
