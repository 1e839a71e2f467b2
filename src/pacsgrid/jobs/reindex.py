"""Rebuild the index from the storage sites, or reconcile the two.

Storage is the source of truth: every object is a complete Part 10 file, so its header says
everything the index holds about it. `reindex` lists every site, skips the objects the index
already records on that site, and reads, hashes and scans the rest (in a pool of processes: the
header scan is CPU work), committing them in batches through the same `add_batch` as ingest.

- On an empty (lost, or new) database that rebuilds the whole index.
- Interrupted, it keeps what it committed; run again, it skips that: resumable and idempotent.
- The archive keeps ingesting meanwhile. An object written by a store whose index commit has
  not happened yet may be indexed here first; the store's own commit then finds it indexed
  (a duplicate with the same bytes) and still answers success.
- An object whose UID is already indexed with other bytes is not recorded as a copy; it is
  reported as a conflict (the fixity audit decides which copy is right).

Corrections (pacsgrid.correction) are documents on the sites, not objects: after the objects
are indexed, every correction the index lacks (or holds as pending) is applied, in order, so
the rebuilt index answers with the corrected state (merged patients, hidden instances, undos).

`reconcile=True` also reports index rows whose objects exist on no site (e.g. after restoring
an index backup newer than a site, or an asynchronous failover in the other direction) and
copies recorded on a site that no longer holds them. It never deletes anything: rows and
objects are listed for the operator.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

from pacsgrid.correction import (
    DOC_PREFIX,
    DOC_SUFFIX,
    Correction,
    CorrectionFormatError,
    doc_key,
    seq_of_key,
)
from pacsgrid.dicomfile.header import scan
from pacsgrid.dicomfile.part10 import split_part10
from pacsgrid.errors import InvalidDataset, StorageError
from pacsgrid.index import AddResult, Index, NewInstance
from pacsgrid.model import CopyRecord
from pacsgrid.progress import Progress
from pacsgrid.settings import SiteSettings
from pacsgrid.storage import ObjectInfo, StorageSite, open_site
from pacsgrid.storage.listing import KeySet, StoredOrder

log = logging.getLogger(__name__)

CHUNK = 64  # objects per task handed to a reader process
COMMIT_BATCH = 250  # instances per index transaction


@dataclass
class _Committed:
    """A batch the committer filed: each item's outcome (None: refused), and the refusals."""

    items: list[NewInstance]
    results: list[AddResult | None]
    refused: list[tuple[str, str, str]]


@dataclass
class ReindexReport:
    listed: int = 0
    already: int = 0  # recorded in the index on that site: skipped
    indexed: int = 0  # new instance rows
    copies: int = 0  # copies added to instances that were indexed already
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)  # site, key, why
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)  # site, key, why
    sites_down: list[tuple[str, str]] = field(default_factory=list)  # site, why
    orphans: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # sop, keys
    missing_copies: list[tuple[str, str, str]] = field(default_factory=list)  # sop, site, key
    corrections: int = 0  # corrections applied from the sites' documents
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.listed / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class ReadResult:
    key: str
    item: NewInstance | None
    error: str = ""


# ---------------------------------------------------------------- reader processes

_sites: dict[str, StorageSite] = {}


def _init_reader(site_settings: Sequence[SiteSettings]) -> None:
    _sites.clear()
    for s in site_settings:
        _sites[s.name] = open_site(s)


def read_objects(site_name: str, keys: Sequence[str]) -> list[ReadResult]:
    """Read, hash and scan objects of one site (runs in a reader process, or inline)."""
    site = _sites[site_name]
    out = []
    for key in keys:
        try:
            data = site.get(key)
            info = site.stat(key)
            p10 = split_part10(data)
            header = scan(memoryview(data)[p10.dataset_offset :], p10.transfer_syntax)
            values = dict(header.values)
            if not values.get("SOPClassUID") and p10.sop_class_uid:
                values["SOPClassUID"] = p10.sop_class_uid
            digest = hashlib.sha256(data).hexdigest()
            copy = CopyRecord(
                site_name, key, len(data), digest, info.mtime if info else time.time()
            )
            item = NewInstance(
                values, p10.transfer_syntax, len(data), digest, (copy,), p10.source_ae
            )
            out.append(ReadResult(key, item))
        except (StorageError, InvalidDataset) as e:
            out.append(ReadResult(key, None, str(e)))
        except Exception as e:  # one odd file must not stop a rebuild
            out.append(ReadResult(key, None, f"internal error: {type(e).__name__}: {e}"))
    return out


# ---------------------------------------------------------------- the job


