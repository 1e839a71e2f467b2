"""What a test looks at behind an archive: its index, sites, placement, cache tier and group
committer, to check what the archive wrote or to take a site down.

The archive keeps them private: front ends ask the archive, jobs get what they need when
pacsgrid.node builds them, and in tests/ only this module reads them (tests/test_layout.py).
"""

from __future__ import annotations

from pacsgrid.archive import Archive
from pacsgrid.archive.cache import CacheTier
from pacsgrid.index import Index
from pacsgrid.index.commit import GroupCommitter
from pacsgrid.storage import StorageSite
from pacsgrid.storage.placement import Placement


def index_of(archive: Archive) -> Index:
    return archive._index


def sites_of(archive: Archive) -> list[StorageSite]:
    return archive._sites


def placement_of(archive: Archive) -> Placement:
    return archive._placement


def cache_of(archive: Archive) -> CacheTier:
    return archive._cache


def committer_of(archive: Archive) -> GroupCommitter:
    return archive._committer
