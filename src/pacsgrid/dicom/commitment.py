"""Storage Commitment Push Model SCP (PS3.4 annex J) on the archive's DICOM ports.

A thin front end. `n_action` decodes an N-ACTION-RQ (Action Type 1, Request Storage
Commitment), has the archive record the request durably (`Archive.commitment.request`) and
answers at once. Then, on the association's own loop while the association goes on, the
archive verifies the instances (`Archive.commitment.verify`: the rule lives there) and the
report (N-EVENT-REPORT-RQ) goes back on the same association when the requester asked to take
it there: it negotiated SCP/SCU Role Selection for the commitment class with the SCP role for
itself, and keeps the association open. Otherwise the archive hands the report over to the
'commitment' job (pacsgrid.jobs.commitment), which sends it with `report_to_peer` on a new
association to the requester's configured address, proposing the SCP role for the archive.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import warnings
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from pacsgrid.archive.commitment import (
    LEASE,
    SOP_CLASS,
    SOP_INSTANCE,
    CommitmentRequest,
    CommitmentResult,
    PendingCommitment,
    Reference,
    StorageCommitment,
    owner_name,
)
from pacsgrid.dicom import dimse, pdu
from pacsgrid.dicom.association import AcceptedContext, Association, AssociationAborted
from pacsgrid.dicom.dimse import Message
from pacsgrid.dicom.fsm import State
from pacsgrid.dicom.scu import AssociationRejected, connect_to
from pacsgrid.dicom.status import comment, n_failure_status
from pacsgrid.dicomfile.header import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from pacsgrid.errors import PacsgridError, PeerUnreachable

if TYPE_CHECKING:
    from pacsgrid.archive import Archive
    from pacsgrid.dicom.scp import ServerAssociation
    from pacsgrid.settings import PeerSettings

log = logging.getLogger("pacsgrid.dicom")
T = TypeVar("T")

REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2)
TRANSACTION_UID = 0x00081195
REFERENCED_SOP_SEQUENCE = 0x00081199
REFERENCED_SOP_CLASS_UID = 0x00081150
REFERENCED_SOP_INSTANCE = 0x00081155
_TRANSACTION = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # a UID's shape; at most 64 characters


class Refused(Exception):
    """A request answered with a failure status: `status`, and why (for the log)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


# ---------------------------------------------------------------------- the datasets
def decode_request(data: bytes | None, transfer_syntax: str) -> tuple[str, list[Reference]]:
    """Transaction UID and references of an N-ACTION-RQ's Action Information; raises
    Refused (0212H for a dataset that cannot be read, 0115H for values that are wrong).

    The referenced UIDs are taken as they are (the archive stores instances whose UIDs break
    the UID rules too, and they must be committable); only missing ones are refused."""
    if not data:
        raise Refused(dimse.INVALID_ARGUMENT_VALUE, "no Action Information")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(
                io.BytesIO(data), transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE
            )
            transaction = _uid(ds, TRANSACTION_UID)
            items = ds.get(REFERENCED_SOP_SEQUENCE)
            refs = [
                Reference(_uid(item, REFERENCED_SOP_CLASS_UID), _uid(item, REFERENCED_SOP_INSTANCE))
                for item in (items.value if items is not None else [])
            ]
    except Exception as e:
        raise Refused(dimse.MISTYPED_ARGUMENT, f"unreadable Action Information: {e}") from None
    if not transaction:
        raise Refused(dimse.INVALID_ARGUMENT_VALUE, "no Transaction UID")
    if not _TRANSACTION.match(transaction) or len(transaction) > 64:
        raise Refused(dimse.INVALID_ARGUMENT_VALUE, f"Transaction UID {transaction!r} is not a UID")
    if not refs:
        raise Refused(dimse.INVALID_ARGUMENT_VALUE, "no Referenced SOP Sequence, or an empty one")
    for i, ref in enumerate(refs, 1):
        for name, uid in (("Class", ref.sop_class_uid), ("Instance", ref.sop_instance_uid)):
            if not uid:
                why = f"item {i} of the Referenced SOP Sequence has no Referenced SOP {name} UID"
                raise Refused(dimse.INVALID_ARGUMENT_VALUE, why)
    return transaction, refs


