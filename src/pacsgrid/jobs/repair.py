"""The repair job: every object back to the policy's number of healthy archive copies.

Work arrives as "copy" items (key: SOP Instance UID) in the index's work queue:
- from ingest (the durable outbox: copies beyond the write quorum, queued in the same
  transaction as the index row);
- from a scan, which compares every healthy archive site's listing with the copies the index
  records there (a copy that is gone is marked "missing") and then queues every instance with
  fewer ok archive copies than `replication.copies`;
- from `pacsgrid sites init NAME` (a wiped or replaced site: every copy it held is missing).

Making a copy: read a good copy (any site; its SHA-256 is checked against the index), write it
to the best site that lacks one (a site that held a bad or missing copy first, then a new
location, then write order), record it with its hash. An object already there under the key is
kept when its hash is right and quarantined (evidence kept) when not. Items whose target sites
are all down wait (with back-off, and are woken when a site comes back up); items that keep
failing for another reason are given up after MAX_ATTEMPTS and listed by `pacsgrid repair`.

Resumable by construction: progress is the work queue plus the copy rows; an interrupted run
leaves claimed items whose lease runs out, and the next run picks them up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pacsgrid.archive.records import COPY
from pacsgrid.errors import NotFound, ObjectMissing, PacsgridError, SiteUnavailable, StorageError
from pacsgrid.index import Catalog, CopyLedger, WorkQueue
from pacsgrid.jobs.loop import repeat_in_thread
from pacsgrid.jobs.rate import RateLimiter
from pacsgrid.jobs.recover import lost, recover
from pacsgrid.model import CopyRecord, InstanceRecord
from pacsgrid.progress import Progress
from pacsgrid.storage import StorageSite
from pacsgrid.storage.listing import KeySet

if TYPE_CHECKING:
    from pacsgrid.archive import Archive
    from pacsgrid.archive.cache import CacheTier
    from pacsgrid.storage.placement import Placement

log = logging.getLogger(__name__)

KIND = COPY
MAX_ATTEMPTS = 10
BATCH = 64
LEASE = 600.0


class CopyIndex(Catalog, CopyLedger, WorkQueue, Protocol):
    """What repair and the fixity audit use of the index: the instances, their copies and
    the work queue of copies to make."""


@dataclass
class Outcome:
    state: str  # complete | copied | waiting | gone | error | lost (no good copy anywhere)
    records: list[tuple[str, CopyRecord]] = field(default_factory=list)
    nbytes: int = 0
    reason: str = ""


@dataclass
class RepairReport:
    counts: Counter[str] = field(default_factory=Counter)
    missing_found: dict[str, int] = field(default_factory=dict)  # per site, from listings
    unindexed: dict[str, int] = field(default_factory=dict)  # objects no row points at
    queued: int = 0
    waiting: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # no good copy on any site
    bytes: int = 0
    seconds: float = 0.0


class Repairer:
    def __init__(
        self,
        archive: Archive,
        index: CopyIndex,
        placement: Placement,
        *,
        rate_mb: float | None = None,
        jobs: int | None = None,
        owner: str | None = None,
    ) -> None:
        """`archive` reads objects and lists the lost ones; `index` and `placement` are the
        archive's own (pacsgrid.node builds a repair with them)."""
        self.archive = archive
        self.index = index
        self.placement = placement
        cfg = archive.settings.repair
        self.limiter = RateLimiter(cfg.rate_mb if rate_mb is None else rate_mb)
        self.jobs = jobs or cfg.jobs
        self.retry_max = cfg.retry_max
        self.copies = archive.settings.replication.copies
        self.owner = owner or f"repair-{os.getpid()}-{threading.get_ident()}"

    # ------------------------------------------------------------------ one instance
    def _archive_names(self) -> set[str]:
        return {s.name for s in self.placement.archive_sites()}

    def targets(self, record: InstanceRecord) -> tuple[int, list[StorageSite]]:
        """(copies still needed, healthy sites to put them on, best first)."""
        archives = self._archive_names()
        ok = {c.site for c in record.copies if c.state == "ok" and c.site in archives}
        need = self.copies - len(ok)
        if need <= 0:
            return 0, []
        held_bad = {c.site for c in record.copies if c.state != "ok"}
        used_locations = {self.placement.sites[n].location for n in ok}
        order = [s for s in self.placement.write_targets() if s.name not in ok]
        order.sort(key=lambda s: (s.name not in held_bad, s.location in used_locations))
        return need, order

    def copy_to(self, record: InstanceRecord, data: bytes, site: StorageSite) -> CopyRecord:
        """Write verified `data` of `record` to `site` (its key there); returns the record of
        the copy. A different object already under the key is quarantined, never clobbered."""
        key = next((c.key for c in record.copies), None) or _key(record)
        self.limiter.take(len(data))
        if not site.put(key, [data], sha256=record.sha256).created:
            try:
                existing = site.get(key)
            except ObjectMissing:
                existing = b""
            if hashlib.sha256(existing).hexdigest() != record.sha256:
                where = site.quarantine(
                    key, f"differs from the index ({record.sha256}); replaced by repair"
                )
                log.warning("%s on %s differed from the index: moved to %s", key, site.name, where)
                if not site.put(key, [data], sha256=record.sha256).created:
                    raise StorageError(site.name, f"{key} reappeared while being repaired")
        now = time.time()
        return CopyRecord(site.name, key, len(data), record.sha256, now, "ok", now)

    def replicate(self, sop_uid: str, *, recovered: bool = False) -> Outcome:
        """Bring one instance to the policy's number of ok archive copies."""
        record = self.index.instance(sop_uid)
        if record is None:
            return Outcome("gone")
        need, targets = self.targets(record)
        if need <= 0:
            return Outcome("complete")
        if not targets:
            return Outcome("waiting", reason="no healthy archive site lacks a copy")
        try:
            obj = self.archive.read(record, use_cache=False, verify=True)
        except NotFound as e:
            if any(c.state == "ok" and not self.placement.is_up(c.site) for c in record.copies):
                return Outcome("waiting", reason=str(e))  # a good copy is on a site that is down
            if recovered or recover(self.placement, self.index, record) is None:
                return Outcome("lost", reason=f"no good copy on any site: {e}")
            return self.replicate(sop_uid, recovered=True)  # a kept version is good again
        out = Outcome("copied")
        site_down = False
        for site in targets:
            if len(out.records) >= need:
                break
            try:
                out.records.append((sop_uid, self.copy_to(record, obj.data, site)))
                out.nbytes += len(obj.data)
            except SiteUnavailable as e:
                self.placement.mark_down(site.name, str(e))
                out.reason, site_down = str(e), True
            except StorageError as e:
                log.warning("repair of %s on %s failed: %s", sop_uid, site.name, e)
                out.reason = str(e)
        if len(out.records) < need:
            # Not whole yet: wait for a site when that is what stopped us, else count an error.
            out.state = "waiting" if site_down or out.records else "error"
            out.reason = out.reason or f"{need - len(out.records)} more copy(ies) needed"
        return out

    # ------------------------------------------------------------------ scan
    def reconcile(self, site: StorageSite) -> tuple[int, int]:
        """Compare a site's listing with the copies the index records there; mark the copies
        whose object is gone as missing. Returns (missing, unindexed objects).

        The sentinel is checked before and after listing: an unmounted volume lists as empty,
        and must not turn every copy it holds into a "missing" one."""
        health = site.check()
        if not health.ok:
            raise SiteUnavailable(site.name, health.reason)
        present = KeySet(o.key for o in site.list())  # 8 bytes per object, not the keys
        health = site.check()
        if not health.ok:
            raise SiteUnavailable(site.name, health.reason)
        missing: list[int] = []
        seen = 0
        after = 0
        while True:
            batch = self.index.site_copies(site.name, after, 5000)
            if not batch:
                break
            for c in batch:
                if c.key in present:
                    seen += 1
                elif c.state == "ok":
                    missing.append(c.instance_pk)
            after = batch[-1].instance_pk
        if missing:
            self.index.set_copy_state(site.name, missing, "missing")
            log.warning("site %s: %d recorded copies are gone", site.name, len(missing))
        return len(missing), max(0, len(present) - seen)

    def scan(self, report: RepairReport | None = None, stop: threading.Event | None = None) -> int:
        """Reconcile every healthy site, then queue every under-replicated instance.
        Returns how many items were (re)queued."""
        report = report or RepairReport()
        for site in self.placement.sites.values():
            if stop is not None and stop.is_set():
                return 0
            if not self.placement.is_up(site.name):
                continue
            try:
                missing, unindexed = self.reconcile(site)
            except SiteUnavailable as e:
                self.placement.mark_down(site.name, str(e))
                continue
            except StorageError as e:
                log.warning("cannot list site %s: %s", site.name, e)
                continue
            report.missing_found[site.name] = missing
            report.unindexed[site.name] = unindexed
        names = sorted(self._archive_names())
        queued = 0
        after = 0
        while stop is None or not stop.is_set():
            batch = self.index.under_replicated(names, self.copies, after, 2000)
            if not batch:
                break
            queued += self.index.enqueue(KIND, [(sop, "") for _, sop in batch])
            after = batch[-1][0]
        report.queued += queued
        return queued

    # ------------------------------------------------------------------ the queue
    def drain(
        self,
        stop: threading.Event,
        progress: Progress | None = None,
        report: RepairReport | None = None,
    ) -> RepairReport:
        """Make copies for every ready item until none is left (or `stop`)."""
        report = report or RepairReport()
        started = time.monotonic()
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="repair") as pool:
            while not stop.is_set():
                items = self.index.claim(KIND, self.owner, BATCH, LEASE)
                if not items:
                    break
                outcomes = list(pool.map(self._safe_replicate, (i.key for i in items)))
                records = [r for o in outcomes for r in o.records]
                self.index.record_copies(records)  # before completing: never lose a copy
                done = []
                # One transaction for the batch's failures: one per item, a site that lost
                # its objects made thousands of commits a minute that ingest waited behind.
                failed: list[tuple[int, str, float | None]] = []
                now = time.time()
                for item, o in zip(items, outcomes, strict=True):
                    report.counts[o.state] += 1
                    report.bytes += o.nbytes
                    if progress is not None:
                        progress.advance(o.state, o.nbytes)
                    if o.state in ("complete", "copied", "gone"):
                        done.append(item.pk)
                    elif o.state == "waiting":
                        pause = min(self.retry_max, 5.0 * 2 ** min(item.attempts, 12))
                        failed.append((item.pk, o.reason, now + pause))
                    elif o.state == "lost":  # retrying cannot help; each scan queues it again
                        failed.append((item.pk, o.reason, None))
                    elif item.attempts >= MAX_ATTEMPTS:
                        failed.append((item.pk, o.reason, None))
                        log.error("repair of %s given up: %s", item.key, o.reason)
                    else:
                        pause = min(self.retry_max, 5.0 * 2 ** min(item.attempts, 12))
                        failed.append((item.pk, o.reason, now + pause))
                self.index.fail_many(failed)
                self.index.complete(done)
        report.seconds += time.monotonic() - started
        return report

    def _safe_replicate(self, sop_uid: str) -> Outcome:
        try:
            return self.replicate(sop_uid)
        except PacsgridError as e:
            return Outcome("error", reason=str(e))
        except Exception as e:  # one bad item must not stop the job
            log.exception("repair of %s failed", sop_uid)
            return Outcome("error", reason=f"{type(e).__name__}: {e}")

    def run(
        self, stop: threading.Event, progress: Progress | None = None, *, scan: bool = True
    ) -> RepairReport:
        """`pacsgrid repair`: scan (optional), then drain the queue; report."""
        report = RepairReport()
        if scan:
            self.scan(report, stop)
        if progress is not None:
            counts = self.index.work_counts(KIND)
            progress.set_total(counts.get("pending", 0))
        self.drain(stop, progress, report)
        counts = self.index.work_counts(KIND)
        report.waiting = counts.get("pending", 0)
        report.lost = lost(self.archive)
        gone = set(report.lost)
        failures = self.index.work_failures(KIND, 50 + len(gone))
        report.failed = [(key, error) for key, _, error in failures if key not in gone][:50]
        return report


