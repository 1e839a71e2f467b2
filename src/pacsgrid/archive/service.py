"""The Archive service: the rules every front end shares (see pacsgrid.archive)."""

from __future__ import annotations

import dataclasses
import logging
import mmap
import threading
import time
from collections.abc import Iterator, Sequence
from typing import cast

from pacsgrid import metrics
from pacsgrid.access_log import AuditLog, AuditRecord, now_iso, operation_name
from pacsgrid.archive.cache import CacheTier
from pacsgrid.archive.checkpoint import Checkpointer
from pacsgrid.archive.commitment import StorageCommitment
from pacsgrid.archive.corrections import Corrections
from pacsgrid.archive.quorum import QuorumWriter
from pacsgrid.archive.reading import Reading
from pacsgrid.archive.records import (
    FORWARD,
    ArchiveStatus,
    Caller,
    Health,
    IngestResult,
    SiteStatus,
)
from pacsgrid.archive.recovery import Recovery, RecoveryReport, note_for
from pacsgrid.archive.reports import Reports
from pacsgrid.archive.spool import SPILL_DIR, SpillArea, Spool
from pacsgrid.archive.users import UserAdmin
from pacsgrid.correction import KEY_OBJECT_SELECTION
from pacsgrid.dicomfile.header import Header, scan
from pacsgrid.dicomfile.part10 import build_file_meta, split_part10
from pacsgrid.errors import (
    AccessDenied,
    InvalidDataset,
    PacsgridError,
    QuorumNotMet,
    SiteUnavailable,
    UnknownPeer,
)
from pacsgrid.index import FailedWork, Index, NewInstance, WorkSummary, open_index
from pacsgrid.index.commit import GroupCommitter, Slot
from pacsgrid.journal import IngestJournal
from pacsgrid.matching import Match, Query
from pacsgrid.migration_ledger import FileEntry, StudyEntry
from pacsgrid.model import InstanceRecord, Level
from pacsgrid.settings import PeerSettings, Settings
from pacsgrid.storage import LoggedSite, StorageSite, object_key, open_site
from pacsgrid.storage.placement import Placement

log = logging.getLogger(__name__)

_RANK = {"read": 1, "write": 2, "admin": 3}
# The role a web caller needs for each archive operation.
_NEEDS = {
    "echo": "read",
    "find": "read",
    "get": "read",
    "move": "read",
    "retrieve": "read",
    "store": "write",
}


