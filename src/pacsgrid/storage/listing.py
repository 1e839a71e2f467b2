"""A site's listing without its keys held in memory: as 8-byte hashes, for "is this key on
the site?" (`KeySet`), and sorted on disk in the order its objects were stored (`StoredOrder`).

The repair scan compares every copy the index records on a site with the site's listing. Held
as a set of key strings, the listing of 10 million objects took 2.2 GB of the server's memory
for the minutes the scan ran. `KeySet` keeps a 64-bit hash of each key instead, sorted in
buckets: about 8 bytes per object (80 MB for 10 million), and a lookup is a binary search.

The price is a false "present": a key not on the site whose hash equals that of a key that
is. For one absent key the chance is the listing's size divided by 2**64, 5e-13 for ten
million objects; the copy would then be missed by this scan and looked for again by the next
one (and the fixity audit reads it). The hash is Python's own, salted per process (unless
PYTHONHASHSEED fixes it), so keys that collide cannot be chosen from outside; a set is never
kept beyond the process that built it.

`StoredOrder` is the other thing a whole listing is needed for: `reindex` files the objects
of a site in the order they were stored (the first instance of a study decides its patient
and study attributes). Sorting the listing in memory held about 340 bytes per object at the
peak, 3.4 GB for ten million; it is sorted on disk instead (SQLite in a temporary folder:
about the length of the keys per object, twice that while it sorts), and read back in order
a page at a time.
"""

from __future__ import annotations

import sqlite3
import tempfile
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from pathlib import Path

from pacsgrid.storage.base import ObjectInfo

_BUCKETS = 256  # sorted per bucket: sorting all at once would need a list of every hash


class KeySet:
    """The set of `keys`, for membership only (see the module docstring)."""

    def __init__(self, keys: Iterable[str]) -> None:
        buckets = [array("q") for _ in range(_BUCKETS)]
        count = 0
        for key in keys:
            h = hash(key)
            buckets[h % _BUCKETS].append(h)
            count += 1
        for n, bucket in enumerate(buckets):  # one bucket's copy at a time
            buckets[n] = array("q", sorted(bucket))
        self._buckets = buckets
        self._count = count

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        h = hash(key)
        bucket = self._buckets[h % _BUCKETS]
        i = bisect_left(bucket, h)
        return i < len(bucket) and bucket[i] == h

    def __len__(self) -> int:
        """How many keys were given (a listing names each object once)."""
        return self._count


class StoredOrder:
    """The keys of `infos` in the order the objects were stored (modification time, then
    key), sorted on disk in a temporary folder (TMPDIR). Close it to remove the folder."""

    def __init__(self, infos: Iterable[ObjectInfo]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="pacsgrid-listing-")
        self._db = sqlite3.connect(Path(self._dir.name) / "listing.sqlite")
        try:
            self._db.execute("PRAGMA journal_mode = OFF")  # scratch: nothing to recover
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.execute("CREATE TABLE listing (mtime REAL NOT NULL, key TEXT NOT NULL)")
            self.count = 0
            page: list[tuple[float, str]] = []
            for info in infos:
                page.append((info.mtime, info.key))
                if len(page) >= 10_000:
                    self._add(page)
            self._add(page)
        except BaseException:
            self.close()
            raise

    def _add(self, page: list[tuple[float, str]]) -> None:
        self._db.executemany("INSERT INTO listing VALUES (?, ?)", page)
        self.count += len(page)
        page.clear()

    def keys(self) -> Iterator[str]:
        """Oldest first; objects stored at the same moment by key."""
        for (key,) in self._db.execute("SELECT key FROM listing ORDER BY mtime, key"):
            yield key

    def key_set(self) -> KeySet:
        return KeySet(key for (key,) in self._db.execute("SELECT key FROM listing"))

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()
