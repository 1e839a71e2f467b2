"""Index queries for several sites: repair, fixity audit, cache tier, `pacsgrid sites`.

A mixin of `SqlIndex` (so every SQL engine gets them): portable SQL with `?` placeholders,
batched in chunks of 500 ids so that no statement grows without bound. Copies are addressed by
(instance_pk, site); `instance_pk` is the index's own key and is used as a resumable cursor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pacsgrid.index.sql_base import SqlBase, marks
from pacsgrid.model import CopyRecord

CHUNK = 500


@dataclass(frozen=True, slots=True)
class SiteCopy:
    """One copy as the repair and audit jobs see it."""

    instance_pk: int
    sop_uid: str
    site: str
    key: str
    size: int
    sha256: str
    state: str
    verified_at: float | None


@dataclass(frozen=True, slots=True)
class SiteReport:
    site: str
    objects: int  # copies in state ok
    bytes: int
    bad: int
    missing: int
    last_verified: float | None  # the most recent fixity check of any copy on the site
    never_verified: int


class SiteQueries(SqlBase):
    """Copies on sites: repair, audit, cache tier, reindex and reconcile."""

    _COPY_COLUMNS = (
        "c.instance_pk, i.sop_uid, c.site, c.key, c.size, c.sha256, c.state, c.verified_at"
    )
    # The copies' site as the pages below test it. SQLite, on an index that has never been
    # analyzed (an archive that grew by ingest), reads a page from the (site, ...) index and
    # sorts every copy of the site to find it; SQLite's engine marks it `+c.site`, which keeps
    # that index out of the plan, so a page is read in key order and stops at its limit.
    _PAGE_SITE = "c.site"

    @staticmethod
    def _site_copy(r: Any) -> SiteCopy:
        return SiteCopy(
            int(r[0]),
            r[1],
            r[2],
            r[3],
            int(r[4]),
            r[5],
            r[6],
            None if r[7] is None else float(r[7]),
        )

    # ------------------------------------------------------------------ reading copies
    # The pages below bound both sides of the join by the cursor (and the cursor's OR by a
    # plain range): PostgreSQL merges the two primary keys, and with only the copy side
    # bounded it read the instances from the first one up to the cursor on every page, so
    # a pass over 10 million copies took hours (1.1 s per page half-way through).
    def site_copies(self, site: str, after_pk: int, limit: int) -> list[SiteCopy]:
        """Copies recorded on `site`, in instance order after `after_pk` (any state)."""
        rows = self._all(
            f"SELECT {self._COPY_COLUMNS} FROM copy c JOIN instance i ON i.pk = c.instance_pk "
            f"WHERE {self._PAGE_SITE} = ? AND c.instance_pk > ? AND i.pk > ? "
            "ORDER BY c.instance_pk LIMIT ?",
            (site, after_pk, after_pk, int(limit)),
        )
        return [self._site_copy(r) for r in rows]

    def audit_candidates(
        self, sites: Sequence[str], before: float, after: tuple[int, str], limit: int
    ) -> list[SiteCopy]:
        """Copies in state ok on `sites` not verified since `before`, after the cursor
        (instance_pk, site), in cursor order."""
        if not sites:
            return []
        rows = self._all(
            f"SELECT {self._COPY_COLUMNS} FROM copy c JOIN instance i ON i.pk = c.instance_pk "
            f"WHERE {self._PAGE_SITE} IN ({marks(len(sites))}) AND c.state = 'ok' "
            "AND (c.verified_at IS NULL OR c.verified_at < ?) "
            "AND c.instance_pk >= ? AND i.pk >= ? "
            "AND (c.instance_pk > ? OR (c.instance_pk = ? AND c.site > ?)) "
            "ORDER BY c.instance_pk, c.site LIMIT ?",
            (*sites, before, after[0], after[0], after[0], after[0], after[1], int(limit)),
        )
        return [self._site_copy(r) for r in rows]

    def under_replicated(
        self, archive_sites: Sequence[str], copies: int, after_pk: int, limit: int
    ) -> list[tuple[int, str]]:
        """(instance_pk, sop_uid) of instances with fewer than `copies` ok copies on
        `archive_sites`, after `after_pk`."""
        if not archive_sites:
            return []
        rows = self._all(
            "SELECT i.pk, i.sop_uid FROM instance i WHERE i.pk > ? AND (SELECT count(*) "
            "FROM copy c WHERE c.instance_pk = i.pk AND c.state = 'ok' AND c.site IN "
            f"({marks(len(archive_sites))})) < ? ORDER BY i.pk LIMIT ?",
            (after_pk, *archive_sites, copies, int(limit)),
        )
        return [(int(r[0]), r[1]) for r in rows]

    def count_under_replicated(self, archive_sites: Sequence[str], copies: int) -> int:
        if not archive_sites:
            return 0
        rows = self._all(
            "SELECT count(*) FROM instance i WHERE (SELECT count(*) FROM copy c WHERE "
            "c.instance_pk = i.pk AND c.state = 'ok' AND c.site IN "
            f"({marks(len(archive_sites))})) < ?",
            (*archive_sites, copies),
        )
        return int(rows[0][0])

    def site_report(self) -> list[SiteReport]:
        rows = self._all(
            "SELECT site, "
            "coalesce(sum(CASE WHEN state = 'ok' THEN 1 ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN state = 'ok' THEN size ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN state = 'bad' THEN 1 ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN state = 'missing' THEN 1 ELSE 0 END), 0), "
            "max(verified_at), "
            "coalesce(sum(CASE WHEN state = 'ok' AND verified_at IS NULL THEN 1 ELSE 0 END), 0) "
            "FROM copy GROUP BY site ORDER BY site"
        )
        return [
            SiteReport(
                r[0],
                int(r[1]),
                int(r[2]),
                int(r[3]),
                int(r[4]),
                None if r[5] is None else float(r[5]),
                int(r[6]),
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ writing copy state
    def record_copies(self, items: Sequence[tuple[str, CopyRecord]]) -> None:
        """Add or update copies (sop_uid, copy) in one transaction."""
        if not items:
            return
        with self._tx() as db:
            for sop_uid, c in items:
                row = self._x(
                    db, "SELECT pk FROM instance WHERE sop_uid = ?", (sop_uid,)
                ).fetchone()
                if row is None:
                    continue
                self._x(
                    db,
                    "INSERT INTO copy (instance_pk, site, key, size, sha256, stored_at, state, "
                    "verified_at, accessed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (instance_pk, site) DO UPDATE SET key = excluded.key, "
                    "size = excluded.size, sha256 = excluded.sha256, stored_at = "
                    "excluded.stored_at, state = excluded.state, verified_at = "
                    "excluded.verified_at, accessed_at = excluded.accessed_at",
                    (
                        row[0],
                        c.site,
                        c.key,
                        c.size,
                        c.sha256,
                        c.stored_at,
                        c.state,
                        c.verified_at,
                        c.stored_at,
                    ),
                )

    def set_copy_state(
        self,
        site: str,
        instance_pks: Sequence[int],
        state: str,
        verified_at: float | None = None,
    ) -> None:
        """Set the state (and, when given, the verification time) of copies on `site`."""
        with self._tx() as db:
            for start in range(0, len(instance_pks), CHUNK):
                chunk = list(instance_pks[start : start + CHUNK])
                self._x(
                    db,
                    "UPDATE copy SET state = ?, verified_at = coalesce(?, verified_at) "
                    f"WHERE site = ? AND instance_pk IN ({marks(len(chunk))})",
                    (state, verified_at, site, *chunk),
                )

    def remove_copy(self, sop_uid: str, site: str) -> None:
        """Forget a copy (only ever for a cache site's eviction)."""
        with self._tx() as db:
            self._x(
                db,
                "DELETE FROM copy WHERE site = ? AND instance_pk = "
                "(SELECT pk FROM instance WHERE sop_uid = ?)",
                (site, sop_uid),
            )

    # ------------------------------------------------------------------ cache tier
    def touch_copies(self, site: str, sop_uids: Sequence[str], when: float) -> None:
        """Record that copies on `site` were read at `when` (LRU order of a cache)."""
        with self._tx() as db:
            for start in range(0, len(sop_uids), CHUNK):
                chunk = list(sop_uids[start : start + CHUNK])
                self._x(
                    db,
                    "UPDATE copy SET accessed_at = ? WHERE site = ? AND instance_pk IN "
                    f"(SELECT pk FROM instance WHERE sop_uid IN ({marks(len(chunk))}))",
                    (when, site, *chunk),
                )

    def site_bytes(self, site: str) -> int:
        rows = self._all(
            "SELECT coalesce(sum(size), 0) FROM copy WHERE site = ? AND state = 'ok'", (site,)
        )
        return int(rows[0][0])

    def eviction_candidates(
        self, site: str, archive_sites: Sequence[str], limit: int
    ) -> list[tuple[str, str, int]]:
        """(sop_uid, key, size) of copies on cache `site`, least recently used first, whose
        instance also has a verified ok copy on an archive site (never the only copy)."""
        if not archive_sites:
            return []
        rows = self._all(
            "SELECT i.sop_uid, c.key, c.size FROM copy c JOIN instance i ON i.pk = "
            "c.instance_pk WHERE c.site = ? AND EXISTS (SELECT 1 FROM copy a WHERE "
            "a.instance_pk = c.instance_pk AND a.state = 'ok' AND a.verified_at IS NOT NULL "
            f"AND a.site IN ({marks(len(archive_sites))})) "
            "ORDER BY coalesce(c.accessed_at, c.stored_at), c.instance_pk LIMIT ?",
            (site, *archive_sites, int(limit)),
        )
        return [(r[0], r[1], int(r[2])) for r in rows]

    # ------------------------------------------------------------------ job state
    def get_job_state(self, name: str) -> str | None:
        rows = self._all("SELECT value FROM job_state WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def set_job_state(self, name: str, value: str | None) -> None:
        with self._tx() as db:
            if value is None:
                self._x(db, "DELETE FROM job_state WHERE name = ?", (name,))
            else:
                self._x(
                    db,
                    "INSERT INTO job_state (name, value, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
                    "updated_at = excluded.updated_at",
                    (name, value, time.time()),
                )

    # ------------------------------------------------------------------ reindex support
    def copies_on(self, site: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            rows = self._all(
                f"SELECT key FROM copy WHERE site = ? AND key IN ({', '.join('?' * len(chunk))})",
                [site, *chunk],
            )
            found.update(r[0] for r in rows)
        return found

    def copy_pages(self, after: int = 0, limit: int = 5000) -> list[tuple[int, str, str, str]]:
        rows = self._all(
            "SELECT i.pk, i.sop_uid, coalesce(c.site, ''), coalesce(c.key, '') FROM "
            "(SELECT pk, sop_uid FROM instance WHERE pk > ? ORDER BY pk LIMIT ?) i "
            "LEFT JOIN copy c ON c.instance_pk = i.pk ORDER BY i.pk, c.site",
            (after, int(limit)),
        )
        return [(int(r[0]), r[1], r[2], r[3]) for r in rows]
