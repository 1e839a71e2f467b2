"""The `StorageSite` contract every kind of site implements (filesystem, S3).

Error contract, which callers rely on:
- `SiteUnavailable`: the site as a whole cannot be used now (unreachable, unmounted, sentinel
  missing, permission denied on the root). Callers mark the site down and try another.
- `ObjectMissing`: the site works but has no object under that key.
- any other `StorageError`: this one operation failed; the site may be fine.

Writes are all-or-nothing: after `put` returns, the object is durable and visible under its key
with exactly the given bytes; if `put` raises, nothing is visible under the key that was not
there before. `put` never overwrites unless `replace=True`: when an object is already there it
returns `created=False` and leaves it alone, which is how concurrent stores of one SOP Instance
UID agree on one set of bytes.

Durable may mean "durable in the site's write-ahead log" (filesystem sites, storage/wal.py): the
log keeps the object until a checkpoint has flushed its file. A writer that records the object
elsewhere afterwards (ingest: the index row) passes `hold=True` and releases the returned
`receipt` once that record is committed, so that no checkpoint ends before it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pacsgrid.storage.walfile import DeadSegment


class Hold(Protocol):
    """Keeps a logged object's record until the writer has finished with it."""

    def release(self) -> None: ...


SENTINEL = ".pacsgrid-site"
_SAFE = re.compile(r"[^0-9A-Za-z._-]")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class PutResult:
    created: bool  # False: an object was already stored under the key and was kept
    receipt: Hold | None = None  # with put(hold=True) on a logged site: release when done

    def release(self) -> None:
        if self.receipt is not None:
            self.receipt.release()


@dataclass(frozen=True, slots=True)
class SiteHealth:
    ok: bool
    reason: str = ""
    free_bytes: int | None = None
    total_bytes: int | None = None


@runtime_checkable
class StorageSite(Protocol):
    name: str
    location: str
    role: str  # "archive" never deletes; "cache" may evict
    url: str

    def put(
        self,
        key: str,
        chunks: Sequence[bytes],
        *,
        replace: bool = False,
        hold: bool = False,
        sha256: str = "",
        note: str = "",
    ) -> PutResult:
        """Store the concatenation of `chunks` under `key`, durably and atomically.
        `sha256`: the hex digest of the bytes, when the caller knows it already; `note`: a
        short text a logged site keeps with the object for recovery (see storage/wal.py)."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes (ObjectMissing if absent)."""
        ...

    def stat(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str = "", *, suffix: str = ".dcm") -> Iterator[ObjectInfo]:
        """Every stored object under `prefix` whose key ends in `suffix`, in no particular
        order; never temp files. Objects end in `.dcm`; the archive's own small documents
        (corrections, `.json`) are listed only when asked for."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object. Archive sites refuse: only a cache evicts."""
        ...

    def purge(self, key: str) -> None:
        """Remove an object for good, on any site (an object already gone is no error).
        Called by one path only: `pacsgrid reject purge`, the explicit, audited retention
        policy of docs/corrections.md, once the purge is recorded on the sites."""
        ...

    def quarantine(self, key: str, reason: str) -> str:
        """Move a bad copy aside (kept as evidence, never overwritten); return where it went."""
        ...

    def initialize(self) -> None:
        """Prepare an empty site for use (creates the sentinel)."""
        ...

    def check(self) -> SiteHealth:
        """Probe the site: reachable, sentinel present, writable."""
        ...


def _component(uid: str) -> str:
    """A UID made safe as one path component, readable by a human.

    Real UIDs are digits and dots; anything else (spaces, letters from broken modalities,
    path separators) is replaced, and a short hash keeps two different unsafe UIDs apart.
    """
    clean = uid.strip().rstrip("\x00")
    safe = _SAFE.sub("_", clean)
    if safe != clean or not safe or safe.startswith(".") or len(safe) > 128:
        import hashlib

        digest = hashlib.sha256(clean.encode("utf-8", "replace")).hexdigest()[:12]
        safe = (safe.lstrip(".")[:100] or "x") + "~" + digest
    return safe


def object_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Where an instance lives on every site: `<study>/<series>/<sop>.dcm`.

    Keys are built from the UIDs alone so that a site can be read by a person, and rebuilt
    into an index, without any database.
    """
    return f"{_component(study_uid)}/{_component(series_uid)}/{_component(sop_uid)}.dcm"


@runtime_checkable
class LoggedSite(Protocol):
    """A site that makes writes durable in a write-ahead log first (storage/wal.py): the
    archive runs its checkpoints and replays what a crash left in it."""

    name: str
    role: str

    def get(self, key: str) -> bytes: ...

    def logs(self, size: int) -> bool:
        """Whether a write of `size` bytes goes through the log (else: flushed on its own)."""
        ...

    def warm(self) -> None:
        """Prepare the log (a serving process, before its first store)."""
        ...

    def on_rotate(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from a writer's thread) when a checkpoint is due."""
        ...

    def checkpoint(self, sync_index: Callable[[], None], *, max_age: float | None = None) -> int:
        """Flush what the log's finished segments wrote, `sync_index`, free the segments."""
        ...

    def log_pending(self) -> bool: ...

    def close_log(self) -> None: ...

    def dead_log(self) -> list[DeadSegment]:
        """Segments with records left by processes that died (locked for the caller)."""
        ...

    def restore(self, key: str, data: bytes) -> None:
        """Make the object under `key` exactly `data`, durably."""
        ...

    def flush_objects(self, keys: Sequence[str]) -> None:
        """Make existing objects and their folders durable."""
        ...
