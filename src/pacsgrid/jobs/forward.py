"""Forwarding: send newly received instances to peers, from the durable queue in the index.

`Archive.ingest` queues a 'forward' work item (key '<SOP Instance UID>><peer AE>') in the same
transaction as the instance row, for every rule in `[[forward]]` that selects it; so an
acknowledged instance is never acknowledged-but-not-queued, and the queue survives restarts.
This component claims items with a lease (another node takes them over if this one dies),
sends them with C-STORE on one association per peer and batch (in the stored transfer syntax
when the peer accepts it, converted otherwise), and marks them done. A failure is retried
with exponential backoff (`forwarding.retry_initial` doubling up to `retry_max`); after
`forwarding.max_attempts` the item is given up and listed by `pacsgrid forward status`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

from pacsgrid.archive import FORWARD, Archive
from pacsgrid.dicom import dimse
from pacsgrid.dicom.association import AssociationAborted
from pacsgrid.dicom.retrieve import pick_context, proposals_for
from pacsgrid.dicom.scu import AssociationRejected, connect_to
from pacsgrid.dicomfile.transcode import TranscodeError, transcode
from pacsgrid.errors import PacsgridError
from pacsgrid.index import WorkItem, WorkQueue
from pacsgrid.jobs.loop import repeat
from pacsgrid.model import InstanceRecord

log = logging.getLogger("pacsgrid.forward")
T = TypeVar("T")
LEASE = 600.0


class Forwarder:
    name = "forward"

    def __init__(self, archive: Archive, queue: WorkQueue) -> None:
        """`archive` reads what is sent; `queue` is its work queue (built by pacsgrid.node)."""
        self.archive = archive
        self.queue = queue
        self.settings = archive.settings.forwarding
        self.owner = f"{socket.gethostname()}:{os.getpid()}:forward"
        self.sent = 0
        self.failed = 0
        self._last_error_log: dict[str, float] = {}

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("forwarding queue: %s", self.queue.work_counts(FORWARD))
        await repeat(stop, self._pass)

    async def _pass(self) -> float:
        """Send one batch of the queue; returns the pause before the next (none while items
        are waiting)."""
        items = await self._call(self.queue.claim, FORWARD, self.owner, self.settings.batch, LEASE)
        if not items:
            return self.settings.poll
        by_peer: dict[str, list[WorkItem]] = defaultdict(list)
        for item in items:
            by_peer[item.payload or item.key.rpartition(">")[2]].append(item)
        for peer, group in by_peer.items():
            await self.send(peer, group)
        return 0.0

    async def send(self, peer_ae: str, items: list[WorkItem]) -> None:
        peer = self.archive.settings.peer(peer_ae)
        if peer is None:
            for item in items:
                await self._fail(item, f"{peer_ae!r} is not a configured peer", permanent=True)
            return
        records: list[tuple[WorkItem, InstanceRecord]] = []
        for item in items:
            record = await self._call(self.archive.outgoing, item.key.rpartition(">")[0])
            if record is None:
                why = "the instance is no longer in the archive, or a rejection note hides it"
                await self._fail(item, why, permanent=True)
            else:
                records.append((item, record))
        if not records:
            return
        try:
            assoc = await connect_to(
                peer,
                self.archive.settings.dicom.ae_title,
                proposals_for([r for _, r in records]),
                timeout=self.archive.settings.dicom.timeout,
            )
        except (OSError, AssociationRejected, AssociationAborted, TimeoutError) as e:
            why = f"cannot open an association to {peer.ae_title}@{peer.host}:{peer.port}: {e}"
            self._log_error(peer_ae, why)
            for item, _ in records:
                await self._fail(item, why)
            return
        done: list[int] = []
        try:
            for item, record in records:
                error = await self._store_one(assoc, record)
                if error:
                    await self._fail(item, error)
                else:
                    done.append(item.pk)
        finally:
            await assoc.release()
            if done:
                await self._call(self.queue.complete, done)
                self.sent += len(done)
                log.info("forwarded %d instance(s) to %s", len(done), peer_ae)

    async def _store_one(self, assoc: Any, record: InstanceRecord) -> str:
        """Send one instance; '' on success, otherwise why it failed."""
        ctx, send_ts = pick_context(
            assoc.contexts.values(), record.sop_class_uid, record.transfer_syntax
        )
        if ctx is None:
            return f"the peer accepted no context for SOP class {record.sop_class_uid}"
        try:
            obj = await self._call(self.archive.read, record)
            dataset: bytes | memoryview = obj.dataset
            if send_ts != obj.transfer_syntax:
                dataset = await self._call(transcode, dataset, obj.transfer_syntax, send_ts)
            status, comment = await assoc.c_store(
                ctx.id, record.sop_class_uid, record.sop_uid, dataset
            )
        except (PacsgridError, TranscodeError, AssociationAborted) as e:
            return str(e) or type(e).__name__
        if dimse.status_category(status) == "failure":
            return f"status 0x{status:04X} {comment}".strip()
        return ""

    async def _fail(self, item: WorkItem, error: str, *, permanent: bool = False) -> None:
        s = self.settings
        give_up = permanent or (s.max_attempts > 0 and item.attempts >= s.max_attempts)
        delay = min(s.retry_max, s.retry_initial * 2 ** max(0, item.attempts - 1))
        retry_at = None if give_up else time.time() + delay
        await self._call(self.queue.fail, item.pk, error, retry_at)
        self.failed += 1
        if give_up:
            log.error(
                "forwarding %s given up after %d attempt(s): %s", item.key, item.attempts, error
            )

    def _log_error(self, peer: str, why: str) -> None:
        """At most one line a minute per peer while it is down."""
        now = time.monotonic()
        if now - self._last_error_log.get(peer, -1e9) >= 60:
            self._last_error_log[peer] = now
            log.warning("forwarding: %s (retrying with backoff)", why)
