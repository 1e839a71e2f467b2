"""The cache tier: spill and fill.

A site with role "cache" holds copies of recently retrieved objects, in front of slower or
farther archive sites. Rules:
- fill: a read served by an archive site (already checked against the recorded SHA-256) puts
  the object in every healthy cache site that lacks it; that read also counts as a fixity
  check of the archive copy it came from;
- spill: above `high_watermark` x `capacity` the least recently read copies are evicted down to
  `low_watermark` x `capacity`, but only copies whose instance has a verified ok copy on an
  archive site: the only copy of an object is never evicted;
- the index row of an evicted copy is removed before the object, so a crash in between leaves
  an unindexed file in the cache (garbage), never a row pointing at nothing.
Reads from a cache are remembered in memory and written to the index in batches (LRU order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable

from pacsgrid.errors import SiteUnavailable, StorageError
from pacsgrid.index import CopyLedger
from pacsgrid.model import CopyRecord, InstanceRecord
from pacsgrid.settings import Settings, SiteSettings
from pacsgrid.storage.placement import Placement

log = logging.getLogger(__name__)

TOUCH_FLUSH_SECONDS = 5.0
USAGE_REFRESH_SECONDS = 30.0


class CacheTier:
    def __init__(self, index: CopyLedger, placement: Placement, settings: Settings) -> None:
        self.index = index
        self.placement = placement
        self.caches: dict[str, SiteSettings] = {
            s.name: s for s in settings.sites if s.role == "cache" and s.name in placement.sites
        }
        self.archive_names = [s.name for s in placement.archive_sites()]
        self._usage: dict[str, tuple[int, float]] = {}
        self._touched: dict[str, set[str]] = {}
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._evicting = threading.Lock()

    # ------------------------------------------------------------------ reads
    def fills_from(self, site: str) -> bool:
        """Whether a read from `site` fills the caches (it must be verified first)."""
        return bool(self.caches) and site not in self.caches

    def on_read(self, record: InstanceRecord, source: CopyRecord, data: bytes) -> None:
        """Called after a verified read: remember a cache hit, or fill the caches."""
        if not self.caches:
            return
        if source.site in self.caches:
            self._touch(source.site, record.sop_uid)
            return
        self.fill(record, data, source)

    def _touch(self, site: str, sop_uid: str) -> None:
        with self._lock:
            self._touched.setdefault(site, set()).add(sop_uid)
            due = time.monotonic() - self._last_flush >= TOUCH_FLUSH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, {}
            self._last_flush = time.monotonic()
        now = time.time()
        for site, uids in touched.items():
            try:
                self.index.touch_copies(site, sorted(uids), now)
            except Exception as e:  # LRU order is a hint; never fail a read for it
                log.warning("cannot record cache reads on %s: %s", site, e)

    def fill(self, record: InstanceRecord, data: bytes, source: CopyRecord | None) -> list[str]:
        """Put `data` (verified bytes of `record`) in every healthy cache lacking it."""
        filled = []
        for name, cfg in self.caches.items():
            if not self.placement.is_up(name):
                continue
            if any(c.site == name and c.state == "ok" for c in record.copies):
                continue
            if cfg.capacity and len(data) > cfg.capacity * cfg.high_watermark:
                continue  # larger than the cache may ever hold
            site = self.placement.sites[name]
            key = source.key if source else record.copies[0].key
            try:
                if not site.put(key, [data], sha256=record.sha256).created:
                    old = site.get(key)
                    if hashlib.sha256(old).hexdigest() != record.sha256:
                        site.delete(key)  # a cache may drop what it holds
                        site.put(key, [data], sha256=record.sha256)
            except SiteUnavailable as e:
                self.placement.mark_down(name, str(e))
                continue
            except StorageError as e:
                log.warning("cache fill of %s on %s failed: %s", record.sop_uid, name, e)
                continue
            now = time.time()
            rows = [
                (record.sop_uid, CopyRecord(name, key, len(data), record.sha256, now, "ok", now))
            ]
            if source is not None and source.site not in self.caches:
                rows.append((record.sop_uid, dataclasses.replace(source, verified_at=now)))
            self.index.record_copies(rows)
            filled.append(name)
            if self._add_usage(name, len(data)) > cfg.capacity * cfg.high_watermark > 0:
                self.evict(name)
        return filled

    def _add_usage(self, name: str, nbytes: int) -> int:
        with self._lock:
            used, at = self._usage.get(name, (0, 0.0))
            fresh = time.monotonic() - at < USAGE_REFRESH_SECONDS
        if not fresh:
            used = self.index.site_bytes(name)
            at = time.monotonic()
        else:
            used += nbytes
        with self._lock:
            self._usage[name] = (used, at)
        return used

    # ------------------------------------------------------------------ spill
    def enforce(self) -> int:
        """Evict on every cache site above its high watermark; returns objects evicted."""
        return sum(self.evict(name) for name in self.caches)

    def evict(self, name: str, on_evict: Callable[[str, int], None] | None = None) -> int:
        """Evict least recently used copies from `name` down to its low watermark, if it is
        above its high watermark. Returns how many were evicted."""
        cfg = self.caches[name]
        if not cfg.capacity or not self._evicting.acquire(blocking=False):
            return 0
        try:
            self.flush()
            used = self.index.site_bytes(name)
            evicted = 0
            if used > cfg.capacity * cfg.high_watermark:
                target = cfg.capacity * cfg.low_watermark
                site = self.placement.sites[name]
                while used > target:
                    batch = self.index.eviction_candidates(name, self.archive_names, 200)
                    if not batch:
                        log.warning(
                            "cache %s is above its watermark (%d bytes) but no object in it "
                            "has a verified archive copy to fall back on",
                            name,
                            used,
                        )
                        break
                    for sop_uid, key, size in batch:
                        if used <= target:
                            break
                        self.index.remove_copy(sop_uid, name)
                        try:
                            site.delete(key)
                        except StorageError as e:
                            log.warning("evicted %s from %s but cannot delete it: %s", key, name, e)
                        used -= size
                        evicted += 1
                        if on_evict:
                            on_evict(key, size)
                log.info("cache %s: evicted %d object(s), %d bytes in use", name, evicted, used)
            with self._lock:
                self._usage[name] = (used, time.monotonic())
            return evicted
        finally:
            self._evicting.release()
