"""`Archive`: the one service every front end calls (DICOM, web, importer, migrator).

The rules of the archive live here, once:
- ingest is durable before it is acknowledged: write the object to the write quorum of sites
  (each write fsynced and atomically visible), commit the index row (group commit), and only
  then return; any failure raises and nothing is acknowledged;
- duplicates (a SOP Instance UID stored again) follow `dicom.on_duplicate`: keep (default) or
  replace; never two rows, never a torn file;
- access control: who may echo, store, find, move, get (DICOM peers by AE title, web users
  by role: read, write, admin);
- forwarding: an instance a forwarding rule selects is queued for its peer in the same index
  transaction as its row (never to the peer it came from, so forwarding pairs do not loop);
- audit: every store, query and retrieve, allowed or refused, and every admin action, is one
  record in the audit log (pacsgrid.access_log), whichever front end it came through;
- metrics: ingest and retrieve counts and latencies per service, site operations and errors
  (pacsgrid.metrics);
- reads fall back copy by copy and verify the SHA-256 of what they read.

All methods are synchronous and thread-safe; the asyncio DICOM server calls them from a thread
pool.
"""

from pacsgrid.archive.records import (
    COPY,
    FORWARD,
    LOCAL,
    ROLES,
    ArchiveStatus,
    Caller,
    Health,
    IngestResult,
    SiteStatus,
    StoredObject,
)
from pacsgrid.archive.reports import SiteRow, SitesReport
from pacsgrid.archive.service import Archive
from pacsgrid.archive.spool import Spool
from pacsgrid.archive.users import check_password, hash_password, token_hash

# Re-exported: the query vocabulary and records the front ends use (they import nothing
# from pacsgrid.index or pacsgrid.storage themselves).
from pacsgrid.index import WebUser, WorkSummary, display_url
from pacsgrid.matching import Match, Query, parse_match

__all__ = [
    "COPY",
    "FORWARD",
    "LOCAL",
    "ROLES",
    "Archive",
    "ArchiveStatus",
    "Caller",
    "Health",
    "IngestResult",
    "Match",
    "Query",
    "SiteRow",
    "SiteStatus",
    "SitesReport",
    "Spool",
    "StoredObject",
    "WebUser",
    "WorkSummary",
    "check_password",
    "display_url",
    "hash_password",
    "parse_match",
    "token_hash",
]
