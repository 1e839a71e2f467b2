"""Delivering storage commitment reports that could not go back on the requester's association.

A request reaches this job when its requester did not keep its association open for the report
(pacsgrid.dicom.commitment sends it there when it can), when the worker that held it died (its
claim runs out), or after a restart. The job claims due requests from the index's work queue,
verifies those that were not verified yet (the rule is `Archive.commitment.verify`), opens an
association to the requester's configured address (over TLS when its [[peers]] entry says so)
and sends the N-EVENT-REPORT there. A report the requester does not confirm is tried again with
exponential backoff (`commitment.retry_initial` doubling up to `retry_max`) and given up after
`commitment.max_attempts`, then listed by `pacsgrid commitment status`. When it starts, every
waiting report is made due at once: a restart is when an operator expects things to move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from pacsgrid.archive import Archive
from pacsgrid.archive.commitment import KIND, PendingCommitment, owner_name
from pacsgrid.dicom.commitment import holding, report_to_peer
from pacsgrid.errors import PacsgridError
from pacsgrid.index import WorkQueue

log = logging.getLogger("pacsgrid.commitment")
BATCH = 16


class CommitmentReporter:
    name = "commitment"

    def __init__(self, archive: Archive, queue: WorkQueue) -> None:
        """`queue` is the archive's work queue (built by pacsgrid.node)."""
        self.archive = archive
        self.queue = queue
        self.commitment = archive.commitment
        self.settings = archive.settings.commitment
        self.owner = owner_name("commitment")

    async def run(self, stop: asyncio.Event) -> None:
        woken = await asyncio.to_thread(self.queue.wake, KIND)
        if woken:
            log.info("%d storage commitment report(s) waiting: due now", woken)
        halt = threading.Event()  # for verifications running in threads
        relay = asyncio.create_task(_relay(stop, halt))
        try:
            while not stop.is_set():
                due = await asyncio.to_thread(self.commitment.claim, self.owner, BATCH)
                if not due:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.settings.poll)
                    continue
                for pending in due:
                    if stop.is_set():
                        await asyncio.to_thread(self.commitment.hand_over, pending, None, "")
                        continue
                    await self.deliver(pending, halt)
        finally:
            relay.cancel()

    async def deliver(self, pending: PendingCommitment, halt: threading.Event) -> None:
        req = pending.request
        result = req.result
        if result is None:
            result = await holding(
                self.commitment,
                pending,
                asyncio.to_thread(self.commitment.verify, req.references, halt.is_set),
            )
            if result is None:  # stopping
                await asyncio.to_thread(self.commitment.hand_over, pending, None, "")
                return
        peer = self.archive.settings.peer(req.requester)
        if peer is None:
            why = f"{req.requester!r} is no longer a configured peer: nowhere to send the report"
            await asyncio.to_thread(self.commitment.retry_later, pending, result, why)
            return
        try:
            where = await holding(
                self.commitment, pending, report_to_peer(self.archive, peer, req, result)
            )
        except PacsgridError as e:
            await asyncio.to_thread(self.commitment.retry_later, pending, result, str(e))
            return
        await asyncio.to_thread(self.commitment.reported, pending, result, where)


async def _relay(stop: asyncio.Event, halt: threading.Event) -> None:
    await stop.wait()
    halt.set()
