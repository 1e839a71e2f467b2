"""Reading an object from its copies (a mixin of `Archive`): the best copy first, falling
back copy by copy; every copy checked against its SHA-256 before it is served or fills the
cache tier; a corrected instance re-encoded with its corrected values on the way out.

C-GET, C-MOVE, WADO, forwarding, repair and the fixity audit all read here, so a copy that
does not match is never served, copied or cached, whoever asks.
"""

from __future__ import annotations

import hashlib
import logging
import time

from pacsgrid import metrics
from pacsgrid.archive.cache import CacheTier
from pacsgrid.archive.records import Caller, StoredObject
from pacsgrid.dicomfile.coercion import CoercionError, coerce
from pacsgrid.dicomfile.part10 import split_part10
from pacsgrid.errors import NotFound, ObjectCorrupt, SiteUnavailable, StorageError
from pacsgrid.model import InstanceRecord
from pacsgrid.settings import Settings
from pacsgrid.storage import StorageSite
from pacsgrid.storage.placement import Placement

log = logging.getLogger("pacsgrid.archive.service")  # the name these lines always had


class Reading:
    """Relies on Archive's `settings`, `_placement` and `_cache`."""

    settings: Settings
    _placement: Placement
    _cache: CacheTier

    def read(
        self,
        record: InstanceRecord,
        caller: Caller | None = None,
        *,
        use_cache: bool = True,
        verify: bool | None = None,
    ) -> StoredObject:
        """The object's bytes from the best copy, falling back copy by copy.

        Every read is checked against the recorded SHA-256 (`verify`; default
        `audit.verify_reads`, on unless turned off); a copy that does not match is skipped
        (and reported), never served. The repair and audit jobs always verify: a copy made
        from a bad source would spread the damage. A read served by an archive site fills the
        cache tier (`use_cache=False` for those jobs, which must not churn it).

        A record `locate` or `outgoing` marked as corrected is read as stored (and checked
        against the stored object's SHA-256), then re-encoded with its corrected values
        (pacsgrid.dicomfile.coercion); every other object is returned as stored.
        """
        service = metrics.service_of(caller.via if caller else "dimse")
        started = time.perf_counter()
        try:
            check = self.settings.audit.verify_reads if verify is None else verify
            obj = self._read(record, use_cache, check)
            if record.corrections:
                obj = self._corrected(obj, record)
        except NotFound:
            metrics.RETRIEVE.labels(service, "failed").inc()
            raise
        metrics.RETRIEVE.labels(service, "success").inc()
        metrics.RETRIEVE_BYTES.labels(service).inc(len(obj.data))
        metrics.RETRIEVE_SECONDS.labels(service).observe(time.perf_counter() - started)
        return obj

    def _corrected(self, obj: StoredObject, record: InstanceRecord) -> StoredObject:
        try:
            dataset = coerce(
                obj.dataset,
                obj.transfer_syntax,
                record.corrections,
                system=self.settings.dicom.ae_title,
            )
        except CoercionError as e:
            raise NotFound(f"{record.sop_uid} cannot be sent with its corrections: {e}") from e
        meta = obj.data[: obj.dataset_offset]
        return StoredObject(meta + dataset, obj.dataset_offset, obj.transfer_syntax, obj.site)

    def _read(self, record: InstanceRecord, use_cache: bool, verify: bool) -> StoredObject:
        errors = []
        for site, copy in self._placement.read_order(record.copies):
            try:
                data = self.read_copy(site, copy.key)
            except StorageError as e:
                errors.append(str(e))
                continue
            # Even with verification off, what fills the cache tier is checked first.
            check = verify or (use_cache and self._cache.fills_from(site.name))
            if check and hashlib.sha256(data).hexdigest() != record.sha256:
                errors.append(str(self.corrupt_copy(site.name, copy.key)))
                continue
            p10 = split_part10(data)
            if use_cache:
                try:
                    self._cache.on_read(record, copy, data)
                except Exception:  # the cache is an optimisation: never fail a read for it
                    log.exception("cache update after reading %s failed", record.sop_uid)
            return StoredObject(data, p10.dataset_offset, p10.transfer_syntax, site.name)
        raise NotFound(
            f"no readable copy of {record.sop_uid}: " + ("; ".join(errors) or "no copies recorded")
        )

    def read_copy(self, site: StorageSite, key: str) -> bytes:
        """One copy's bytes, as they are (not verified), counted in the site's metrics; a
        site found unavailable is marked down. Raises StorageError."""
        metrics.SITE_OPS.labels(site.name, "get").inc()
        try:
            return site.get(key)
        except StorageError as e:
            metrics.SITE_ERRORS.labels(site.name, "get").inc()
            if isinstance(e, SiteUnavailable):
                self._placement.mark_down(site.name, str(e))
            raise

    def corrupt_copy(self, site: str, key: str) -> ObjectCorrupt:
        """A copy read back does not match its SHA-256: counted and logged for the operator
        (the fixity audit quarantines and repairs it); the error, for the caller to report."""
        metrics.SITE_ERRORS.labels(site, "verify").inc()
        err = ObjectCorrupt(
            site,
            f"{key} does not match its SHA-256",
            hint="run 'pacsgrid audit' to quarantine and repair it",
        )
        log.error("%s", err)
        return err
