"""What the operator is shown about the sites and the work queues (a mixin of `Archive`).

`pacsgrid sites`, `pacsgrid forward status|retry` and the node's start-up ask through these
typed methods; nothing outside the archive reads the index or the sites for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pacsgrid.archive.records import COPY, SiteStatus
from pacsgrid.index import Index
from pacsgrid.index.sites import SiteReport
from pacsgrid.settings import Settings
from pacsgrid.storage import StorageSite
from pacsgrid.storage.placement import Placement


@dataclass(frozen=True)
class SiteRow:
    """One site as `pacsgrid sites` shows it: its state (objects and bytes: copies in state
    ok), its copies as the fixity audit left them, and what the site tells of itself."""

    status: SiteStatus
    copies: SiteReport
    capacity: int | None = None  # cache sites only
    details: dict[str, str] = field(default_factory=dict)  # e.g. S3 versioning, object lock


@dataclass(frozen=True)
class SitesReport:
    sites: tuple[SiteRow, ...]
    copies: int
    write_quorum: int
    under_replicated: int
    without_good_copy: int
    copies_queued: int
    copies_failed: int


class Reports:
    """Relies on Archive's `settings`, `_index`, `_sites` and `_placement`."""

    settings: Settings
    _index: Index
    _sites: list[StorageSite]
    _placement: Placement

    # ------------------------------------------------------------------ work queues
    def work_counts(self, kind: str) -> dict[str, int]:
        """Items of work queue `kind` by state (pending, done, failed)."""
        return self._index.work_counts(kind)

    def work_failures(self, kind: str, limit: int = 100) -> list[tuple[str, int, str]]:
        """(key, attempts, last error) of given-up items of `kind`, newest first."""
        return self._index.work_failures(kind, limit)

    def retry_failed_work(self, kind: str) -> int:
        """Queue every given-up item of `kind` again; returns how many."""
        return self._index.retry_failed_work(kind)

    # ------------------------------------------------------------------ sites
    def sites_down(self) -> list[tuple[str, str]]:
        """(name, reason) of every site now marked down."""
        return [
            (name, self._placement.state(name).reason)
            for name in self._placement.sites
            if not self._placement.is_up(name)
        ]

    def lost(self, limit: int = 1000) -> list[str]:
        """SOP Instance UIDs of objects without a single good (ok) copy on any site."""
        names = sorted(self._placement.sites)
        return [sop for _, sop in self._index.under_replicated(names, 1, 0, limit)]

    def count_lost(self) -> int:
        """How many objects have no good (ok) copy on any site."""
        return self._index.count_under_replicated(sorted(self._placement.sites), 1)

    def site_report(self) -> SitesReport:
        """Every site's state, copies and last fixity check, and the replication summary."""
        replication = self.settings.replication
        report = {r.site: r for r in self._index.site_report()}
        archives = [s.name for s in self._placement.archive_sites()]
        under = self._index.count_under_replicated(archives, replication.copies)
        without_good_copy = self.count_lost()
        counts = self._index.work_counts(COPY)
        capacity = {s.name: s.capacity for s in self.settings.sites}
        rows = []
        for site in self._sites:
            st = self._placement.state(site.name)
            r = report.get(site.name) or SiteReport(site.name, 0, 0, 0, 0, None, 0)
            describe = getattr(site, "describe", None)
            status = SiteStatus(
                site.name, site.url, site.location, site.role, st.up, st.reason, r.objects, r.bytes
            )
            rows.append(
                SiteRow(
                    status,
                    r,
                    capacity.get(site.name) if site.role == "cache" else None,
                    describe() if describe is not None and st.up else {},
                )
            )
        return SitesReport(
            tuple(rows),
            replication.copies,
            replication.write_quorum,
            under,
            without_good_copy,
            counts.get("pending", 0),
            counts.get("failed", 0),
        )
