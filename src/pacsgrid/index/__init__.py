"""The metadata index (derived from the storage sites; rebuildable with `pacsgrid reindex`)."""

from __future__ import annotations

from pathlib import Path

from pacsgrid.errors import ConfigError
from pacsgrid.index.base import (
    AddResult,
    FailedWork,
    Index,
    IndexStats,
    NewInstance,
    SiteUsage,
    WebUser,
    WorkItem,
    WorkSummary,
)
from pacsgrid.query import Match, Query, parse_match

__all__ = [
    "AddResult",
    "FailedWork",
    "Index",
    "IndexStats",
    "Match",
    "NewInstance",
    "Query",
    "SiteUsage",
    "WebUser",
    "WorkItem",
    "WorkSummary",
    "open_index",
    "parse_match",
]


def open_index(url: str) -> Index:
    """Open (creating or upgrading the schema) the index a `database` setting names."""
    if url.startswith("sqlite:///"):
        from pacsgrid.index.sqlite import SqliteIndex

        return SqliteIndex(Path(url[len("sqlite:///") :]))
    if url.startswith(("postgres://", "postgresql://")) or "=" in url:
        try:
            from pacsgrid.index.postgres import PostgresIndex  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError as e:
            raise ConfigError("database", f"PostgreSQL index unavailable: {e}") from None
        return PostgresIndex(url)  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError("database", f"expected sqlite:///path or a PostgreSQL conninfo, got {url!r}")
