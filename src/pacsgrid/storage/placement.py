"""Where copies go and where reads come from, given the replication policy and site health.

Write order is deterministic (distinct locations first, then by site name), so that concurrent
stores of one SOP Instance UID meet on the same first site and agree on one set of bytes there
(see `StorageSite.put`'s no-clobber rule).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pacsgrid.model import CopyRecord
from pacsgrid.storage.base import StorageSite

log = logging.getLogger(__name__)


@dataclass
class SiteState:
    up: bool = True
    reason: str = ""
    since: float = 0.0


class Placement:
    def __init__(self, sites: Sequence[StorageSite], copies: int, write_quorum: int) -> None:
        self.sites = {s.name: s for s in sites}
        self.copies = copies
        self.write_quorum = write_quorum
        self._state = {s.name: SiteState(since=time.time()) for s in sites}
        self._lock = threading.Lock()
        # Called (outside the lock) with a site's name when it comes back up: the repair job
        # wakes the copies that waited for it.
        self.on_up: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ health
    def mark_down(self, name: str, reason: str) -> None:
        with self._lock:
            st = self._state[name]
            if st.up:
                log.warning("site %s is down: %s", name, reason)
                self._state[name] = SiteState(False, reason, time.time())

    def mark_up(self, name: str) -> None:
        with self._lock:
            st = self._state[name]
            came_back = not st.up
            if came_back:
                log.info(
                    "site %s is up again (was down for %.0fs: %s)",
                    name,
                    time.time() - st.since,
                    st.reason,
                )
                self._state[name] = SiteState(True, "", time.time())
        if came_back:
            for callback in list(self.on_up):
                try:
                    callback(name)
                except Exception:
                    log.exception("site-up callback failed")

    def state(self, name: str) -> SiteState:
        return self._state[name]

    def is_up(self, name: str) -> bool:
        return self._state[name].up

    def probe(self) -> None:
        """Check every site once; update the up/down state."""
        for site in self.sites.values():
            try:
                health = site.check()
            except Exception as e:  # a probe must never take the archive down
                self.mark_down(site.name, f"probe failed: {e}")
                continue
            if health.ok:
                self.mark_up(site.name)
            else:
                self.mark_down(site.name, health.reason)

    # ------------------------------------------------------------------ decisions
    def archive_sites(self) -> list[StorageSite]:
        return [s for s in self.sites.values() if s.role == "archive"]

    def write_targets(self) -> list[StorageSite]:
        """Healthy archive sites in the order copies should be placed (distinct locations
        first). The caller writes to them in order until the quorum is durable."""
        up = [s for s in sorted(self.archive_sites(), key=lambda s: s.name) if self.is_up(s.name)]
        first: list[StorageSite] = []
        rest: list[StorageSite] = []
        seen: set[str] = set()
        for s in up:
            (rest if s.location in seen else first).append(s)
            seen.add(s.location)
        return first + rest

    def read_order(self, copies: Sequence[CopyRecord]) -> list[tuple[StorageSite, CopyRecord]]:
        """Copies to try, best first: healthy before down, cache before archive, good state."""
        ranked = []
        for c in copies:
            site = self.sites.get(c.site)
            if site is None:
                continue
            ranked.append(
                (
                    (not self.is_up(site.name), c.state != "ok", site.role != "cache", site.name),
                    site,
                    c,
                )
            )
        ranked.sort(key=lambda r: r[0])
        return [(site, c) for _, site, c in ranked]
