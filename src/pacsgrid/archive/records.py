"""What the Archive's callers hand in and get back."""

from __future__ import annotations

from dataclasses import dataclass, field

from pacsgrid.index import IndexStats


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a DICOM peer (AE title), a web user, or a local command."""

    ae_title: str = ""
    address: str = ""
    user: str = ""
    via: str = "dimse"  # dimse | web | import | migrate | cli
    role: str = ""  # web callers: read | write | admin (set by the web layer after login)

    def __str__(self) -> str:
        who = self.user or self.ae_title or self.via
        return f"{who}@{self.address}" if self.address else who


LOCAL = Caller(via="cli")
FORWARD = "forward"  # work queue kind of forwarding items
COPY = "copy"  # work queue kind of copies the repair job makes

ROLES = ("read", "write", "admin")


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: str  # stored | duplicate | replaced
    sop_instance_uid: str
    study_uid: str
    warnings: tuple[str, ...] = ()
    series_uid: str = ""
    sop_class_uid: str = ""


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


@dataclass(frozen=True)
class Health:
    """What a load balancer asks: can this node answer queries and acknowledge stores?"""

    index_ok: bool
    index_error: str
    writable_sites: int
    write_quorum: int

    @property
    def ok(self) -> bool:
        return self.index_ok and self.writable_sites >= self.write_quorum
