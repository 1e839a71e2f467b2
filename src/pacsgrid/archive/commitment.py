"""Storage Commitment (PS3.4 annex J): the archive taking responsibility for SOP Instances, so
that a modality may delete its own copies of them.

What "committed" means here, decided in one place (`StorageCommitment.verify`): an instance is
committed only when it is durable on at least `replication.write_quorum` healthy archive
sites AND each copy counted was read back just now and matches the SHA-256 recorded at
ingest. An index row is not enough (it says where copies were put, not that they are still
good), and cache copies never count (a cache may evict). The price is I/O: each committed
instance is read and hashed once per copy counted, `write_quorum` times its size; a copy that
does not match is reported like a failed read (`Archive.corrupt_copy`) and does not count.

A request is durable before the requester hears it was received: `request` puts it in the
index's work queue (kind 'commitment') already claimed by the caller, which verifies it and
tries to answer on the requester's own association; what the caller cannot deliver it hands
over (with the verification result), and the 'commitment' job (pacsgrid.jobs.commitment)
delivers it on a new association, with retries and backoff, until it gives up and lists it
for the operator. A claim lasts `LEASE` seconds unless renewed, so the request of a process
that died is taken over, after a restart too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacsgrid import metrics
from pacsgrid.archive.records import Caller
from pacsgrid.errors import InvalidDataset, StorageError
from pacsgrid.index import PendingWork, WorkItem
from pacsgrid.model import InstanceRecord

if TYPE_CHECKING:
    from pacsgrid.archive.service import Archive

log = logging.getLogger("pacsgrid.commitment")

SOP_CLASS = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
KIND = "commitment"  # work queue kind of pending requests
LEASE = 60.0  # seconds a claim on a request lasts unless renewed

# Failure Reason (0008,1197) values, PS3.3 C.14.1.1
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119


@dataclass(frozen=True, slots=True)
class Reference:
    """One item of a Referenced SOP Sequence."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class Failure:
    reference: Reference
    reason: int  # Failure Reason (0008,1197)
    why: str  # for the log and the operator; not sent


@dataclass(frozen=True)
class CommitmentResult:
    """The answer to a request: every referenced instance, committed or failed."""

    committed: tuple[Reference, ...]
    failed: tuple[Failure, ...]
    verified_at: float

    @property
    def event_type(self) -> int:
        """N-EVENT-REPORT Event Type ID: 1 all committed, 2 failures exist."""
        return 2 if self.failed else 1

    def summary(self) -> str:
        return f"{len(self.committed)} committed, {len(self.failed)} failed"


@dataclass(frozen=True)
class CommitmentRequest:
    transaction_uid: str
    requester: str  # calling AE title: the report goes back to it
    address: str
    references: tuple[Reference, ...]
    received_at: float
    result: CommitmentResult | None = None

    @property
    def key(self) -> str:
        """Work queue key: one pending request per requester and Transaction UID."""
        return f"{self.requester}/{self.transaction_uid}"

    def describe(self) -> str:
        return f"transaction {self.transaction_uid} of {self.requester}"

    def payload(self) -> str:
        doc: dict[str, Any] = {
            "transaction": self.transaction_uid,
            "ae": self.requester,
            "address": self.address,
            "received": self.received_at,
            "refs": [[r.sop_class_uid, r.sop_instance_uid] for r in self.references],
        }
        if self.result is not None:
            index = {r: i for i, r in enumerate(self.references)}
            doc["result"] = {
                "at": self.result.verified_at,
                "failed": [[index[f.reference], f.reason, f.why] for f in self.result.failed],
            }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_payload(cls, payload: str) -> CommitmentRequest:
        """Raises ValueError for a payload this module did not write."""
        try:
            doc = json.loads(payload)
            refs = tuple(Reference(str(c), str(i)) for c, i in doc["refs"])
            result = None
            if "result" in doc:
                failed = tuple(
                    Failure(refs[int(i)], int(reason), str(why))
                    for i, reason, why in doc["result"]["failed"]
                )
                failed_refs = {f.reference for f in failed}
                result = CommitmentResult(
                    tuple(r for r in refs if r not in failed_refs),
                    failed,
                    float(doc["result"]["at"]),
                )
            return cls(
                str(doc["transaction"]),
                str(doc["ae"]),
                str(doc.get("address", "")),
                refs,
                float(doc.get("received", 0)),
                result,
            )
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ValueError(f"unreadable storage commitment request: {e}") from None


