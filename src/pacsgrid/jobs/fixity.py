"""The fixity audit: re-read copies, compare their SHA-256 with the index, heal what is bad.

For each copy in state ok on a healthy site, least recently verified first:
- the bytes hash right: the copy's `verified_at` is set (batched);
- they do not: the copy is moved aside with `quarantine` (kept as evidence with a reason
  file, never overwritten), marked bad, and recreated on the same site from a good copy;
- it is gone: marked missing and recreated from a good copy;
- the site fails: marked down; its remaining copies wait for the next pass.
When no good copy is left anywhere, an older good version the site keeps (S3 versioning,
Object Lock) is made current again (pacsgrid.jobs.recover). Every pass ends by listing the
objects that still have no good copy (`AuditReport.lost`), whatever it checked: they are
reported, and the pass fails, until they are recovered.

On demand (`pacsgrid audit`) a pass checks every copy not verified since the pass began; the
start time is kept in the index (job_state), so an interrupted pass resumes rather than starting
over (`--restart` starts over). In `serve` a pass runs every `audit.interval` seconds over the
copies not verified for `audit.max_age_days`, limited to `audit.rate_mb`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pacsgrid.errors import NotFound, ObjectMissing, PacsgridError, SiteUnavailable, StorageError
from pacsgrid.index.sites import SiteCopy
from pacsgrid.jobs.loop import repeat_in_thread
from pacsgrid.jobs.rate import RateLimiter
from pacsgrid.jobs.recover import lost, recover
from pacsgrid.jobs.repair import CopyIndex, Repairer
from pacsgrid.progress import Progress

if TYPE_CHECKING:
    from pacsgrid.archive import Archive
    from pacsgrid.storage.placement import Placement

log = logging.getLogger(__name__)

STATE_KEY = "audit.on_demand"


@dataclass(frozen=True)
class Finding:
    site: str
    key: str
    sop_uid: str
    problem: str  # corrupt | missing
    action: str  # what the audit did about it
    repaired: bool


@dataclass
class AuditReport:
    counts: Counter[str] = field(default_factory=Counter)  # ok, corrupt, missing, unreachable
    findings: list[Finding] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    resumed: bool = False
    lost: list[str] = field(default_factory=list)  # objects without a good copy anywhere

    @property
    def checked(self) -> int:
        return self.counts["ok"] + self.counts["corrupt"] + self.counts["missing"]


class Auditor:
    def __init__(
        self,
        archive: Archive,
        index: CopyIndex,
        placement: Placement,
        *,
        rate_mb: float = 0.0,
        jobs: int = 2,
    ) -> None:
        """`archive` reads objects and lists the lost ones; `index` and `placement` are the
        archive's own (pacsgrid.node builds an audit with them)."""
        self.archive = archive
        self.index = index
        self.placement = placement
        self.limiter = RateLimiter(rate_mb)
        self.jobs = jobs
        self.repairer = Repairer(archive, index, placement, rate_mb=0.0)

    def check(self, c: SiteCopy, report: AuditReport) -> str:
        """Check one copy; heal it if needed. Returns ok | corrupt | missing | unreachable."""
        site = self.placement.sites[c.site]
        self.limiter.take(c.size)
        try:
            data = site.get(c.key)
        except ObjectMissing:
            self.index.set_copy_state(c.site, [c.instance_pk], "missing")
            self._heal(c, "missing", "was gone", report)
            return "missing"
        except SiteUnavailable as e:
            self.placement.mark_down(c.site, str(e))
            return "unreachable"
        except StorageError as e:
            log.warning("audit cannot read %s on %s: %s", c.key, c.site, e)
            return "unreachable"
        report.bytes += len(data)
        actual = hashlib.sha256(data).hexdigest()
        if actual == c.sha256:
            return "ok"
        reason = (
            f"fixity audit {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: "
            f"SHA-256 {actual} != recorded {c.sha256} ({len(data)} bytes, {c.size} recorded)"
        )
        try:
            where = site.quarantine(c.key, reason)
        except StorageError as e:
            self.index.set_copy_state(c.site, [c.instance_pk], "bad")
            report.findings.append(
                Finding(c.site, c.key, c.sop_uid, "corrupt", f"cannot quarantine: {e}", False)
            )
            return "corrupt"
        self.index.set_copy_state(c.site, [c.instance_pk], "bad")
        log.error("corrupt copy %s on %s moved to %s", c.key, c.site, where)
        self._heal(c, "corrupt", f"quarantined as {where}", report)
        return "corrupt"

    def _heal(self, c: SiteCopy, problem: str, what: str, report: AuditReport) -> None:
        """Recreate the copy on its site from a good copy elsewhere."""
        site = self.placement.sites[c.site]
        record = self.index.instance(c.sop_uid)
        if record is None:
            return
        try:
            good = self.archive.read(record, use_cache=False, verify=True)
            if site.role == "cache":
                self.index.remove_copy(c.sop_uid, c.site)  # a cache refills on demand
                action, repaired = f"{what}; dropped from the cache", True
            else:
                copy = self.repairer.copy_to(record, good.data, site)
                self.index.record_copies([(c.sop_uid, copy)])
                action, repaired = f"{what}; recreated from {good.site}", True
        except NotFound as e:
            # No good copy left: a kept version?
            again = recover(self.placement, self.index, record)
            if again is not None:
                action, repaired = f"{what}; an older good version on {again.site} restored", True
            else:
                action, repaired = f"{what}; NOT recreated, no good copy on any site: {e}", False
        except StorageError as e:
            action, repaired = f"{what}; NOT recreated: {e}", False
            self.index.enqueue("copy", [(c.sop_uid, "")])
        report.findings.append(Finding(c.site, c.key, c.sop_uid, problem, action, repaired))

    def run(
        self,
        stop: threading.Event,
        progress: Progress | None = None,
        *,
        sites: list[str] | None = None,
        before: float | None = None,
        limit: int | None = None,
        resume: bool = True,
    ) -> AuditReport:
        """Check the copies on `sites` (all healthy ones by default) not verified since
        `before` (default: since this pass began; resumable through job_state)."""
        report = AuditReport()
        started = time.monotonic()
        names = [n for n in self.placement.sites if not sites or n in sites]
        stateful = resume and before is None  # an on-demand pass that can be resumed
        saved = self.index.get_job_state(STATE_KEY) if stateful else None
        if before is None:
            if saved:
                before = float(json.loads(saved)["before"])
                report.resumed = True
            else:
                before = time.time()
                if stateful:
                    self.index.set_job_state(STATE_KEY, json.dumps({"before": before}))
        cursor = (0, "")
        done = 0
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="audit") as pool:
            while not stop.is_set() and (limit is None or done < limit):
                up = [n for n in names if self.placement.is_up(n)]
                batch = self.index.audit_candidates(up, before, cursor, 100)
                if limit is not None:
                    batch = batch[: limit - done]
                if not batch:
                    if stateful:
                        self.index.set_job_state(STATE_KEY, None)  # the pass is complete
                    break
                results = list(pool.map(lambda c: self._safe_check(c, report), batch))
                now = time.time()
                verified: dict[str, list[int]] = {}
                for c, result in zip(batch, results, strict=True):
                    report.counts[result] += 1
                    if result == "ok":
                        verified.setdefault(c.site, []).append(c.instance_pk)
                    if progress is not None:
                        progress.advance(result, c.size)
                for site, pks in verified.items():
                    self.index.set_copy_state(site, pks, "ok", verified_at=now)
                cursor = (batch[-1].instance_pk, batch[-1].site)
                done += len(batch)
        report.lost = self._lost(stop)
        report.seconds = time.monotonic() - started
        return report

    def _lost(self, stop: threading.Event) -> list[str]:
        """Objects with no good copy: recover what a kept version allows; the others."""
        out = []
        for sop in lost(self.archive):
            record = None if stop.is_set() else self.index.instance(sop)
            if record is None or recover(self.placement, self.index, record) is None:
                out.append(sop)
        return out

    def _safe_check(self, c: SiteCopy, report: AuditReport) -> str:
        try:
            return self.check(c, report)
        except PacsgridError as e:
            log.warning("audit of %s on %s failed: %s", c.key, c.site, e)
            return "unreachable"


