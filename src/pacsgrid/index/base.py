"""The `Index` contract: metadata of every instance and where each copy lives.

The index is derived data: everything in it can be rebuilt from the storage sites
(`pacsgrid reindex`). SQLite and PostgreSQL implement this protocol and run the same contract
tests (tests/test_index_contract*.py).

Writes arrive in batches (`add_batch`) from the group committer, one transaction per batch, so
that many concurrent stores share one database fsync.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from pacsgrid.correction import Correction
from pacsgrid.index.corrections import CorrectionRow, HiddenInstance
from pacsgrid.index.records import (
    AddResult,
    FailedWork,
    IndexStats,
    NewInstance,
    PendingWork,
    SiteUsage,
    WebUser,
    WorkItem,
    WorkSummary,
)
from pacsgrid.index.sites import SiteCopy, SiteReport
from pacsgrid.index.sql_matching import Query
from pacsgrid.migration_ledger import FileEntry, StudyEntry
from pacsgrid.model import CopyRecord, InstanceRecord

__all__ = [
    "AddResult",
    "Catalog",
    "CopyLedger",
    "CorrectionLog",
    "FailedWork",
    "Index",
    "IndexStats",
    "MigrationLedgers",
    "NewInstance",
    "PendingWork",
    "SiteUsage",
    "UserStore",
    "WebUser",
    "WorkItem",
    "WorkQueue",
    "WorkSummary",
]


class Catalog(Protocol):
    """The instances: what is stored, found and read (every front end's questions end here)."""

    url: str

    def add_batch(self, items: Sequence[NewInstance], *, durable: bool = True) -> list[AddResult]:
        """Index `items` in one transaction; all or none (raises IndexUnavailable).

        `durable=False`: the commit need not be on disk when this returns (the objects' site
        logs hold what replays it after a crash; `sync` makes it durable). Engines where
        that is not safe (a database that can fail over) commit durably anyway."""
        ...

    @property
    def concurrent_batches(self) -> int:
        """How many `add_batch` calls may usefully run at once, from as many threads (the
        group committer leads that many batches at a time): 1 on SQLite, whose writers
        take turns; one per write connection on PostgreSQL."""
        ...

    @property
    def gather_seconds(self) -> float:
        """How long the group committer may hold a batch for stores on their way to it:
        0 where a batch costs little more than its rows (SQLite, in-process); a few
        milliseconds on PostgreSQL, where each batch is round trips and a server
        transaction."""
        ...

    def sync(self) -> None:
        """Make every commit made so far durable (a checkpoint of the site logs)."""
        ...

    def has_instance(self, sop_uid: str) -> bool: ...

    def find(self, query: Query) -> Iterator[dict[str, str]]:
        """Entities at `query.level` matching `query`, as attribute values by keyword
        (including the computed counts and ModalitiesInStudy)."""
        ...

    def instances(self, query: Query, *, visible: bool = False) -> list[InstanceRecord]:
        """Instances below the entities matched by `query`, with their copies (retrieve).

        `visible`: what a retrieve sends: no instance a rejection hides, and each record of a
        corrected study carries the values its object is sent with (`corrections`). Without
        it, every indexed instance as stored (repair, audit, recovery)."""
        ...

    def instance(self, sop_uid: str) -> InstanceRecord | None: ...

    def stats(self) -> IndexStats: ...


class CopyLedger(Protocol):
    """Where each copy lives and in what state: repair, fixity audit, cache tier, reindex."""

    def record_copy(self, sop_uid: str, copy: CopyRecord) -> None:
        """Add or update one copy of an instance (repair, cache fill, audit)."""
        ...

    def register_site(self, name: str) -> bool:
        """Remember a site; True if it was new to the index."""
        ...

    def known_sites(self) -> set[str]: ...

    def site_copies(self, site: str, after_pk: int, limit: int) -> list[SiteCopy]: ...

    def audit_candidates(
        self, sites: Sequence[str], before: float, after: tuple[int, str], limit: int
    ) -> list[SiteCopy]: ...

    def under_replicated(
        self, archive_sites: Sequence[str], copies: int, after_pk: int, limit: int
    ) -> list[tuple[int, str]]: ...

    def count_under_replicated(self, archive_sites: Sequence[str], copies: int) -> int: ...

    def site_report(self) -> list[SiteReport]: ...

    def record_copies(self, items: Sequence[tuple[str, CopyRecord]]) -> None: ...

    def set_copy_state(
        self, site: str, instance_pks: Sequence[int], state: str, verified_at: float | None = None
    ) -> None: ...

    def remove_copy(self, sop_uid: str, site: str) -> None: ...

    def touch_copies(self, site: str, sop_uids: Sequence[str], when: float) -> None: ...

    def site_bytes(self, site: str) -> int: ...

    def eviction_candidates(
        self, site: str, archive_sites: Sequence[str], limit: int
    ) -> list[tuple[str, str, int]]: ...

    def copies_on(self, site: str, keys: Sequence[str]) -> set[str]:
        """Those of `keys` that the index records as copies on `site`."""
        ...

    def copy_pages(self, after: int = 0, limit: int = 5000) -> list[tuple[int, str, str, str]]:
        """(instance pk, SOP Instance UID, site, key) of every recorded copy of instances
        with pk > `after`, in pk order, `limit` instances at a time (site '' when an
        instance has no copy at all)."""
        ...


class WorkQueue(Protocol):
    """Durable work items claimed under a lease, and the state of background jobs."""

    def enqueue(self, kind: str, items: Sequence[tuple[str, str]]) -> int:
        """Queue (key, payload) items of `kind`; an item already pending stays as it is, a
        done or failed one is queued again. Returns how many were (re)queued."""
        ...

    def claim(self, kind: str, owner: str, limit: int, lease: float) -> list[WorkItem]:
        """Up to `limit` ready items of `kind`, leased to `owner` for `lease` seconds; no
        other owner gets them while the lease runs (SKIP LOCKED on PostgreSQL). Items are
        claimed in the order they became ready: items never tried first, in the order they
        were queued, then retries by the end of their backoff."""
        ...

    def enqueue_claimed(
        self, kind: str, key: str, payload: str, owner: str, lease: float
    ) -> WorkItem | None:
        """Queue one item already claimed by `owner` for `lease` seconds, for a caller that
        works on it at once (its work is not counted among the item's attempts: those are
        the claims of `claim`); if that caller dies, the lease runs out and the item is
        claimed like any other. None when an item with this key is pending already (it is
        left as it is); a done or failed one is queued again."""
        ...

    def extend_claim(self, pk: int, owner: str, lease: float) -> bool:
        """Renew `owner`'s lease on a pending item for `lease` seconds from now (work that
        takes long); False when the item is done, failed or claimed by another owner."""
        ...

    def complete(self, pks: Sequence[int]) -> None: ...

    def fail(
        self, pk: int, error: str, retry_at: float | None, *, payload: str | None = None
    ) -> None:
        """Record a failed attempt: retry after `retry_at` (epoch seconds), or give up
        (state 'failed', listed for the operator) when `retry_at` is None. `payload`
        replaces the item's payload (what the attempt learnt, for the next one)."""
        ...

    def fail_many(
        self,
        failures: Sequence[tuple[int, str, float | None]],
        *,
        payload: str | None = None,
    ) -> None:
        """`fail` for many items (pk, error, retry_at) in one transaction."""
        ...

    def work_counts(self, kind: str) -> dict[str, int]:
        """Items of `kind` by state (pending, done, failed)."""
        ...

    def wake(self, kind: str) -> int:
        """Make every waiting item of `kind` ready now (a site came back up)."""
        ...

    def work_failures(self, kind: str, limit: int = 100) -> list[tuple[str, int, str]]:
        """(key, attempts, last error) of given-up items of `kind`, newest first."""
        ...

    def pending_work(self, kind: str, limit: int = 100) -> list[PendingWork]:
        """Items of `kind` not done yet, oldest first (what an operator watches)."""
        ...

    def retry_failed_work(self, kind: str) -> int:
        """Queue every given-up item of `kind` again; returns how many."""
        ...

    def work_summary(self) -> list[WorkSummary]:
        """Every kind of work with its counts by state (the dashboard's jobs page)."""
        ...

    def failed_work(self, limit: int) -> list[FailedWork]:
        """The most recently failed work items of every kind."""
        ...

    def lease_job(self, name: str, owner: str, every: float) -> bool:
        """True if `owner` is to run the periodic job `name` now: no node started it in the
        last `every` seconds. Records the start, so with several nodes exactly one of them
        gets True per period."""
        ...

    def get_job_state(self, name: str) -> str | None: ...

    def set_job_state(self, name: str, value: str | None) -> None: ...


class MigrationLedgers(Protocol):
    """What `pacsgrid migrate` knows of each item of a source (pacsgrid.migration_ledger)."""

    def folder_ledger(self, source: str) -> dict[str, FileEntry]:
        """Every file recorded for a legacy folder, by relative path (pacsgrid.migration_ledger)."""
        ...

    def record_files(self, source: str, entries: Sequence[FileEntry]) -> None:
        """Insert or update ledger rows of a folder, in one transaction."""
        ...

    def study_ledger(self, source: str, states: Sequence[str] = ()) -> list[StudyEntry]:
        """Studies recorded for a legacy PACS (optionally only those in `states`)."""
        ...

    def record_studies(self, source: str, entries: Sequence[StudyEntry]) -> None:
        """Insert or update ledger rows of a PACS, in one transaction."""
        ...

    def study_sop_uids(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs the archive holds in one study."""
        ...

    def has_instances(self, sop_uids: Sequence[str]) -> set[str]:
        """The subset of `sop_uids` the archive holds."""
        ...


class UserStore(Protocol):
    """Web users and their API tokens."""

    def save_user(self, user: WebUser) -> None:
        """Create or update a user (role and password hash)."""
        ...

    def user(self, name: str) -> WebUser | None: ...

    def users(self) -> list[WebUser]: ...

    def remove_user(self, name: str) -> bool:
        """Delete a user and their tokens; False if there was no such user."""
        ...

    def save_token(self, token_hash: str, user: str, label: str) -> None: ...

    def token_user(self, token_hash: str) -> WebUser | None:
        """The user an API token (by its SHA-256) belongs to."""
        ...


class CorrectionLog(Protocol):
    """Corrections in the order they were made, and what they changed (pacsgrid.correction)."""

    def corrections_lock(self) -> AbstractContextManager[None]: ...

    def next_correction_seq(self) -> int: ...

    def add_pending_correction(self, c: Correction) -> None: ...

    def pending_corrections(self) -> list[Correction]: ...

    def apply_correction(self, c: Correction, missing: Sequence[str] = ()) -> bool: ...

    def record_source(self, source: str, outcome: str) -> None: ...

    def set_correction_missing(self, seq: int, missing: Sequence[str]) -> None: ...

    def source_outcome(self, source: str) -> tuple[str, int | None] | None: ...

    def correction(self, seq: int) -> CorrectionRow | None: ...

    def corrections(
        self, limit: int = 50, offset: int = 0, *, missing_only: bool = False
    ) -> list[CorrectionRow]: ...

    def later_corrections(
        self, seq: int, subjects: Sequence[str]
    ) -> list[tuple[int, str, int]]: ...

    def patient(self, pid: str, issuer: str) -> dict[str, str] | None: ...

    def patient_studies(self, pid: str, issuer: str) -> list[str]: ...

    def study_patient(self, study_uid: str) -> dict[str, str] | None: ...

    def hidden_instances(
        self, limit: int = 100, offset: int = 0, *, by: int = 0, study_uid: str = ""
    ) -> list[HiddenInstance]: ...

    def hiding(self, sop_uids: Sequence[str]) -> list[tuple[str, int, str]]: ...

    def iter_corrections(self) -> Iterator[CorrectionRow]: ...


class Index(Catalog, CopyLedger, WorkQueue, MigrationLedgers, UserStore, CorrectionLog, Protocol):
    """The whole index, as an engine implements it; each consumer is typed against the
    narrow protocol above that it needs."""

    def close(self) -> None: ...
