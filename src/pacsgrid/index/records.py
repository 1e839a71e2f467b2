"""The records the Index contract speaks in (what goes in, what comes out)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pacsgrid.model import CopyRecord


@dataclass(frozen=True, slots=True)
class NewInstance:
    """An instance whose bytes are durable on `copies`, waiting for its index row."""

    values: dict[str, str]  # indexed attribute values by keyword (pacsgrid.model.ATTRIBUTES)
    transfer_syntax: str
    size: int
    sha256: str
    copies: tuple[CopyRecord, ...]
    source_ae: str = ""
    replace: bool = False
    # Work to queue in the same transaction as the instance row (a durable outbox):
    # (kind, key, payload), e.g. ("copy", "<sop>>site-b", "").
    work: tuple[tuple[str, str, str], ...] = ()

    @property
    def sop_uid(self) -> str:
        return self.values["SOPInstanceUID"]


@dataclass(frozen=True, slots=True)
class AddResult:
    outcome: str  # "stored" | "duplicate" | "replaced"
    warnings: tuple[str, ...] = ()
    # For a duplicate: the checksum of the object that was already indexed.
    existing_sha256: str = ""


@dataclass(frozen=True, slots=True)
class WorkItem:
    pk: int
    kind: str
    key: str
    payload: str
    attempts: int


@dataclass(frozen=True, slots=True)
class SiteUsage:
    site: str
    objects: int
    bytes: int
    bad: int = 0


@dataclass(frozen=True, slots=True)
class WebUser:
    name: str
    role: str  # read | write | admin
    password_hash: str = ""


@dataclass(frozen=True, slots=True)
class WorkSummary:
    kind: str
    state: str
    count: int
    updated_at: float  # latest change of an item of this kind and state


@dataclass(frozen=True, slots=True)
class FailedWork:
    kind: str
    key: str
    error: str
    attempts: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class PendingWork:
    """A work item not done yet, as an operator sees it."""

    key: str
    attempts: int
    error: str  # of the last attempt ('' before the first one failed)
    not_before: float  # epoch seconds of the next attempt (0: due now)
    claimed_by: str  # '' unless someone is working on it (its lease runs)


@dataclass(frozen=True, slots=True)
class IndexStats:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int
    sites: tuple[SiteUsage, ...] = field(default_factory=tuple)
