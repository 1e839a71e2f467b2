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
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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

    def put(self, key: str, chunks: Sequence[bytes], *, replace: bool = False) -> PutResult:
        """Store the concatenation of `chunks` under `key`, durably and atomically."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes (ObjectMissing if absent)."""
        ...

    def stat(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every stored object under `prefix`, in no particular order; never temp files."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object. Archive sites refuse: only a cache evicts."""
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
