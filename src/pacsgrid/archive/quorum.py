"""Writing one object to the write quorum of sites.

The quorum's copies are written at the same time (one thread per site beyond the first), so a
store waits for the slowest of its sites, not for the sum of them; a site that fails is marked
down and the next healthy site in placement order takes its place. Copies beyond the quorum
are left to the repair job (the outbox, see Archive.outbox).

An object already stored under the key (a concurrent store of the same SOP Instance UID, or
an object a crash left unindexed) is adopted: its bytes become the object, so that every copy
and the index agree; a site that received the new bytes meanwhile gets the adopted ones.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pacsgrid import metrics
from pacsgrid.archive.recovery import header_of
from pacsgrid.dicomfile.header import Header
from pacsgrid.errors import InvalidDataset, SiteUnavailable, StorageError
from pacsgrid.model import CopyRecord
from pacsgrid.storage import PutResult, StorageSite
from pacsgrid.storage.placement import Placement

log = logging.getLogger(__name__)


@dataclass
class Written:
    """The outcome of a quorum write. `held`: log records to release once the index row that
    points at the copies is committed (see StorageSite.put)."""

    header: Header
    digest: str
    size: int
    copies: list[CopyRecord] = field(default_factory=list)
    held: list[PutResult] = field(default_factory=list)
    adopted: bytes | None = None  # the bytes of an object found under the key

    def release(self) -> None:
        for h in self.held:
            h.release()

    @property
    def logged(self) -> bool:
        """Whether a site log holds a record of this object (it replays the index row)."""
        return any(h.receipt is not None for h in self.held)


class QuorumWriter:
    def __init__(self, placement: Placement, quorum: int) -> None:
        self.placement = placement
        self.quorum = quorum
        self._pool = ThreadPoolExecutor(max(1, quorum - 1), thread_name_prefix="put")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def write(
        self,
        header: Header,
        key: str,
        chunks: list[bytes],
        targets: list[StorageSite],
        replace: bool,
        note: str,
    ) -> Written:
        sha = hashlib.sha256()
        for c in chunks:
            sha.update(c)
        out = Written(header, sha.hexdigest(), sum(len(c) for c in chunks))
        todo = list(targets)
        while len(out.copies) < self.quorum and todo:
            need = self.quorum - len(out.copies)
            batch, todo = todo[:need], todo[need:]
            body = [out.adopted] if out.adopted is not None else chunks
            digest, size = out.digest, out.size
            first, rest = batch[0], batch[1:]
            futures = [
                self._pool.submit(self._put, s, key, body, replace, digest, note) for s in rest
            ]
            results = [(first, self._put(first, key, body, replace, digest, note))]
            results += [(s, f.result()) for s, f in zip(rest, futures, strict=True)]
            for site, result in results:
                if result is None:
                    continue
                out.held.append(result)
                held_digest, held_size = digest, size
                if not result.created:
                    outcome = self._adopt(out, site, key, body, note)
                    if outcome == "failed":
                        continue
                    if outcome == "adopted":
                        held_digest, held_size = out.digest, out.size
                out.copies.append(CopyRecord(site.name, key, held_size, held_digest, time.time()))
        self._agree(out, key, note)
        return out

    def _put(
        self,
        site: StorageSite,
        key: str,
        chunks: list[bytes],
        replace: bool,
        digest: str,
        note: str,
    ) -> PutResult | None:
        metrics.SITE_OPS.labels(site.name, "put").inc()
        try:
            return site.put(key, chunks, replace=replace, hold=True, sha256=digest, note=note)
        except SiteUnavailable as e:
            metrics.SITE_ERRORS.labels(site.name, "put").inc()
            self.placement.mark_down(site.name, str(e))
        except StorageError as e:
            metrics.SITE_ERRORS.labels(site.name, "put").inc()
            log.warning("store of %s on %s failed: %s", key, site.name, e)
        return None

    def _adopt(
        self, out: Written, site: StorageSite, key: str, chunks: list[bytes], note: str
    ) -> str:
        """An object was already under the key: take its bytes ("adopted"), or replace it if
        it is unreadable ("ours": the site now holds our bytes; "failed": it could not)."""
        try:
            data = site.get(key)
            header = header_of(data)
        except (StorageError, InvalidDataset) as e:
            log.warning("replacing unreadable object %s on %s: %s", key, site.name, e)
            digest = hashlib.sha256(b"".join(chunks)).hexdigest()
            result = self._put(site, key, chunks, True, digest, note)
            if result is None:
                return "failed"
            out.held.append(result)
            return "ours"
        digest = hashlib.sha256(data).hexdigest()
        out.header, out.digest, out.size, out.adopted = header, digest, len(data), data
        return "adopted"

    def _agree(self, out: Written, key: str, note: str) -> None:
        """After an adoption, copies written in parallel with the new bytes get the adopted
        ones (rare: a duplicate raced or a leftover was found)."""
        if out.adopted is None:
            return
        fixed = []
        for copy in out.copies:
            if copy.sha256 != out.digest:
                site = self.placement.sites[copy.site]
                result = self._put(site, key, [out.adopted], True, out.digest, note)
                if result is None:
                    continue  # that copy is dropped; the quorum check decides
                out.held.append(result)
            fixed.append(CopyRecord(copy.site, key, out.size, out.digest, copy.stored_at))
        out.copies = fixed