@dataclass(frozen=True)
class PendingCommitment:
    """A request claimed by one owner (see `LEASE`)."""

    pk: int
    attempts: int
    request: CommitmentRequest
    owner: str = field(compare=False)


def owner_name(role: str) -> str:
    """Who holds a claim: host, process and thread (claims are checked against it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{role}"


class StorageCommitment:
    """The archive's side of storage commitment: record requests, verify, track reports."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.index = archive._index

    # ------------------------------------------------------------------ requests
    def request(
        self,
        caller: Caller,
        transaction_uid: str,
        references: Sequence[Reference],
        *,
        owner: str,
    ) -> PendingCommitment | None:
        """Record a request durably, claimed by `owner` (who verifies it next).

        Returns None when the same requester's transaction is pending already (it is
        answered once, by the report of the first request). Raises AccessDenied (the caller
        may not ask), InvalidDataset (an empty request), IndexUnavailable.
        """
        self.archive.authorize(caller, "commit")
        if not transaction_uid or not references:
            raise InvalidDataset("a commitment request needs a Transaction UID and references")
        req = CommitmentRequest(
            transaction_uid, caller.ae_title, caller.address, tuple(references), time.time()
        )
        item = self.index.enqueue_claimed(KIND, req.key, req.payload(), owner, LEASE)
        detail = f"transaction {transaction_uid}: {len(references)} instance(s)"
        if item is None:
            detail += ", already pending: answered by its first report"
        self.archive.audit(caller, "commit", "success", "", detail)
        return None if item is None else PendingCommitment(item.pk, item.attempts, req, owner)

    def claim(self, owner: str, limit: int) -> list[PendingCommitment]:
        """Requests whose report is due and that nobody holds (the 'commitment' job)."""
        out = []
        for item in self.index.claim(KIND, owner, limit, LEASE):
            pending = self._pending(item, owner)
            if pending is not None:
                out.append(pending)
        return out

    def _pending(self, item: WorkItem, owner: str) -> PendingCommitment | None:
        try:
            return PendingCommitment(
                item.pk, item.attempts, CommitmentRequest.from_payload(item.payload), owner
            )
        except ValueError as e:
            log.error("storage commitment item %s given up: %s", item.key, e)
            self.index.fail(item.pk, str(e), retry_at=None)
            return None

    def keep(self, pending: PendingCommitment) -> bool:
        """Renew the claim (long verification or delivery); False if it was lost."""
        return self.index.extend_claim(pending.pk, pending.owner, LEASE)

    # ------------------------------------------------------------------ the rule
    def verify(
        self, references: Sequence[Reference], cancelled: Callable[[], bool] | None = None
    ) -> CommitmentResult | None:
        """Decide each instance now (see the module docstring); None if `cancelled()`
        became true on the way (the claim is then handed over unverified)."""
        committed: list[Reference] = []
        failed: list[Failure] = []
        quorum = self.archive.settings.replication.write_quorum
        for ref in references:
            if cancelled is not None and cancelled():
                return None
            record = self.index.instance(ref.sop_instance_uid)
            if record is None:
                failed.append(Failure(ref, NO_SUCH_OBJECT_INSTANCE, "not in the archive"))
                continue
            if record.sop_class_uid != ref.sop_class_uid:
                why = f"stored as SOP class {record.sop_class_uid}, not {ref.sop_class_uid}"
                failed.append(Failure(ref, CLASS_INSTANCE_CONFLICT, why))
                continue
            good, problems = self._good_copies(record, quorum)
            if good >= quorum:
                committed.append(ref)
            else:
                why = f"{good} verified archive copies of the {quorum} required"
                failed.append(Failure(ref, PROCESSING_FAILURE, "; ".join([why, *problems])))
        metrics.COMMITMENT.labels("committed").inc(len(committed))
        metrics.COMMITMENT.labels("failed").inc(len(failed))
        return CommitmentResult(tuple(committed), tuple(failed), time.time())

    def _good_copies(self, record: InstanceRecord, quorum: int) -> tuple[int, list[str]]:
        """Copies on healthy archive sites whose bytes hash to the recorded SHA-256, read one
        by one until `quorum` are found; with what disqualified the others."""
        placement = self.archive._placement
        good = 0
        problems: list[str] = []
        for copy in sorted(record.copies, key=lambda c: (c.state != "ok", c.site)):
            site = placement.sites.get(copy.site)
            if site is None or site.role != "archive":
                continue
            if not placement.is_up(site.name):
                problems.append(f"site {site.name} is down")
                continue
            if copy.state != "ok":
                problems.append(f"the copy on {site.name} is {copy.state}")
                continue
            try:
                data = self.archive.read_copy(site, copy.key)
            except StorageError as e:
                problems.append(str(e))
                continue
            if hashlib.sha256(data).hexdigest() != record.sha256:
                problems.append(str(self.archive.corrupt_copy(site.name, copy.key)))
                continue
            good += 1
            if good >= quorum:
                break
        return good, problems

    # ------------------------------------------------------------------ reports
    def reported(self, pending: PendingCommitment, result: CommitmentResult, where: str) -> None:
        """The requester confirmed the report (N-EVENT-REPORT-RSP): done."""
        req = pending.request
        self.index.complete([pending.pk])
        metrics.COMMITMENT_REPORTS.labels("sent").inc()
        outcome = "success" if not result.failed else "failed"
        self.archive.audit(
            Caller(req.requester, req.address),
            "report",
            outcome,
            "",
            f"transaction {req.transaction_uid}: {result.summary()}, {where}",
        )
        log.info(
            "storage commitment report of %s sent %s: %s", req.describe(), where, result.summary()
        )
        for f in result.failed[:20]:
            log.warning(
                "%s: %s not committed (0x%04X): %s",
                req.describe(),
                f.reference.sop_instance_uid,
                f.reason,
                f.why,
            )

    def hand_over(
        self, pending: PendingCommitment, result: CommitmentResult | None, why: str
    ) -> None:
        """Leave the report to the 'commitment' job, due now (the requester's association
        went away); the result, if there is one, goes with it and is not verified again."""
        payload = _with_result(pending.request, result)
        self.index.fail(pending.pk, why, retry_at=time.time(), payload=payload)

    def retry_later(
        self, pending: PendingCommitment, result: CommitmentResult | None, why: str
    ) -> bool:
        """A delivery failed: try again with backoff, or give up after
        `commitment.max_attempts` (listed by `pacsgrid commitment status`). True if given up."""
        cfg = self.archive.settings.commitment
        give_up = cfg.max_attempts > 0 and pending.attempts >= cfg.max_attempts
        delay = min(cfg.retry_max, cfg.retry_initial * 2 ** max(0, pending.attempts - 1))
        payload = _with_result(pending.request, result)
        self.index.fail(
            pending.pk, why, retry_at=None if give_up else time.time() + delay, payload=payload
        )
        metrics.COMMITMENT_REPORTS.labels("given_up" if give_up else "retry").inc()
        if not give_up:
            log.warning(
                "storage commitment report of %s not delivered (attempt %d, next in %.0fs): %s",
                pending.request.describe(),
                pending.attempts,
                delay,
                why,
            )
        else:
            req = pending.request
            self.archive.audit(
                Caller(req.requester, req.address),
                "report",
                "failed",
                "",
                f"transaction {req.transaction_uid}: given up after {pending.attempts} "
                f"attempt(s): {why}",
            )
            log.error(
                "storage commitment report of %s given up after %d attempt(s): %s",
                req.describe(),
                pending.attempts,
                why,
            )
        return give_up

    def pending(self, limit: int = 100) -> list[PendingWork]:
        """Requests whose report is not delivered yet, oldest first."""
        return self.index.pending_work(KIND, limit)

    def counts(self) -> dict[str, int]:
        """Requests by state: pending (report not yet delivered), done, failed (given up)."""
        return self.index.work_counts(KIND)

    def given_up(self, limit: int = 100) -> list[tuple[str, int, str]]:
        """(requester/Transaction UID, attempts, last error) of reports given up."""
        return self.index.work_failures(KIND, limit)

    def retry_given_up(self) -> int:
        return self.index.retry_failed_work(KIND)


def _with_result(req: CommitmentRequest, result: CommitmentResult | None) -> str | None:
    return None if result is None else dataclasses.replace(req, result=result).payload()
