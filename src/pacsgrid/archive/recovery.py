"""Recovery after a crash or a power cut: what the site logs and ingest journals left behind.

Two sources, replayed in this order at start-up (before serving) and by the supervisor when a
worker dies (only logs and journals of processes that are gone are touched):

1. Site logs (storage/wal.py). Every record a dead process left is an object that was durable
   in the log; its file may be missing or torn (written without a flush) and its index row
   may be missing (committed without a flush). Per key, the record the file must hold is
   chosen (the newest `replace`, else the first store: later stores of the same UID adopted
   it), the file is rewritten durably when it does not match, every file is flushed, the
   index gets any row or copy it lacks, the index is flushed, and only then are the segments
   freed. Replaying twice does nothing more than replaying once.
2. Ingest journals (pacsgrid.journal): objects written to sites without a log (S3, or larger
   than the log takes) whose index commit a process crash interrupted.

An object recovered here may never have been acknowledged (the crash came between the flush
and the answer): indexing it is what a retry by the sender would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pacsgrid.dicomfile.header import Header, scan
from pacsgrid.dicomfile.part10 import split_part10
from pacsgrid.errors import InvalidDataset, ObjectMissing, StorageError
from pacsgrid.index import Index, NewInstance
from pacsgrid.journal import IngestJournal
from pacsgrid.model import CopyRecord, InstanceRecord
from pacsgrid.storage import LoggedSite, StorageSite
from pacsgrid.storage.walfile import Record

log = logging.getLogger(__name__)

BATCH = 256

# (sop_uid, copies written) -> outbox items; (header, via, calling AE) -> forwarding items
Outbox = Callable[[str, int], tuple[tuple[str, str, str], ...]]
Forwards = Callable[[Header, str, str], tuple[tuple[str, str, str], ...]]


@dataclass
class RecoveryReport:
    records: int = 0  # log records replayed
    rewritten: int = 0  # files rewritten from the log (missing or torn)
    indexed: int = 0  # instances the index lacked
    copies: int = 0  # copy rows the index lacked
    journal: int = 0  # instances indexed from ingest journals

    def __bool__(self) -> bool:
        return bool(self.rewritten or self.indexed or self.copies or self.journal)


@functools.lru_cache(maxsize=1024)
def note_for(via: str, ae_title: str) -> str:
    """What a log record keeps about its writer (forwarding rules depend on it). Cached: a
    store asks for it every time, and the writers are few."""
    return json.dumps({"via": via, "ae": ae_title}, separators=(",", ":"))


def parse_note(note: str) -> tuple[str, str]:
    try:
        doc = json.loads(note) if note else {}
        return str(doc.get("via", "")), str(doc.get("ae", ""))
    except (ValueError, AttributeError):
        return "", ""


def _first_header(recs: list[Record]) -> Header | None:
    for r in recs:
        try:
            return header_of(r.payload)
        except InvalidDataset:
            continue
    return None


def _newer(known: InstanceRecord, rec: Record) -> bool:
    """Whether the index recorded the instance after the record was written."""
    return max((c.stored_at for c in known.copies), default=0.0) > rec.time_ns / 1e9


def header_of(data: bytes) -> Header:
    """The index values of a stored Part 10 object (raises InvalidDataset)."""
    p10 = split_part10(data)
    return scan(memoryview(data)[p10.dataset_offset :], p10.transfer_syntax)


class Recovery:
    def __init__(
        self,
        sites: Sequence[StorageSite],
        index: Index,
        journal: IngestJournal,
        outbox: Outbox,
        forwards: Forwards,
    ) -> None:
        self.sites = {s.name: s for s in sites}
        self.index = index
        self.journal = journal
        self.outbox = outbox
        self.forwards = forwards

    def run(self) -> RecoveryReport:
        report = RecoveryReport()
        for site in self.sites.values():
            if isinstance(site, LoggedSite):
                try:
                    self._replay_site(site, report)
                except StorageError as e:
                    log.error("cannot replay the log of site %s now: %s", site.name, e)
        self._replay_journals(report)
        if report:
            log.warning(
                "recovery: %d log record(s) replayed, %d file(s) rewritten, %d instance(s) and "
                "%d copy row(s) indexed from site logs, %d instance(s) from ingest journals",
                report.records,
                report.rewritten,
                report.indexed,
                report.copies,
                report.journal,
            )
        return report

    # ------------------------------------------------------------------ site logs
    def _replay_site(self, site: LoggedSite, report: RecoveryReport) -> None:
        segments = site.dead_log()
        if not segments:
            return
        try:
            by_key: dict[str, list[Record]] = defaultdict(list)
            for seg in segments:
                for rec in seg.records():
                    report.records += 1
                    obj = seg.object_of(rec)
                    if obj is None:
                        continue  # a staged file never completed: never acknowledged
                    by_key[rec.key].append(dataclasses.replace(rec, payload=obj, size=len(obj)))
            kept: list[tuple[Record, Header, InstanceRecord | None]] = []
            for key, recs in by_key.items():
                recs.sort(key=lambda r: r.time_ns)
                chosen = self._settle_file(site, key, recs, report)
                if chosen is not None:
                    kept.append(chosen)
            site.flush_objects(list(by_key))
            self._index_records(site, kept, report)
            self.index.sync()
        except BaseException:
            for seg in segments:
                seg.close()  # left as it is: the next recovery tries again
            raise
        for seg in segments:
            seg.free()

    def _settle_file(
        self, site: LoggedSite, key: str, recs: list[Record], report: RecoveryReport
    ) -> tuple[Record, Header, InstanceRecord | None] | None:
        """Make the file under `key` hold the object it must hold; return the record of that
        object (None when the index already knows a newer one the file holds).

        The index decides between records where it can: it knows the object every later
        store of the UID adopted, and a `replace` it recorded after our records were written.
        """
        if not key.endswith(".dcm"):
            self._settle_document(site, key, recs, report)
            return None
        header = _first_header(recs)
        if header is None:
            log.error("recovery: no log record for %s parses; left alone", key)
            return None
        known = self.index.instance(header.sop_instance_uid)
        try:
            data: bytes | None = site.get(key)
        except ObjectMissing:
            data = None
        current = hashlib.sha256(data).hexdigest() if data is not None else ""
        replaces = [r for r in recs if r.replace]
        by_sha = {r.sha256: r for r in recs}
        if replaces:
            want = replaces[-1]
            if known is not None and known.sha256 != want.sha256 and _newer(known, want):
                # Replaced again later by a process whose log was checkpointed.
                if current != known.sha256:
                    log.error("recovery: %s on %s differs from the index", key, site.name)
                return None
        elif known is not None and known.sha256 in by_sha:
            want = by_sha[known.sha256]
        elif known is not None and current == known.sha256:
            return None  # the file holds what the index knows, from another writer
        else:
            want = by_sha.get(current, recs[0])
        if current != want.sha256:
            site.restore(key, want.payload)
            report.rewritten += 1
            log.warning("recovery: %s on %s rewritten from its log record", key, site.name)
        if want is not recs[0]:
            # a replace (a correction, say) has values of its own: index those
            try:
                header = header_of(want.payload)
            except InvalidDataset:
                pass  # the values of the first record that parses
        return want, header, known

    def _settle_document(
        self, site: LoggedSite, key: str, recs: list[Record], report: RecoveryReport
    ) -> None:
        """A document of the archive's own (a correction, written once): its file holds the
        logged bytes. The index learns of it from the correction's own record (see
        archive/corrections.py), not from here."""
        want = recs[0]
        try:
            current = hashlib.sha256(site.get(key)).hexdigest()
        except ObjectMissing:
            current = ""
        if current != want.sha256:
            site.restore(key, want.payload)
            report.rewritten += 1
            log.warning("recovery: %s on %s rewritten from its log record", key, site.name)

    def _index_records(
        self,
        site: LoggedSite,
        kept: list[tuple[Record, Header, InstanceRecord | None]],
        report: RecoveryReport,
    ) -> None:
        news: list[NewInstance] = []
        copies: list[tuple[str, CopyRecord]] = []
        now = time.time()
        for rec, header, known in kept:
            sop = header.sop_instance_uid
            copy = CopyRecord(
                site.name, rec.key, rec.size, rec.sha256, rec.time_ns / 1e9, "ok", now
            )
            if known is None or (rec.replace and known.sha256 != rec.sha256):
                if known is None and site.role == "cache":
                    continue  # a cache copy alone is not an archive copy
                via, ae = parse_note(rec.note)
                news.append(
                    NewInstance(
                        dict(header.values),
                        header.transfer_syntax,
                        rec.size,
                        rec.sha256,
                        (copy,),
                        ae,
                        known is not None,
                        work=self.outbox(sop, 1) + self.forwards(header, via, ae),
                    )
                )
            elif known.sha256 == rec.sha256 and not any(
                c.site == site.name and c.state == "ok" for c in known.copies
            ):
                copies.append((sop, copy))
        for i in range(0, len(news), BATCH):
            self.index.add_batch(news[i : i + BATCH], durable=False)
        if copies:
            self.index.record_copies(copies)
        report.indexed += len(news)
        report.copies += len(copies)

    # ------------------------------------------------------------------ ingest journals
    def _replay_journals(self, report: RecoveryReport) -> None:
        for journal, markers in self.journal.replay():
            for marker in markers:
                report.journal += self._recover_one(marker.key, marker.sites)
            self.journal.done(journal)

    def _recover_one(self, key: str, sites: tuple[str, ...]) -> int:
        found: list[CopyRecord] = []
        header = None
        for name in sites:
            site = self.sites.get(name)
            if site is None:
                continue
            try:
                data = site.get(key)
                h = header_of(data)
            except (StorageError, InvalidDataset):
                continue
            digest = hashlib.sha256(data).hexdigest()
            if found and digest != found[0].sha256:
                continue  # a different object: leave it to the audit
            header = header or h
            found.append(CopyRecord(name, key, len(data), digest, time.time()))
        if header is None or self.index.has_instance(header.sop_instance_uid):
            return 0
        self.index.add_batch(
            [
                NewInstance(
                    dict(header.values),
                    header.transfer_syntax,
                    found[0].size,
                    found[0].sha256,
                    tuple(found),
                    "",
                    work=self.outbox(header.sop_instance_uid, len(found)),
                )
            ]
        )
        log.warning("indexed %s, written before a crash but not indexed (never acknowledged)", key)
        return 1