class Archive(UserAdmin, Reports, Reading):
    _index: Index

    def __init__(
        self,
        settings: Settings,
        *,
        index: Index | None = None,
        sites: list[StorageSite] | None = None,
        probe_interval: float | None = None,
    ) -> None:
        self.settings = settings
        self._index = index or open_index(settings.database_url, settings.index)
        self._sites = (
            sites
            if sites is not None
            else [open_site(s, settings.durability) for s in settings.sites]
        )
        self._placement = Placement(
            self._sites, settings.replication.copies, settings.replication.write_quorum
        )
        self._init_sites()
        # Checked once: isinstance on a runtime Protocol walks its attributes on every call.
        self._logged: dict[str, LoggedSite] = {
            s.name: s for s in self._sites if isinstance(s, LoggedSite)
        }
        self._cache = CacheTier(self._index, self._placement, settings)
        self._placement.on_up.append(self._site_up)
        self._committer = GroupCommitter(self._index)
        self._writer = QuorumWriter(self._placement, settings.replication.write_quorum)
        self.journal = IngestJournal(settings.data_dir / "journal")
        self.spill = SpillArea(
            settings.data_dir / SPILL_DIR,
            settings.dicom.spill_mb << 20,
            settings.dicom.spill_max_mb << 20,
        )
        self._checkpointer = Checkpointer(
            self._sites, self._index.sync, settings.durability.checkpoint_seconds
        )
        self.audit_log = AuditLog(settings.audit_log.target, settings.audit_path)
        self.commitment = StorageCommitment(self)
        self.corrections = Corrections(self)
        self._last_probe = time.monotonic()
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        if probe_interval is None:
            probe_interval = settings.replication.probe_interval
        if probe_interval > 0:
            self._prober = threading.Thread(
                target=self._probe_loop, args=(probe_interval,), name="site-probe", daemon=True
            )
            self._prober.start()

    def _init_sites(self) -> None:
        """Initialise sites new to the index; a known site without its sentinel stays down
        (an unmounted volume must never be mistaken for an empty one)."""
        known = self._index.known_sites()
        for site in self._sites:
            if site.name not in known:
                try:
                    site.initialize()
                    self._index.register_site(site.name)
                except SiteUnavailable as e:
                    self._placement.mark_down(site.name, str(e))
                    continue
        self._placement.probe()

    def _probe_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self._placement.probe()

    def _site_up(self, name: str) -> None:
        """A site is back: copies waiting in the outbox for it are due now."""
        try:
            woken = self._index.wake("copy")
        except PacsgridError as e:
            log.warning("cannot wake waiting copies for %s: %s", name, e)
            return
        if woken:
            log.info("site %s is up: %d waiting copies are due", name, woken)
        self.corrections.heal()

    def warm(self) -> None:
        """Before serving: prepare the site logs, so that the first store does not wait."""
        self._checkpointer.warm()

    def close(self) -> None:
        self._closed.set()
        self._cache.flush()
        self._writer.close()
        self._checkpointer.close()
        self._committer.close()
        self.journal.close()
        self._index.close()
        self.audit_log.close()

    # ------------------------------------------------------------------ access control
    def peer(self, ae_title: str) -> PeerSettings:
        p = self.settings.peer(ae_title)
        if p is None:
            raise UnknownPeer(f"{ae_title!r} is not a configured peer")
        return p

    def may(self, caller: Caller, operation: str) -> bool:
        """Whether `caller` may perform `operation` (echo, store, find, move, get).

        Known peers may do what their `allow` list says. Unknown callers may echo and store
        when `dicom.accept_unknown` is true, nothing otherwise. Local commands may do anything.
        Web callers may do what their role allows: read (query, retrieve), write (also store),
        admin (also manage users and tokens).
        """
        if caller.via in ("cli", "import", "migrate"):
            return True
        if caller.via == "hl7":  # patient updates from the HL7 listener (pacsgrid.hl7)
            return operation == "correct"
        if caller.via == "web":
            need = _NEEDS.get(operation, "admin")
            return _RANK.get(caller.role, 0) >= _RANK[need]
        peer = self.settings.peer(caller.ae_title) if caller.ae_title else None
        if operation == "commit":  # storage commitment: its report needs the peer's address
            return peer is not None and "store" in peer.allow
        if peer is not None:
            return operation in peer.allow
        return self.settings.dicom.accept_unknown and operation in ("echo", "store")

    def accepts_association(self, caller: Caller) -> bool:
        return self.settings.dicom.accept_unknown or self.settings.peer(caller.ae_title) is not None

    def authorize(self, caller: Caller, operation: str, study: str = "") -> None:
        if not self.may(caller, operation):
            metrics.ACCESS_DENIED.labels(metrics.service_of(caller.via)).inc()
            self.audit(caller, operation, "denied", study, f"may not {operation}")
            raise AccessDenied(f"{caller} may not {operation}")

    # ------------------------------------------------------------------ audit
    def audit(
        self, caller: Caller, operation: str, outcome: str, study: str = "", detail: str = ""
    ) -> None:
        """One audit record. `operation` is an archive operation (store, find, get, move) or
        an audit name (admin, login); the record names it as the standard does for the front
        end (C-STORE or STOW, C-FIND or QIDO, ...)."""
        if caller.via in ("import", "migrate", "cli") and operation == "store":
            return  # bulk loads are recorded by their own ledgers, not one line per file
        self.audit_log.write(
            AuditRecord(
                now_iso(),
                caller.user,
                caller.ae_title,
                caller.address,
                caller.via,
                operation_name(operation, caller.via),
                outcome,
                study,
                detail[:300],
            )
        )

    def recent_failures(self, limit: int = 50) -> list[AuditRecord]:
        """Refused and failed requests, newest first (from a file audit log)."""
        return self.audit_log.tail(limit, failures_only=True)

    # ------------------------------------------------------------------ ingest
    def ingest(
        self,
        dataset: bytes | mmap.mmap | Spool,
        transfer_syntax: str,
        caller: Caller,
        *,
        sop_class_uid: str = "",
        offset: int = 0,
    ) -> IngestResult:
        """Store one dataset (no file meta) received in `transfer_syntax`: `dataset[offset:]`,
        or what a `Spool` received (`spool()`; the caller closes it).

        Returns only when the object is durable on the write quorum and indexed.
        Raises InvalidDataset (nothing written), AccessDenied, ArchiveUnavailable.
        """
        self.authorize(caller, "store")
        service = metrics.service_of(caller.via)
        started = time.perf_counter()
        try:
            data = dataset.contents() if isinstance(dataset, Spool) else dataset
            result = self._ingest(data, offset, transfer_syntax, caller, sop_class_uid)
            if result.sop_class_uid == KEY_OBJECT_SELECTION:  # a rejection note? (IOCM)
                self.corrections.after_store(
                    memoryview(data)[offset:], transfer_syntax, caller, result.sop_instance_uid
                )
        except PacsgridError as e:
            self._refused(caller, e)
            raise
        metrics.INGEST.labels(service, result.outcome).inc()
        metrics.INGEST_BYTES.labels(service).inc(len(data) - offset)
        metrics.INGEST_SECONDS.labels(service).observe(time.perf_counter() - started)
        self.audit(caller, "store", "success", result.study_uid, result.outcome)
        return result

    def _refused(self, caller: Caller, e: PacsgridError) -> None:
        metrics.INGEST.labels(metrics.service_of(caller.via), "failed").inc()
        self.audit(caller, "store", "failed", "", str(e))

    def spool(self) -> Spool:
        """A buffer for a dataset that is arriving: in memory while small, in a spill file
        once larger than `dicom.spill_mb` (see archive/spool.py). Hand it to `ingest` or
        `ingest_file` once complete, and close it in any case."""
        return self.spill.spool()

    def _ingest(
        self,
        dataset: bytes | mmap.mmap,
        offset: int,
        transfer_syntax: str,
        caller: Caller,
        sop_class_uid: str,
    ) -> IngestResult:
        header = scan(dataset, transfer_syntax, offset)
        if not header.sop_class_uid and sop_class_uid:
            header.values["SOPClassUID"] = sop_class_uid
        if not header.sop_class_uid:
            raise InvalidDataset("missing SOPClassUID", missing_uids=True)
        replace = self.settings.dicom.on_duplicate == "replace"
        if not replace and self._index.has_instance(header.sop_instance_uid):
            return IngestResult(
                "duplicate",
                header.sop_instance_uid,
                header.study_uid,
                (),
                header.series_uid,
                header.sop_class_uid,
            )
        meta = build_file_meta(
            header.sop_class_uid, header.sop_instance_uid, transfer_syntax, caller.ae_title
        )
        # The dataset is not copied: a view of it (of the spill file's map, when large); every
        # site reads its chunks through the buffer protocol.
        body = cast(bytes, memoryview(dataset)[offset:] if offset else dataset)
        return self._store(header, [meta, body], caller, replace)

    def ingest_file(self, data: bytes | Spool, caller: Caller) -> IngestResult:
        """Store a Part 10 file (or a bare dataset): import, migration, a STOW-RS part (a
        `Spool`, which the caller closes)."""
        try:
            buf = data.contents() if isinstance(data, Spool) else data
        except PacsgridError as e:
            self._refused(caller, e)
            raise
        p10 = split_part10(buf)
        if p10.source_ae and not caller.ae_title:
            caller = dataclasses.replace(caller, ae_title=p10.source_ae)  # keep the provenance
        return self.ingest(
            buf,
            p10.transfer_syntax,
            caller,
            sop_class_uid=p10.sop_class_uid,
            offset=p10.dataset_offset,
        )

    def _store(
        self, header: Header, chunks: list[bytes], caller: Caller, replace: bool
    ) -> IngestResult:
        targets = self._placement.write_targets()
        quorum = self.settings.replication.write_quorum
        if len(targets) < quorum:
            raise QuorumNotMet(
                f"{len(targets)} healthy archive site(s), write quorum is "
                f"{quorum}: {self._down_reasons()}"
            )
        # Announced to the group committer from here: a leader may wait for this store
        # to reach it and commit both in one batch (index/commit.py).
        with self._committer.on_the_way() as slot:
            return self._write_and_index(header, chunks, caller, replace, targets, slot)

    def _write_and_index(
        self,
        header: Header,
        chunks: list[bytes],
        caller: Caller,
        replace: bool,
        targets: list[StorageSite],
        slot: Slot,
    ) -> IngestResult:
        quorum = self.settings.replication.write_quorum
        key = object_key(header.study_uid, header.series_uid, header.sop_instance_uid)
        self._checkpointer.started_writing()
        # The ingest journal covers writes no site log covers (it replays them after a crash).
        size = sum(len(c) for c in chunks)
        logged = all(t.name in self._logged and self._logged[t.name].logs(size) for t in targets)
        marker = None if logged else self.journal.begin(key, [t.name for t in targets])
        written = self._writer.write(
            header, key, chunks, targets, replace, note_for(caller.via, caller.ae_title)
        )
        header = written.header
        try:
            if not written.copies and marker is not None:
                self.journal.end(marker)  # nothing was written anywhere
            if len(written.copies) < quorum:
                raise QuorumNotMet(
                    f"only {len(written.copies)} of {quorum} required copies could be "
                    f"written: {self._down_reasons()}"
                )
            item = NewInstance(
                dict(header.values),
                header.transfer_syntax,
                written.size,
                written.digest,
                tuple(written.copies),
                caller.ae_title,
                replace,
                work=self.outbox(header.sop_instance_uid, len(written.copies))
                + self._forward_work(header, caller.via, caller.ae_title),
            )
            # A copy whose log record is held replays this row after a crash: the commit
            # need not wait for its own flush (see archive/checkpoint.py).
            added = self._committer.commit(item, durable=not written.logged, slot=slot)
        finally:
            written.release()
        if marker is not None:
            self.journal.end(marker)
        for w in added.warnings:
            log.warning("%s (from %s)", w, caller)
        return IngestResult(
            added.outcome,
            header.sop_instance_uid,
            header.study_uid,
            added.warnings,
            header.series_uid,
            header.sop_class_uid,
        )

    def outbox(self, sop_uid: str, copies_written: int) -> tuple[tuple[str, str, str], ...]:
        """The durable outbox entry of an ingest: the repair job makes the copies beyond the
        write quorum. Queued in the same transaction as the index row, so an acknowledged
        object always has either all its copies or a pending item that will make them."""
        if copies_written >= self.settings.replication.copies:
            return ()
        return (("copy", sop_uid, ""),)

    def _forward_work(
        self, header: Header, via: str, calling_ae: str
    ) -> tuple[tuple[str, str, str], ...]:
        """Forwarding work items for a new instance (kind 'forward', key '<sop>><peer>').

        Only instances received over the network are forwarded (not import or migrate, which
        bring in what the legacy system already has), and never back to the AE that sent them.
        """
        if via not in ("dimse", "web") or not self.settings.forward:
            return ()
        modality = header.values.get("Modality", "")
        out: dict[str, tuple[str, str, str]] = {}
        for rule in self.settings.forward:
            if rule.to == calling_ae or not rule.matches(calling_ae, modality):
                continue
            key = f"{header.sop_instance_uid}>{rule.to}"
            out.setdefault(key, (FORWARD, key, rule.to))
        return tuple(out.values())

    def recover(self) -> RecoveryReport:
        """Bring back what a crash or power cut left half done (see archive/recovery.py).

        Run at start-up, before serving, and by the supervisor when a worker dies (logs,
        journals and spill files of live processes are left alone).
        """
        self.spill.sweep()
        report = Recovery(
            self._sites, self._index, self.journal, self.outbox, self._forward_work
        ).run()
        self.corrections.recover()
        return report

    def _down_reasons(self) -> str:
        down = [
            f"{n}: {self._placement.state(n).reason}"
            for n in self._placement.sites
            if not self._placement.is_up(n)
        ]
        return "; ".join(down) or "no site is down"

    # ------------------------------------------------------------------ query and retrieve
    def find(self, caller: Caller, query: Query) -> Iterator[dict[str, str]]:
        study = _study_of(query)
        self.authorize(caller, "find", study)
        started = time.perf_counter()
        rows = list(self._index.find(query))
        metrics.QUERY_SECONDS.labels(metrics.service_of(caller.via)).observe(
            time.perf_counter() - started
        )
        self.audit(caller, "find", "success", study, f"{query.level.value}: {len(rows)} found")
        return iter(rows)

    def locate(
        self, caller: Caller, query: Query, operation: str = "get", *, audit: bool = True
    ) -> list[InstanceRecord]:
        """Instances a C-MOVE/C-GET/WADO request selects: none a rejection hides, and those
        of corrected studies marked to be sent corrected (see `read`). `audit=False`: the
        caller records the outcome itself once it knows it (`retrieved`)."""
        study = _study_of(query)
        self.authorize(caller, operation, study)
        records = self._index.instances(query, visible=True)
        if not study and records:
            study = records[0].study_uid
        if audit:
            self.audit(caller, operation, "success", study, f"{len(records)} instance(s)")
        return records

    def retrieved(
        self,
        caller: Caller,
        operation: str,
        records: Sequence[InstanceRecord],
        sent: int,
        failed: int,
    ) -> None:
        """Audit a retrieve once its sub-operations are done: failed when nothing could be
        sent although something was asked for."""
        study = records[0].study_uid if records else ""
        outcome = "failed" if records and sent == 0 else "success"
        self.audit(
            caller, operation, outcome, study, f"{sent} of {len(records)} sent, {failed} failed"
        )

    def outgoing(self, sop_uid: str) -> InstanceRecord | None:
        """One instance as forwarding sends it (as `locate` gives it); None when the archive
        does not hold it or a rejection hides it."""
        match = Match("SOPInstanceUID", "single", (sop_uid,))
        found = self._index.instances(Query(Level.IMAGE, (match,)), visible=True)
        return found[0] if found else None

    # ------------------------------------------------------------------ migration ledgers
    # Thin on purpose: migrate/ keeps its state in the index through these
    # (pacsgrid.migration_ledger).
    def folder_ledger(self, source: str) -> dict[str, FileEntry]:
        return self._index.folder_ledger(source)

    def record_files(self, source: str, entries: Sequence[FileEntry]) -> None:
        self._index.record_files(source, entries)

    def study_ledger(self, source: str, states: Sequence[str] = ()) -> list[StudyEntry]:
        return self._index.study_ledger(source, states)

    def record_studies(self, source: str, entries: Sequence[StudyEntry]) -> None:
        self._index.record_studies(source, entries)

    def study_sop_uids(self, study_uid: str) -> set[str]:
        return self._index.study_sop_uids(study_uid)

    def has_instances(self, sop_uids: Sequence[str]) -> set[str]:
        return self._index.has_instances(sop_uids)

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        return self._index.instance(sop_uid)

    # ------------------------------------------------------------------ status
    def probe(self, min_interval: float = 0.0) -> None:
        """Check every site now (unless checked less than `min_interval` seconds ago)."""
        now = time.monotonic()
        if min_interval and now - self._last_probe < min_interval:
            return
        self._last_probe = now
        self._placement.probe()

    def health(self) -> Health:
        """Index reachable and enough healthy sites for the write quorum (sites re-probed at
        most every 5 seconds)."""
        try:
            self._index.has_instance("")
            index_ok, error = True, ""
        except PacsgridError as e:
            index_ok, error = False, str(e)
        self.probe(min_interval=5.0)
        return Health(
            index_ok,
            error,
            len(self._placement.write_targets()),
            self.settings.replication.write_quorum,
        )

    def work_summary(self) -> list[WorkSummary]:
        return self._index.work_summary()

    def failed_work(self, limit: int = 50) -> list[FailedWork]:
        return self._index.failed_work(limit)

    def status(self, *, probe: bool = False) -> ArchiveStatus:
        """Index counts and every site's health and usage; `probe`: check the sites first."""
        if probe:
            self.probe(min_interval=2.0)
        stats = self._index.stats()
        usage = {u.site: u for u in stats.sites}
        out = []
        for site in self._sites:
            st = self._placement.state(site.name)
            u = usage.get(site.name)
            try:
                free = site.check().free_bytes
            except Exception:
                free = None
            out.append(
                SiteStatus(
                    site.name,
                    site.url,
                    site.location,
                    site.role,
                    st.up,
                    st.reason,
                    u.objects if u else 0,
                    u.bytes if u else 0,
                    free,
                )
            )
        return ArchiveStatus(stats, tuple(out))


def _study_of(query: Query) -> str:
    for m in query.matches:
        if m.keyword == "StudyInstanceUID" and m.kind == "single":
            return m.values[0]
    return ""