def _uid(ds: Dataset, tag: int) -> str:
    """A UI element's value as sent (no value conversion); '' when absent."""
    elem = ds.get(tag)
    value = getattr(elem, "value", None)
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip(" \x00")


def encode_report(
    req: CommitmentRequest, result: CommitmentResult, transfer_syntax: str, retrieve_ae: str
) -> bytes:
    """The Event Information of the N-EVENT-REPORT-RQ (PS3.4 table J.3-2)."""
    ds = Dataset()
    ds.TransactionUID = req.transaction_uid
    ds.RetrieveAETitle = retrieve_ae
    if result.committed:
        ds.ReferencedSOPSequence = [_item(r) for r in result.committed]
    if result.failed:
        failed = []
        for f in result.failed:
            item = _item(f.reference)
            item.FailureReason = f.reason
            failed.append(item)
        ds.FailedSOPSequence = failed
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != EXPLICIT_BE
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    write_dataset(fp, ds)
    return fp.getvalue()


def _item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


# ---------------------------------------------------------------------- the SCP
async def n_action(assoc: ServerAssociation, msg: Message, ctx: AcceptedContext) -> None:
    """Answer an N-ACTION-RQ on the commitment context; start its report."""
    assert assoc.caller is not None
    cmd = msg.command
    commitment = assoc.archive.commitment
    try:
        requested_class = str(cmd.get(dimse.REQUESTED_SOP_CLASS, ""))
        if requested_class != SOP_CLASS:
            raise Refused(dimse.NO_SUCH_SOP_CLASS, f"Requested SOP Class {requested_class!r}")
        requested = str(cmd.get(dimse.REQUESTED_SOP_INSTANCE, ""))
        if requested != SOP_INSTANCE:
            raise Refused(
                dimse.NO_SUCH_SOP_INSTANCE,
                f"Requested SOP Instance {requested!r}, not the well-known {SOP_INSTANCE}",
            )
        action = int(cmd.get(dimse.ACTION_TYPE_ID, 0))
        if action != REQUEST_STORAGE_COMMITMENT:
            raise Refused(dimse.NO_SUCH_ACTION, f"Action Type ID {action}")
        transaction, refs = decode_request(msg.dataset, ctx.transfer_syntax)
        pending = commitment.request(assoc.caller, transaction, refs, owner=owner_name("dicom"))
    except (Refused, PacsgridError) as e:
        status, text = (e.status, str(e)) if isinstance(e, Refused) else n_failure_status(e)
        assoc.counts["commitment refused"] += 1
        log.warning("N-ACTION from %s refused (status 0x%04X): %s", assoc.caller, status, e)
        _respond(assoc, msg, status, text)
        return
    assoc.counts["commitment"] += 1
    _respond(assoc, msg, dimse.SUCCESS)
    log.info(
        "storage commitment of %d instance(s) asked by %s (transaction %s)%s",
        len(refs),
        assoc.caller,
        transaction,
        "" if pending is not None else ": already pending, answered by its first report",
    )
    if pending is not None:
        assoc.spawn(_report(assoc, ctx, commitment, pending))


def _respond(assoc: ServerAssociation, msg: Message, status: int, error: str = "") -> None:
    cmd: dimse.Command = {
        dimse.AFFECTED_SOP_CLASS: msg.command.get(dimse.REQUESTED_SOP_CLASS, ""),
        dimse.COMMAND_FIELD: dimse.N_ACTION_RSP,
        dimse.MESSAGE_ID_RESPONDED: msg.message_id,
        dimse.STATUS: status,
        dimse.AFFECTED_SOP_INSTANCE: msg.command.get(dimse.REQUESTED_SOP_INSTANCE, ""),
    }
    if error:
        cmd[dimse.ERROR_COMMENT] = comment(error)
    assoc.send_message(msg.context_id, cmd)