def _key(record: InstanceRecord) -> str:
    from pacsgrid.storage import object_key

    return object_key(record.study_uid, record.series_uid, record.sop_uid)


def adopt_site(index: CopyIndex, placement: Placement, name: str) -> int:
    """`pacsgrid sites init NAME`: take an empty (wiped or replaced) volume back into service.

    Writes the sentinel (refused when the volume holds data that is not ours), marks every
    copy the index recorded on the site as missing and queues those instances for repair.
    Returns how many instances were queued.
    """
    site = placement.sites.get(name)
    if site is None:
        raise NotFound(f"no site named {name!r} is configured")
    site.initialize()
    index.register_site(name)
    placement.probe()
    pks: list[int] = []
    uids: list[str] = []
    after = 0
    while True:
        batch = index.site_copies(name, after, 5000)
        if not batch:
            break
        for c in batch:
            if site.stat(c.key) is None:
                pks.append(c.instance_pk)
                uids.append(c.sop_uid)
        after = batch[-1].instance_pk
    index.set_copy_state(name, pks, "missing")
    return index.enqueue(KIND, [(u, "") for u in uids]) if uids else 0


class RepairComponent:
    """`serve`'s background repair: drains the outbox continuously, scans on a schedule,
    keeps cache sites within their watermarks."""

    name = "repair"

    def __init__(
        self,
        archive: Archive,
        index: CopyIndex,
        placement: Placement,
        cache: CacheTier,
        poll: float = 1.0,
    ) -> None:
        self.archive = archive
        self.cache = cache
        self.poll = poll
        self.wakeup = threading.Event()
        self.repairer = Repairer(archive, index, placement)
        placement.on_up.append(lambda _name: self.wakeup.set())

    async def run(self, stop: asyncio.Event) -> None:
        self._next_scan = time.monotonic()
        self._progress = Progress("repair", unit="objects", bar=False, interval=10.0)
        self._errors = 0
        await repeat_in_thread(stop, self._pass, wakeup=self.wakeup)

    def _pass(self, halt: threading.Event) -> float:
        """Scan when due, drain the outbox, keep the caches in bounds; returns the pause
        before the next pass (backing off while passes fail)."""
        try:
            if time.monotonic() >= self._next_scan:
                queued = self.repairer.scan(stop=halt)
                if queued:
                    log.info("repair scan queued %d under-replicated object(s)", queued)
                self._next_scan = time.monotonic() + self.archive.settings.repair.interval
            report = self.repairer.drain(halt, self._progress)
            if report.counts:
                log.info(
                    "repair: %s; %.1f MB in %.1fs (totals since start: %s)",
                    ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items())),
                    report.bytes / 1e6,
                    report.seconds,
                    self._progress.summary(),
                )
            self.cache.enforce()
            self._errors = 0
        except PacsgridError as e:
            self._errors += 1
            log.warning("repair pass failed (%s); backing off", e)
        backoff: float = self.poll * 2**self._errors
        return min(60.0, backoff)
