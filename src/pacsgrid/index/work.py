"""The durable work queue of background jobs, and leases on periodic jobs (a mixin of SqlIndex).

Items are (kind, key) rows with a state (pending, done, failed), a lease (claimed_by,
claimed_until) and a backoff (not_before). A node claims ready items with a lease; if it dies,
the lease runs out and another node claims them. PostgreSQL claims with SKIP LOCKED (CLAIM_LOCK).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pacsgrid.index.changes import Insert
from pacsgrid.index.records import FailedWork, PendingWork, WorkItem, WorkSummary
from pacsgrid.index.sql_base import SqlBase

WORK_COLUMNS = ("kind", "key", "payload", "created_at", "updated_at")
# An item already pending stays as it is; a done or failed one is queued again.
ENQUEUE_CONFLICT = (
    "ON CONFLICT (kind, key) DO UPDATE SET state = 'pending', payload = excluded.payload, "
    "attempts = 0, not_before = 0, claimed_by = NULL, claimed_until = NULL, last_error = '', "
    "updated_at = excluded.updated_at WHERE work.state <> 'pending'"
)
ENQUEUE = Insert("work", WORK_COLUMNS, [], ENQUEUE_CONFLICT).statement()
# The next ready items of a kind (kind, now, now, limit): in the order of work_ready_idx
# (ready since, then queued), so that a claim reads `limit` index entries. Ordered by pk
# alone, every claim sorted all ready items: with millions queued (a repair after a site
# lost its objects) that took seconds, inside the write transaction that stores wait for.
READY = (
    "SELECT pk FROM work WHERE kind = ? AND state = 'pending' AND not_before <= ? AND "
    "(claimed_until IS NULL OR claimed_until < ?) ORDER BY not_before, pk LIMIT ?"
)


class WorkQueries(SqlBase):
    # ------------------------------------------------------------------ work queue
    def _enqueue(self, db: Any, kind: str, key: str, payload: str, now: float) -> int:
        cur = self._x(db, ENQUEUE, (kind, key, payload, now, now))
        return max(0, int(cur.rowcount))

    def enqueue(self, kind: str, items: Sequence[tuple[str, str]]) -> int:
        now = time.time()
        with self._tx() as db:
            return sum(self._enqueue(db, kind, key, payload, now) for key, payload in items)

    def enqueue_claimed(
        self, kind: str, key: str, payload: str, owner: str, lease: float
    ) -> WorkItem | None:
        now = time.time()
        with self._tx() as db:
            row = self._x(
                db,
                "INSERT INTO work (kind, key, payload, attempts, claimed_by, claimed_until, "
                "created_at, updated_at) VALUES (?, ?, ?, 0, ?, ?, ?, ?) "
                "ON CONFLICT (kind, key) DO UPDATE SET state = 'pending', "
                "payload = excluded.payload, attempts = 0, not_before = 0, "
                "claimed_by = excluded.claimed_by, claimed_until = excluded.claimed_until, "
                "last_error = '', updated_at = excluded.updated_at WHERE work.state <> 'pending' "
                "RETURNING pk, kind, key, payload, attempts",
                (kind, key, payload, owner, now + lease, now, now),
            ).fetchone()
        return WorkItem(int(row[0]), row[1], row[2], row[3], int(row[4])) if row else None

    def extend_claim(self, pk: int, owner: str, lease: float) -> bool:
        now = time.time()
        with self._tx() as db:
            cur = self._x(
                db,
                "UPDATE work SET claimed_until = ?, updated_at = ? WHERE pk = ? AND "
                "claimed_by = ? AND state = 'pending'",
                (now + lease, now, pk, owner),
            )
            return int(cur.rowcount) == 1

    # Appended to the claim subquery; PostgreSQL sets " FOR UPDATE SKIP LOCKED".
    CLAIM_LOCK = ""

    def claim(self, kind: str, owner: str, limit: int, lease: float) -> list[WorkItem]:
        now = time.time()
        with self._tx() as db:
            rows = self._x(
                db,
                "UPDATE work SET claimed_by = ?, claimed_until = ?, attempts = attempts + 1, "
                f"updated_at = ? WHERE pk IN ({READY}{self.CLAIM_LOCK}) "
                "RETURNING pk, kind, key, payload, attempts",
                (owner, now + lease, now, kind, now, now, int(limit)),
            ).fetchall()
        items = [WorkItem(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in rows]
        return sorted(items, key=lambda w: w.pk)

    def complete(self, pks: Sequence[int]) -> None:
        if not pks:
            return
        now = time.time()
        with self._tx() as db:
            for start in range(0, len(pks), 500):
                chunk = list(pks[start : start + 500])
                self._x(
                    db,
                    "UPDATE work SET state = 'done', claimed_by = NULL, claimed_until = NULL, "
                    f"updated_at = ? WHERE pk IN ({', '.join('?' * len(chunk))})",
                    [now, *chunk],
                )

    def fail(
        self, pk: int, error: str, retry_at: float | None, *, payload: str | None = None
    ) -> None:
        self.fail_many([(pk, error, retry_at)], payload=payload)

    def fail_many(
        self,
        failures: Sequence[tuple[int, str, float | None]],
        *,
        payload: str | None = None,
    ) -> None:
        if not failures:
            return
        now = time.time()
        rows = [
            ("failed" if at is None else "pending", at or 0, error[:2000], payload, now, pk)
            for pk, error, at in failures
        ]
        with self._tx() as db:
            for row in rows:
                self._x(
                    db,
                    "UPDATE work SET state = ?, not_before = ?, claimed_by = NULL, "
                    "claimed_until = NULL, last_error = ?, payload = COALESCE(?, payload), "
                    "updated_at = ? WHERE pk = ?",
                    row,
                )

    def work_counts(self, kind: str) -> dict[str, int]:
        rows = self._all("SELECT state, count(*) FROM work WHERE kind = ? GROUP BY state", (kind,))
        return {r[0]: int(r[1]) for r in rows}

    def work_failures(self, kind: str, limit: int = 100) -> list[tuple[str, int, str]]:
        """(key, attempts, last error) of items of `kind` that were given up, newest first."""
        rows = self._all(
            "SELECT key, attempts, last_error FROM work WHERE kind = ? AND state = 'failed' "
            "ORDER BY updated_at DESC LIMIT ?",
            (kind, int(limit)),
        )
        return [(r[0], int(r[1]), r[2]) for r in rows]

    def pending_work(self, kind: str, limit: int = 100) -> list[PendingWork]:
        now = time.time()
        rows = self._all(
            "SELECT key, attempts, last_error, not_before, claimed_by, claimed_until FROM work "
            "WHERE kind = ? AND state = 'pending' ORDER BY pk LIMIT ?",
            (kind, int(limit)),
        )
        return [
            PendingWork(
                r[0],
                int(r[1]),
                r[2],
                float(r[3] or 0),
                r[4] if r[4] and float(r[5] or 0) > now else "",
            )
            for r in rows
        ]

    def wake(self, kind: str) -> int:
        """Make every waiting item of `kind` ready now (a site came back up)."""
        with self._tx() as db:
            cur = self._x(
                db,
                "UPDATE work SET not_before = 0 WHERE kind = ? AND state = 'pending' "
                "AND not_before > 0",
                (kind,),
            )
            return max(0, int(cur.rowcount))

    def retry_failed_work(self, kind: str) -> int:
        """Queue every given-up item of `kind` again (an operator fixed the cause)."""
        with self._tx() as db:
            cur = self._x(
                db,
                "UPDATE work SET state = 'pending', attempts = 0, not_before = 0, "
                "last_error = '', updated_at = ? WHERE kind = ? AND state = 'failed'",
                (time.time(), kind),
            )
            return max(0, int(cur.rowcount))

    def lease_job(self, name: str, owner: str, every: float) -> bool:
        now = time.time()
        with self._tx() as db:
            self._x(
                db,
                "INSERT INTO job_state (name, last_run, owner) VALUES (?, 0, '') "
                "ON CONFLICT (name) DO NOTHING",
                (name,),
            )
            cur = self._x(
                db,
                "UPDATE job_state SET last_run = ?, owner = ? WHERE name = ? AND last_run <= ?",
                (now, owner, name, now - every),
            )
            return int(cur.rowcount) == 1

    def work_summary(self) -> list[WorkSummary]:
        rows = self._all(
            "SELECT kind, state, count(*), max(updated_at) FROM work GROUP BY kind, state "
            "ORDER BY kind, state"
        )
        return [WorkSummary(r[0], r[1], int(r[2]), float(r[3] or 0)) for r in rows]

    def failed_work(self, limit: int) -> list[FailedWork]:
        kinds = [r[0] for r in self._all("SELECT DISTINCT kind FROM work")]
        out: list[FailedWork] = []
        for kind in kinds:  # per kind, so that the (kind, state) index serves the filter
            rows = self._all(
                "SELECT kind, key, last_error, attempts, updated_at FROM work WHERE kind = ? "
                "AND state = 'failed' ORDER BY updated_at DESC LIMIT ?",
                (kind, int(limit)),
            )
            out += [FailedWork(r[0], r[1], r[2], int(r[3]), float(r[4])) for r in rows]
        out.sort(key=lambda f: f.updated_at, reverse=True)
        return out[:limit]
