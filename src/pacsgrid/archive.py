"""`Archive`: the one service every front end calls (DICOM, web, importer, migrator).

The rules of the archive live here, once:
- ingest is durable before it is acknowledged: write the object to the write quorum of sites
  (each write fsynced and atomically visible), commit the index row (group commit), and only
  then return; any failure raises and nothing is acknowledged;
- duplicates (a SOP Instance UID stored again) follow `dicom.on_duplicate`: keep (default) or
  replace; never two rows, never a torn file;
- access control: who may echo, store, find, move, get;
- reads fall back copy by copy and verify the SHA-256 of what they read.

All methods are synchronous and thread-safe; the asyncio DICOM server calls them from a thread
pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pacsgrid.dicom.header import Header, scan
from pacsgrid.dicom.part10 import build_file_meta, split_part10
from pacsgrid.errors import (
    AccessDenied,
    InvalidDataset,
    NotFound,
    ObjectCorrupt,
    QuorumNotMet,
    SiteUnavailable,
    StorageError,
    UnknownPeer,
)
from pacsgrid.index import Index, IndexStats, NewInstance, Query, open_index
from pacsgrid.index.commit import GroupCommitter
from pacsgrid.journal import IngestJournal
from pacsgrid.model import CopyRecord, InstanceRecord
from pacsgrid.settings import PeerSettings, Settings
from pacsgrid.storage import StorageSite, object_key, open_site
from pacsgrid.storage.placement import Placement

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a DICOM peer (AE title), a web user, or a local command."""

    ae_title: str = ""
    address: str = ""
    user: str = ""
    via: str = "dimse"  # dimse | web | import | migrate | cli

    def __str__(self) -> str:
        who = self.user or self.ae_title or self.via
        return f"{who}@{self.address}" if self.address else who


