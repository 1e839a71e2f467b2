"""Ledgers of `pacsgrid migrate` (a mixin of SqlIndex): one row per legacy file or study."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pacsgrid.index.sql_base import SqlBase
from pacsgrid.migration_ledger import FileEntry, StudyEntry


class LedgerQueries(SqlBase):
    # ------------------------------------------------------------------ migration ledgers
    def folder_ledger(self, source: str) -> dict[str, FileEntry]:
        rows = self._all(
            "SELECT path, size, mtime_ns, sha256, sop_uid, state, reason, updated_at "
            "FROM folder_ledger WHERE source = ?",
            (source,),
        )
        return {
            r[0]: FileEntry(r[0], int(r[1]), int(r[2]), r[3], r[4], r[5], r[6], float(r[7]))
            for r in rows
        }

    def record_files(self, source: str, entries: Sequence[FileEntry]) -> None:
        now = time.time()
        with self._tx() as db:
            for e in entries:
                self._x(
                    db,
                    "INSERT INTO folder_ledger (source, path, size, mtime_ns, sha256, sop_uid, "
                    "state, reason, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (source, path) DO UPDATE SET size = excluded.size, "
                    "mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, "
                    "sop_uid = excluded.sop_uid, state = excluded.state, "
                    "reason = excluded.reason, updated_at = excluded.updated_at",
                    (
                        source,
                        e.path,
                        e.size,
                        e.mtime_ns,
                        e.sha256,
                        e.sop_uid,
                        e.state,
                        e.reason[:2000],
                        now,
                    ),
                )

    def study_ledger(self, source: str, states: Sequence[str] = ()) -> list[StudyEntry]:
        sql = (
            "SELECT study_uid, study_date, patient_id, expected, received, state, attempts, "
            "last_error, updated_at FROM study_ledger WHERE source = ?"
        )
        params: list[Any] = [source]
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            params += list(states)
        rows = self._all(sql + " ORDER BY study_date, pk", params)
        return [
            StudyEntry(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], int(r[6]), r[7], float(r[8]))
            for r in rows
        ]

    def record_studies(self, source: str, entries: Sequence[StudyEntry]) -> None:
        now = time.time()
        with self._tx() as db:
            for e in entries:
                self._x(
                    db,
                    "INSERT INTO study_ledger (source, study_uid, study_date, patient_id, "
                    "expected, received, state, attempts, last_error, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, study_uid) "
                    "DO UPDATE SET study_date = excluded.study_date, "
                    "patient_id = excluded.patient_id, expected = excluded.expected, "
                    "received = excluded.received, state = excluded.state, "
                    "attempts = excluded.attempts, last_error = excluded.last_error, "
                    "updated_at = excluded.updated_at",
                    (
                        source,
                        e.study_uid,
                        e.study_date,
                        e.patient_id,
                        e.expected,
                        e.received,
                        e.state,
                        e.attempts,
                        e.last_error[:2000],
                        now,
                    ),
                )

    def study_sop_uids(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs the archive holds in a study (migration counts, verify)."""
        rows = self._all(
            "SELECT i.sop_uid FROM instance i JOIN series se ON i.series_pk = se.pk "
            "JOIN study st ON se.study_pk = st.pk WHERE st.study_uid = ?",
            (study_uid,),
        )
        return {r[0] for r in rows}

    def has_instances(self, sop_uids: Sequence[str]) -> set[str]:
        """Which of `sop_uids` the archive holds."""
        found: set[str] = set()
        uids = list(sop_uids)
        for start in range(0, len(uids), 500):
            chunk = uids[start : start + 500]
            rows = self._all(
                f"SELECT sop_uid FROM instance WHERE sop_uid IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.update(r[0] for r in rows)
        return found
