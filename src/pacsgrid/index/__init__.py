"""The metadata index (derived from the storage sites; rebuildable with `pacsgrid reindex`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pacsgrid.errors import ConfigError
from pacsgrid.index.base import (
    AddResult,
    Catalog,
    CopyLedger,
    CorrectionLog,
    FailedWork,
    Index,
    IndexStats,
    MigrationLedgers,
    NewInstance,
    PendingWork,
    SiteUsage,
    UserStore,
    WebUser,
    WorkItem,
    WorkQueue,
    WorkSummary,
)
from pacsgrid.index.corrections import CorrectionRow, HiddenInstance
from pacsgrid.matching import Match, Query, parse_match

if TYPE_CHECKING:
    from pacsgrid.settings import IndexSettings

__all__ = [
    "AddResult",
    "Catalog",
    "CopyLedger",
    "CorrectionLog",
    "CorrectionRow",
    "FailedWork",
    "HiddenInstance",
    "Index",
    "IndexStats",
    "Match",
    "MigrationLedgers",
    "NewInstance",
    "PendingWork",
    "Query",
    "SiteUsage",
    "UserStore",
    "WebUser",
    "WorkItem",
    "WorkQueue",
    "WorkSummary",
    "display_url",
    "open_index",
    "parse_match",
]


def display_url(url: str) -> str:
    """The database setting as logs and status may show it (no password)."""
    if url.startswith("sqlite:"):
        return url
    try:
        from pacsgrid.index.pg_connections import redact
    except ImportError:
        return "postgresql (conninfo hidden)"
    return redact(url)


def open_index(url: str, options: IndexSettings | None = None) -> Index:
    """Open (creating or upgrading the schema) the index a `database` setting names;
    `options` (the [index] settings) tune PostgreSQL connections."""
    if url.startswith("sqlite:///"):
        from pacsgrid.index.sqlite import SqliteIndex

        return SqliteIndex(Path(url[len("sqlite:///") :]))
    if url.startswith(("postgres://", "postgresql://")) or "=" in url:
        try:
            from pacsgrid.index.postgres import PostgresIndex
        except ImportError as e:
            raise ConfigError(
                "database",
                f"PostgreSQL index unavailable: {e} (pip install 'pacsgrid[postgres]')",
            ) from None
        if options is None:
            return PostgresIndex(url)
        return PostgresIndex(
            url,
            read_url=options.read_database,
            connect_timeout=options.connect_timeout,
            statement_timeout=options.statement_timeout,
            pool_size=options.pool_size,
        )
    raise ConfigError("database", f"expected sqlite:///path or a PostgreSQL conninfo, got {url!r}")