LOCAL = Caller(via="cli")


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: str  # stored | duplicate | replaced
    sop_instance_uid: str
    study_uid: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object read back from a site: the whole Part 10 file and where its dataset starts."""

    data: bytes
    dataset_offset: int
    transfer_syntax: str
    site: str

    @property
    def dataset(self) -> memoryview:
        return memoryview(self.data)[self.dataset_offset :]


@dataclass(frozen=True)
class SiteStatus:
    name: str
    url: str
    location: str
    role: str
    up: bool
    reason: str
    objects: int
    bytes: int
    free_bytes: int | None = None


@dataclass(frozen=True)
class ArchiveStatus:
    index: IndexStats
    sites: tuple[SiteStatus, ...] = field(default_factory=tuple)


class Archive:
    def __init__(
        self,
        settings: Settings,
        *,
        index: Index | None = None,
        sites: list[StorageSite] | None = None,
        probe_interval: float = 30.0,
    ) -> None:
        self.settings = settings
        self.index = index or open_index(settings.database_url, settings.index)
        self.sites = sites if sites is not None else [open_site(s) for s in settings.sites]
        self.placement = Placement(
            self.sites, settings.replication.copies, settings.replication.write_quorum
        )
        self._init_sites()
        self.committer = GroupCommitter(self.index)
        self.journal = IngestJournal(settings.data_dir / "journal")
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        if probe_interval > 0:
            self._prober = threading.Thread(
                target=self._probe_loop, args=(probe_interval,), name="site-probe", daemon=True
            )
            self._prober.start()

    def _init_sites(self) -> None:
        """Initialise sites new to the index; a known site without its sentinel stays down
        (an unmounted volume must never be mistaken for an empty one)."""
        known = self.index.known_sites()
        for site in self.sites:
            if site.name not in known:
                try:
                    site.initialize()
                    self.index.register_site(site.name)
                except SiteUnavailable as e:
                    self.placement.mark_down(site.name, str(e))
                    continue
        self.placement.probe()

    def _probe_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self.placement.probe()

    def close(self) -> None:
        self._closed.set()
        self.committer.close()
        self.index.close()

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
        """
        if caller.via in ("cli", "import", "migrate"):
            return True
        peer = self.settings.peer(caller.ae_title) if caller.ae_title else None
        if peer is not None:
            return operation in peer.allow
        return self.settings.dicom.accept_unknown and operation in ("echo", "store")

    def accepts_association(self, caller: Caller) -> bool:
        return self.settings.dicom.accept_unknown or self.settings.peer(caller.ae_title) is not None

    def authorize(self, caller: Caller, operation: str) -> None:
        if not self.may(caller, operation):
            raise AccessDenied(f"{caller} may not {operation}")

    # ------------------------------------------------------------------ ingest
    def ingest(
        self, dataset: bytes, transfer_syntax: str, caller: Caller, *, sop_class_uid: str = ""
    ) -> IngestResult:
        """Store one dataset (no file meta) received in `transfer_syntax`.

        Returns only when the object is durable on the write quorum and indexed.
        Raises InvalidDataset (nothing written), AccessDenied, ArchiveUnavailable.
        """
        self.authorize(caller, "store")
        header = scan(dataset, transfer_syntax)
        if not header.sop_class_uid and sop_class_uid:
            header.values["SOPClassUID"] = sop_class_uid
        if not header.sop_class_uid:
            raise InvalidDataset("missing SOPClassUID", missing_uids=True)
        replace = self.settings.dicom.on_duplicate == "replace"
        if not replace and self.index.has_instance(header.sop_instance_uid):
            return IngestResult("duplicate", header.sop_instance_uid, header.study_uid)
        meta = build_file_meta(
            header.sop_class_uid, header.sop_instance_uid, transfer_syntax, caller.ae_title
        )
        return self._store(header, [meta, dataset], caller, replace)

    def ingest_file(self, data: bytes, caller: Caller) -> IngestResult:
        """Store a Part 10 file (or a bare dataset) read from disk: import and migration."""
        p10 = split_part10(data)
        if p10.source_ae and not caller.ae_title:
            caller = dataclasses.replace(caller, ae_title=p10.source_ae)  # keep the provenance
        dataset = data[p10.dataset_offset :] if p10.dataset_offset else data
        return self.ingest(dataset, p10.transfer_syntax, caller, sop_class_uid=p10.sop_class_uid)

    def _store(
        self, header: Header, chunks: list[bytes], caller: Caller, replace: bool
    ) -> IngestResult:
        key = object_key(header.study_uid, header.series_uid, header.sop_instance_uid)
        targets = self.placement.write_targets()
        quorum = self.settings.replication.write_quorum
        if len(targets) < quorum:
            raise QuorumNotMet(
                f"{len(targets)} healthy archive site(s), write quorum is "
                f"{quorum}: {self._down_reasons()}"
            )
        marker = self.journal.begin(key, [t.name for t in targets])
        header, digest, size, copies = self._write_copies(header, key, chunks, targets, replace)
        if not copies:
            self.journal.end(marker)  # nothing was written anywhere
        if len(copies) < quorum:
            raise QuorumNotMet(
                f"only {len(copies)} of {quorum} required copies could be "
                f"written: {self._down_reasons()}"
            )
        item = NewInstance(
            dict(header.values),
            header.transfer_syntax,
            size,
            digest,
            tuple(copies),
            caller.ae_title,
            replace,
        )
        added = self.committer.submit(item).result()
        self.journal.end(marker)
        for w in added.warnings:
            log.warning("%s (from %s)", w, caller)
        return IngestResult(
            added.outcome, header.sop_instance_uid, header.study_uid, added.warnings
        )

    def _write_copies(
        self,
        header: Header,
        key: str,
        chunks: list[bytes],
        targets: list[StorageSite],
        replace: bool,
    ) -> tuple[Header, str, int, list[CopyRecord]]:
        """Write the object to sites in placement order until the quorum is durable.

        Copies beyond the quorum are not written here: the repair job makes them.
        """
        sha = hashlib.sha256()
        for c in chunks:
            sha.update(c)
        digest = sha.hexdigest()
        size = sum(len(c) for c in chunks)
        copies: list[CopyRecord] = []
        for site in targets:
            if len(copies) >= self.settings.replication.write_quorum:
                break
            try:
                result = site.put(key, chunks, replace=replace)
                if not result.created:
                    # Already there (a concurrent store of this UID, or an unindexed leftover):
                    # adopt those bytes so that every copy and the index agree.
                    adopted = self._adopt(site, key)
                    if adopted is None:
                        site.put(key, chunks, replace=True)
                    else:
                        header, chunks, digest, size = adopted
            except SiteUnavailable as e:
                self.placement.mark_down(site.name, str(e))
                continue
            except StorageError as e:
                log.warning("store %s on %s failed: %s", header.sop_instance_uid, site.name, e)
                continue
            copies.append(CopyRecord(site.name, key, size, digest, time.time()))
        return header, digest, size, copies

    def recover(self) -> int:
        """Index objects that a crash left written but unindexed (see pacsgrid.journal).

        Returns how many were indexed. Run once at start-up, before serving.
        """
        recovered = 0
        for marker in self.journal.pending():
            found: list[CopyRecord] = []
            header = None
            for name in marker.sites:
                site = self.placement.sites.get(name)
                if site is None:
                    continue
                try:
                    data = site.get(marker.key)
                    p10 = split_part10(data)
                    h = scan(memoryview(data)[p10.dataset_offset :], p10.transfer_syntax)
                except (StorageError, InvalidDataset):
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if found and digest != found[0].sha256:
                    continue  # a different object: leave it to the audit
                header = header or h
                found.append(CopyRecord(name, marker.key, len(data), digest, time.time()))
            if header is not None and not self.index.has_instance(header.sop_instance_uid):
                self.committer.submit(
                    NewInstance(
                        dict(header.values),
                        header.transfer_syntax,
                        found[0].size,
                        found[0].sha256,
                        tuple(found),
                        "",
                    )
                ).result()
                recovered += 1
                log.warning(
                    "indexed %s, written before a crash but not indexed (never acknowledged)",
                    marker.key,
                )
            self.journal.end(marker.path)
        return recovered

    def _adopt(self, site: StorageSite, key: str) -> tuple[Header, list[bytes], str, int] | None:
        try:
            data = site.get(key)
            p10 = split_part10(data)
            header = scan(memoryview(data)[p10.dataset_offset :], p10.transfer_syntax)
        except (StorageError, InvalidDataset) as e:
            log.warning("replacing unreadable object %s on %s: %s", key, site.name, e)
            return None
        return header, [data], hashlib.sha256(data).hexdigest(), len(data)

    def _down_reasons(self) -> str:
        down = [
            f"{n}: {self.placement.state(n).reason}"
            for n in self.placement.sites
            if not self.placement.is_up(n)
        ]
        return "; ".join(down) or "no site is down"

    # ------------------------------------------------------------------ query and retrieve
    def find(self, caller: Caller, query: Query) -> Iterator[dict[str, str]]:
        self.authorize(caller, "find")
        return self.index.find(query)

    def locate(self, caller: Caller, query: Query, operation: str = "get") -> list[InstanceRecord]:
        """Instances a C-MOVE/C-GET/WADO request selects."""
        self.authorize(caller, operation)
        return self.index.instances(query)

    def read(self, record: InstanceRecord) -> StoredObject:
        """The object's bytes from the best copy, falling back copy by copy.

        Every read is checked against the recorded SHA-256; a copy that does not match is
        skipped (and reported), never served.
        """
        errors = []
        for site, copy in self.placement.read_order(record.copies):
            try:
                data = site.get(copy.key)
            except SiteUnavailable as e:
                self.placement.mark_down(site.name, str(e))
                errors.append(str(e))
                continue
            except StorageError as e:
                errors.append(str(e))
                continue
            if hashlib.sha256(data).hexdigest() != record.sha256:
                err = ObjectCorrupt(
                    site.name,
                    f"{copy.key} does not match its SHA-256",
                    hint="run 'pacsgrid audit' to quarantine and repair it",
                )
                log.error("%s", err)
                errors.append(str(err))
                continue
            p10 = split_part10(data)
            return StoredObject(data, p10.dataset_offset, p10.transfer_syntax, site.name)
        raise NotFound(
            f"no readable copy of {record.sop_uid}: " + ("; ".join(errors) or "no copies recorded")
        )

    # ------------------------------------------------------------------ status
    def status(self) -> ArchiveStatus:
        stats = self.index.stats()
        usage = {u.site: u for u in stats.sites}
        out = []
        for site in self.sites:
            st = self.placement.state(site.name)
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