class AuditComponent:
    """`serve`'s scheduled audit: every `audit.interval` seconds, the copies whose last check
    is older than `audit.max_age_days`, at most `audit.rate_mb`."""

    name = "audit"

    def __init__(self, archive: Archive, index: CopyIndex, placement: Placement) -> None:
        self.archive = archive
        cfg = archive.settings.audit
        self.auditor = Auditor(archive, index, placement, rate_mb=cfg.rate_mb, jobs=1)

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.archive.settings.audit
        if cfg.interval <= 0:
            return
        await repeat_in_thread(stop, self._pass)

    def _pass(self, halt: threading.Event) -> float:
        """Check the copies not checked for `audit.max_age_days`; returns the pause before
        the next pass (`audit.interval`)."""
        cfg = self.archive.settings.audit
        progress = Progress("audit", unit="copies", bar=False, interval=60.0)
        try:
            report = self.auditor.run(
                halt, progress, before=time.time() - cfg.max_age_days * 86400, resume=False
            )
            if report.checked:
                log.info("audit: %s", progress.summary())
            for f in report.findings:
                log.error("audit: %s %s on %s: %s", f.problem, f.key, f.site, f.action)
            if report.lost:
                log.error(
                    "audit: %d object(s) have no good copy on any site (first: %s); "
                    "'pacsgrid audit' lists them",
                    len(report.lost),
                    report.lost[0],
                )
        except PacsgridError as e:
            log.warning("audit pass failed: %s", e)
        return cfg.interval