async def _report(
    assoc: ServerAssociation,
    ctx: AcceptedContext,
    commitment: StorageCommitment,
    pending: PendingCommitment,
) -> None:
    """Verify, then report on this association if the requester takes it here, or hand
    the report over to the 'commitment' job. Whatever happens, the request is left either
    reported or handed over (or, if this process dies, claimed until its lease runs out)."""
    refs = pending.request.references
    try:
        result = await holding(
            commitment,
            pending,
            asyncio.to_thread(commitment.verify, refs, assoc.closed.is_set),
        )
    except Exception:
        log.exception("verifying %s failed", pending.request.describe())
        await asyncio.to_thread(commitment.hand_over, pending, None, "")
        return
    if result is None or not ctx.scp or assoc.state != State.STA6:
        # Verified (or not, when the association closed meanwhile): a new association.
        await asyncio.to_thread(commitment.hand_over, pending, result, "")
        return
    try:
        report = send_report(assoc, ctx.id, pending.request, result, assoc.service.ae_title)
        status = await holding(commitment, pending, report)
    except AssociationAborted as e:
        why = f"not confirmed on {assoc.describe()}'s association ({e}): on a new one"
        await asyncio.to_thread(commitment.hand_over, pending, result, why)
        return
    if dimse.status_category(status) == "failure":
        why = f"{assoc.describe()} answered the report with status 0x{status:04X}"
        await asyncio.to_thread(commitment.retry_later, pending, result, why)
        return
    await asyncio.to_thread(commitment.reported, pending, result, "on the requester's association")


async def send_report(
    assoc: Association,
    context_id: int,
    req: CommitmentRequest,
    result: CommitmentResult,
    retrieve_ae: str,
) -> int:
    """N-EVENT-REPORT-RQ on `context_id`; the status of its response. Raises
    AssociationAborted when no response comes."""
    ctx = assoc.contexts[context_id]
    cmd: dimse.Command = {
        dimse.AFFECTED_SOP_CLASS: SOP_CLASS,
        dimse.COMMAND_FIELD: dimse.N_EVENT_REPORT_RQ,
        dimse.AFFECTED_SOP_INSTANCE: SOP_INSTANCE,
        dimse.EVENT_TYPE_ID: result.event_type,
    }
    info = encode_report(req, result, ctx.transfer_syntax, retrieve_ae)
    rsp = await assoc.request(context_id, cmd, info)
    return int(rsp.command.get(dimse.STATUS, 0))


async def report_to_peer(
    archive: Archive, peer: PeerSettings, req: CommitmentRequest, result: CommitmentResult
) -> str:
    """Send a report on a new association to `peer` (TLS when its settings say so);
    returns where it went. Raises PeerUnreachable."""
    d = archive.settings.dicom
    label = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        assoc = await connect_to(
            peer,
            d.ae_title,
            [(SOP_CLASS, (EXPLICIT_LE, IMPLICIT_LE))],
            timeout=d.timeout,
            roles=[pdu.RoleSelection(SOP_CLASS, False, True)],
        )
    except (OSError, AssociationRejected, AssociationAborted, TimeoutError) as e:
        raise PeerUnreachable(
            f"cannot open an association to {label}: {e or type(e).__name__}"
        ) from None
    try:
        ctx = assoc.context_for(SOP_CLASS)
        if ctx is None:
            raise PeerUnreachable(f"{label} did not accept the Storage Commitment Push Model")
        role = assoc.roles.get(SOP_CLASS)
        if role is not None and not role.scp_role:
            raise PeerUnreachable(f"{label} refused the archive the SCP role of the class")
        status = await send_report(assoc, ctx.id, req, result, d.ae_title)
    except AssociationAborted as e:
        raise PeerUnreachable(f"{label}: {e}") from None
    finally:
        await assoc.release()
    if dimse.status_category(status) == "failure":
        raise PeerUnreachable(f"{label} answered the report with status 0x{status:04X}")
    return f"on a new association to {label}"


async def holding(
    commitment: StorageCommitment, pending: PendingCommitment, work: Awaitable[T]
) -> T:
    """Await `work`, renewing the claim on `pending` while it runs (LEASE / 3 apart)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=LEASE / 3)
            if done:
                return task.result()
            await asyncio.to_thread(commitment.keep, pending)
    finally:
        if not task.done():
            task.cancel()
