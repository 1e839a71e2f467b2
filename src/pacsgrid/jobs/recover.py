"""Objects with no good copy left: finding them, and recovering them from kept versions.

Every copy of an object can go bad at once: a single site, or a bad write on each (with S3
Object Lock, a new version written over a good one). Repair cannot help then (it copies from a
good copy), but an S3 bucket with versioning keeps the older versions: `recover` looks through
the versions each site of the object keeps for one whose SHA-256 is the index's and makes it
current again (`S3Site.recover_version`). What stays without a good copy is `lost`, and every
command that looks at copies (audit, repair, sites) keeps listing it and exits non-zero, pass
after pass, until it is recovered or its copy is restored by hand.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pacsgrid.errors import StorageError
from pacsgrid.model import CopyRecord, InstanceRecord

if TYPE_CHECKING:
    from pacsgrid.archive import Archive
    from pacsgrid.index import CopyLedger
    from pacsgrid.storage.placement import Placement

log = logging.getLogger(__name__)


def recover(placement: Placement, ledger: CopyLedger, record: InstanceRecord) -> CopyRecord | None:
    """Recover `record` from an older good version on a site holding (or having held) it;
    the copy made good, recorded in `ledger`, or None when no site keeps one."""
    for copy in record.copies:
        site = placement.sites.get(copy.site)
        if site is None or not placement.is_up(site.name):
            continue
        recover_version = getattr(site, "recover_version", None)
        if recover_version is None:
            continue  # no versions on this kind of site
        try:
            version = recover_version(copy.key, record.sha256, record.size)
        except StorageError as e:
            log.warning("cannot look through the versions of %s on %s: %s", copy.key, site.name, e)
            continue
        if version is None:
            continue
        now = time.time()
        good = CopyRecord(site.name, copy.key, record.size, record.sha256, now, "ok", now)
        ledger.record_copies([(record.sop_uid, good)])
        log.warning(
            "%s on %s had no good copy: version %s, which matches the index, is current again",
            copy.key,
            site.name,
            version,
        )
        return good
    return None


def lost(archive: Archive, limit: int = 1000) -> list[str]:
    """SOP Instance UIDs of objects without a single good (ok) copy on any site."""
    return archive.lost(limit)