class Reindexer:
    def __init__(
        self,
        index: Index,
        sites: Sequence[StorageSite],
        site_settings: Sequence[SiteSettings],
        *,
        jobs: int = 2,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.index = index
        self.sites = list(sites)
        self.site_settings = list(site_settings)
        self.jobs = max(1, jobs)
        self.progress = progress or Progress("reindex", unit="objects", bar=False)
        self.stop = stop or threading.Event()
        self.report = ReindexReport()
        self._pending: list[NewInstance] = []
        # One batch commits in a thread of its own while the next one is read: on
        # PostgreSQL the commit is a wait on the server, which the readers can fill.
        self._committer: ThreadPoolExecutor | None = None
        self._committing: Future[_Committed] | None = None

    def run(self, *, reconcile: bool = False) -> ReindexReport:
        started = time.monotonic()
        # Oldest first: the first instance of a study filed decides its patient and study
        # attributes, as it did when the objects arrived. Each listing is sorted on disk
        # (storage/listing.py): ten million keys in memory took gigabytes.
        order: dict[str, StoredOrder] = {}
        try:
            for site in self.sites:
                try:
                    order[site.name] = StoredOrder(self._list(site))
                except StorageError as e:
                    self.report.sites_down.append((site.name, str(e)))
                    log.error("cannot list site %s: %s", site.name, e)
            self.report.listed = sum(o.count for o in order.values())
            self.progress.set_total(self.report.listed)
            self._index_sites(order)
            if not self.stop.is_set():
                self._replay_corrections()
            self.report.interrupted = self.stop.is_set()
            if reconcile and not self.report.interrupted:
                self._reconcile({name: o.key_set() for name, o in order.items()})
        finally:
            for o in order.values():
                o.close()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _index_sites(self, order: dict[str, StoredOrder]) -> None:
        pool = (
            ProcessPoolExecutor(
                max_workers=self.jobs, initializer=_init_reader, initargs=(self.site_settings,)
            )
            if self.jobs > 1
            else None
        )
        if pool is None:
            _init_reader(self.site_settings)
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="reindex-commit")
        try:
            try:
                for site in self.sites:
                    if site.name in order and not self.stop.is_set():
                        self._index_site(site.name, order[site.name].keys(), pool)
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            self._flush(wait=True)
        finally:
            self._committer.shutdown(wait=True)
            self._committer = None

    def _list(self, site: StorageSite) -> Iterator[ObjectInfo]:
        health = site.check()
        if not health.ok:
            raise StorageError(site.name, f"site is down: {health.reason}")
        yield from site.list()

    def _index_site(self, name: str, keys: Iterator[str], pool: ProcessPoolExecutor | None) -> None:
        # Results are taken in submission order (oldest first), so objects are filed in the
        # order they were stored even though the reader processes finish out of order.
        inflight: deque[Future[list[ReadResult]]] = deque()
        while not self.stop.is_set():
            batch = list(itertools.islice(keys, 500))
            if not batch:
                break
            known = self.index.copies_on(name, batch)
            self.report.already += len(known)
            for _ in range(len(known)):
                self.progress.advance("already indexed")
            todo = [k for k in batch if k not in known]
            for c in range(0, len(todo), CHUNK):
                if self.stop.is_set():
                    break
                chunk = todo[c : c + CHUNK]
                if pool is None:
                    self._take(name, read_objects(name, chunk))
                    continue
                while len(inflight) >= self.jobs * 3:
                    self._take(name, inflight.popleft().result())
                inflight.append(pool.submit(read_objects, name, chunk))
        while inflight:
            self._take(name, inflight.popleft().result())
        self._flush(wait=True)

    def _take(self, site: str, results: list[ReadResult]) -> None:
        for r in results:
            if r.item is None:
                self.report.unreadable.append((site, r.key, r.error))
                log.warning("cannot index %s on %s: %s", r.key, site, r.error)
                self.progress.advance("unreadable")
                continue
            self._pending.append(r.item)
            if len(self._pending) >= COMMIT_BATCH:
                self._flush()

    def _flush(self, *, wait: bool = False) -> None:
        """Hand the pending items to the committer once the batch before them is done (one
        batch in flight keeps the filing order and bounds memory); `wait`: and wait for it."""
        if self._pending:
            items, self._pending = self._pending, []
            self._collect()
            assert self._committer is not None  # run() holds one while anything is read
            self._committing = self._committer.submit(self._commit, items)
        if wait:
            self._collect()

    def _collect(self) -> None:
        """Wait for the batch in flight, if any, and count its outcome (raises its error)."""
        if self._committing is not None:
            committing, self._committing = self._committing, None
            self._account(committing.result())

    def _commit(self, items: list[NewInstance]) -> _Committed:
        """Commit `items` (in the committer's thread)."""
        results: list[AddResult | None]
        refused: list[tuple[str, str, str]] = []
        try:
            results = list(self.index.add_batch(items))
        except Exception as batch_error:
            # One bad row must not cost the batch: commit one by one and report the refusals;
            # if every one fails, the index itself is the problem: stop (a rerun resumes).
            results = []
            for item in items:
                try:
                    results.extend(self.index.add_batch([item]))
                except Exception as e:
                    results.append(None)
                    c = item.copies[0]
                    refused.append((c.site, c.key, f"index refused it: {e}"))
            if len(refused) == len(items):
                raise batch_error
        return _Committed(items, results, refused)

    def _account(self, done: _Committed) -> None:
        """Report and progress for a committed batch (in the reindex's own thread)."""
        self.report.unreadable.extend(done.refused)
        for _ in done.refused:
            self.progress.advance("refused")
        for item, res in zip(done.items, done.results, strict=True):
            copy = item.copies[0]
            if res is None:
                continue
            if res.outcome == "duplicate":
                if res.existing_sha256 and res.existing_sha256 != item.sha256:
                    why = (
                        f"SOP Instance UID {item.sop_uid} is indexed with other bytes "
                        f"(sha256 {res.existing_sha256[:12]}..., this copy {item.sha256[:12]}...)"
                    )
                    self.report.conflicts.append((copy.site, copy.key, why))
                    log.warning("%s on %s: %s", copy.key, copy.site, why)
                    self.progress.advance("conflict", item.size)
                else:
                    self.report.copies += 1
                    self.progress.advance("copy added", item.size)
            else:
                self.report.indexed += 1
                self.progress.advance("indexed", item.size)

    def _replay_corrections(self) -> None:
        """Apply, in order, every correction document the index has not applied."""
        applied = {r.seq for r in self.index.iter_corrections() if r.state == "applied"}
        holders: dict[int, list[StorageSite]] = {}
        listed: list[StorageSite] = []
        for site in self.sites:
            if site.role != "archive" or site.name in {n for n, _ in self.report.sites_down}:
                continue
            try:
                keys = [o.key for o in site.list(DOC_PREFIX, suffix=DOC_SUFFIX)]
            except StorageError as e:
                self.report.sites_down.append((site.name, str(e)))
                continue
            listed.append(site)
            for key in keys:
                seq = seq_of_key(key)
                if seq is not None:
                    holders.setdefault(seq, []).append(site)
        todo = sorted(s for s in holders if s not in applied)
        if not todo:
            return
        with self.index.corrections_lock():
            for seq in todo:
                c = self._read_correction(seq, holders[seq])
                if c is None:
                    self.report.unreadable.append(
                        (holders[seq][0].name, doc_key(seq), "correction cannot be read")
                    )
                    log.error("correction #%d cannot be read: later ones are not applied", seq)
                    return  # applying later ones without it would change their meaning
                held = {s.name for s in holders[seq]}
                missing = [s.name for s in listed if s.name not in held]
                if self.index.apply_correction(c, missing):
                    self.report.corrections += 1
        log.info("reindex: %d correction(s) applied from the sites", self.report.corrections)

    def _read_correction(self, seq: int, sites: list[StorageSite]) -> Correction | None:
        """Correction `seq` from the first site that holds a readable copy (copies that
        differ are reported as conflicts)."""
        found: Correction | None = None
        first = b""
        for site in sites:
            try:
                data = site.get(doc_key(seq))
                c = Correction.from_json(data)
            except (StorageError, CorrectionFormatError) as e:
                self.report.unreadable.append((site.name, doc_key(seq), str(e)))
                continue
            if c.seq != seq:
                self.report.unreadable.append((site.name, doc_key(seq), f"holds #{c.seq}"))
                continue
            if found is None:
                found, first = c, data
            elif data != first:
                why = f"differs from the copy on {sites[0].name}; the first readable one is used"
                self.report.conflicts.append((site.name, doc_key(seq), why))
        return found

    def _reconcile(self, listed: dict[str, KeySet]) -> None:
        """Index rows whose objects are on no site, and copies their site does not hold."""
        sites = {s.name: s for s in self.sites}
        after = 0
        while True:
            rows = self.index.copy_pages(after, 5000)
            if not rows:
                break
            by_instance: dict[int, tuple[str, list[tuple[str, str]]]] = {}
            for pk, sop, site, key in rows:
                entry = by_instance.setdefault(pk, (sop, []))
                if site:
                    entry[1].append((site, key))
            for _pk, (sop, copies) in by_instance.items():
                present = []
                for site, key in copies:
                    if site not in listed:
                        present.append(True)  # site down or unknown: cannot tell, assume held
                        continue
                    held = key in listed[site] or _exists_now(sites.get(site), key)
                    present.append(held)
                    if not held:
                        self.report.missing_copies.append((sop, site, key))
                if not any(present):
                    self.report.orphans.append((sop, tuple(k for _, k in copies)))
            after = rows[-1][0]


def _exists_now(site: StorageSite | None, key: str) -> bool:
    """A second look for what the listing did not show (it may have arrived since)."""
    if site is None:
        return False
    try:
        return site.stat(key) is not None
    except StorageError:
        return True
