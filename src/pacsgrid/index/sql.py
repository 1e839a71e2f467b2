"""The Index logic both SQL engines share: schema shape, batch insert, find, locate, stats.

Queries are written once with `?` placeholders; an engine whose driver wants `%s` sets
`dialect = POSTGRES` and `_sql()` rewrites them. Engines supply connections, transactions and
the DDL type names; everything DICOM-specific lives here.

Hierarchy rules (real-world untidiness is stored, never refused):
- a study belongs to the patient it was first stored under; a later instance of the same
  study with another PatientID is filed in that study, with a warning;
- likewise a series stays in the study it was first stored in.
Patient, study and series attributes are those of the first instance stored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index.base import (
    AddResult,
    FailedWork,
    IndexStats,
    NewInstance,
    SiteUsage,
    WebUser,
    WorkItem,
    WorkSummary,
)
from pacsgrid.index.query import (
    ALIAS,
    SQLITE,
    Dialect,
    Query,
    compile_where,
    normalize_stored,
    pn_norm,
)
from pacsgrid.index.schema import MIGRATIONS, TRACKING_TABLE, Types
from pacsgrid.index.sites import SiteQueries
from pacsgrid.ledger import FileEntry, StudyEntry
from pacsgrid.model import ATTRIBUTES, CopyRecord, InstanceRecord, Level

JOINS = {
    Level.PATIENT: "patient p",
    Level.STUDY: "study st JOIN patient p ON st.patient_pk = p.pk",
    Level.SERIES: "series se JOIN study st ON se.study_pk = st.pk "
    "JOIN patient p ON st.patient_pk = p.pk",
    Level.IMAGE: "instance i JOIN series se ON i.series_pk = se.pk "
    "JOIN study st ON se.study_pk = st.pk JOIN patient p ON st.patient_pk = p.pk",
}


class SqlIndex(SiteQueries):
    """Shared implementation; subclasses provide `_conn()` and `_tx()`.

    The queries of repair, audit and the cache tier live in `SiteQueries` (index/sites.py)."""

    url: str
    dialect: Dialect = SQLITE
    db_errors: tuple[type[Exception], ...] = ()  # the driver's errors, mapped to IndexUnavailable

    # ------------------------------------------------------------------ engine hooks
    def _conn(self) -> Any:
        """A connection for reads in the calling thread."""
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[Any]:
        """A write transaction; yields a connection (cursor-like `execute`)."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.dialect.placeholder == "?" else sql.replace("?", "%s")

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return list(self._conn().execute(self._sql(sql), params).fetchall())
        except self.db_errors as e:
            raise IndexUnavailable(f"index query failed: {e}") from e

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self._conn().execute(self._sql(sql), params).fetchone()
        except self.db_errors as e:
            raise IndexUnavailable(f"index query failed: {e}") from e

    def _apply_migrations(self, types: Types) -> None:
        """Bring the schema up to date (see pacsgrid.index.schema); idempotent."""
        with self._tx() as db:
            self._x(db, TRACKING_TABLE)
            applied = {r[0] for r in self._x(db, "SELECT name FROM schema_migrations").fetchall()}
            known = [name for name, _ in MIGRATIONS]
            unknown = sorted(applied - set(known))
            if unknown:
                raise IndexUnavailable(
                    f"index {self.url} was upgraded by a newer pacsgrid (migrations "
                    f"{', '.join(unknown)} are unknown here): upgrade pacsgrid"
                )
            for name, statements in MIGRATIONS:
                if name in applied:
                    continue
                for stmt in statements(types):
                    self._x(db, stmt)
                self._x(
                    db,
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (name, time.time()),
                )

    # ------------------------------------------------------------------ writes
    def add_batch(self, items: Sequence[NewInstance]) -> list[AddResult]:
        with self._tx() as db:
            return [self._add_one(db, item) for item in items]

    def _x(self, db: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return db.execute(self._sql(sql), params)

    def _add_one(self, db: Any, item: NewInstance) -> AddResult:
        v = item.values
        now = time.time()
        row = self._x(
            db, "SELECT pk, sha256 FROM instance WHERE sop_uid = ?", (item.sop_uid,)
        ).fetchone()
        if row is not None:
            if not item.replace:
                for c in item.copies:
                    if c.sha256 == row[1]:
                        self._insert_copy(db, row[0], c, ignore=True)
                return AddResult("duplicate", existing_sha256=row[1])
            self._remove_instance(db, row[0])
        warnings: list[str] = []

        study = self._x(
            db, "SELECT pk, patient_pk FROM study WHERE study_uid = ?", (v["StudyInstanceUID"],)
        ).fetchone()
        new_study = study is None
        if study is None:
            patient_pk = self._patient_pk(db, v)
            study_pk = self._insert(
                db, "study", Level.STUDY, v, {"patient_pk": patient_pk, "updated_at": now}
            )
        else:
            study_pk, patient_pk = study
            pid = self._x(
                db, "SELECT patient_id FROM patient WHERE pk = ?", (patient_pk,)
            ).fetchone()[0]
            if pid != v.get("PatientID", ""):
                # No PatientID values here: warnings reach the ordinary log.
                warnings.append(
                    f"study {v['StudyInstanceUID']} is stored under another PatientID than "
                    f"instance {item.sop_uid} gives; the instance is filed in the existing study"
                )

        series = self._x(
            db, "SELECT pk, study_pk FROM series WHERE series_uid = ?", (v["SeriesInstanceUID"],)
        ).fetchone()
        new_series = series is None
        if series is None:
            series_pk = self._insert(db, "series", Level.SERIES, v, {"study_pk": study_pk})
        else:
            series_pk = series[0]
            if series[1] != study_pk:
                warnings.append(
                    f"series {v['SeriesInstanceUID']} belongs to another study; "
                    f"instance {item.sop_uid} is filed in that series"
                )
                study_pk = series[1]
                patient_pk = self._x(
                    db, "SELECT patient_pk FROM study WHERE pk = ?", (study_pk,)
                ).fetchone()[0]
                new_study = False

        instance_pk = self._insert(
            db,
            "instance",
            Level.IMAGE,
            v,
            {
                "series_pk": series_pk,
                "transfer_syntax": item.transfer_syntax,
                "size": item.size,
                "sha256": item.sha256,
                "stored_at": now,
                "source_ae": item.source_ae,
            },
        )
        for c in item.copies:
            self._insert_copy(db, instance_pk, c, ignore=False)
        for kind, key, payload in item.work:
            self._enqueue(db, kind, key, payload, now)

        self._x(
            db, "UPDATE series SET num_instances = num_instances + 1 WHERE pk = ?", (series_pk,)
        )
        study_row = self._x(
            db, "SELECT modalities, sop_classes FROM study WHERE pk = ?", (study_pk,)
        ).fetchone()
        modalities = _add_to_set(study_row[0], v.get("Modality", ""))
        if modalities != study_row[0]:
            self._x(
                db,
                "INSERT INTO study_modality (study_pk, modality) VALUES (?, ?) "
                "ON CONFLICT DO NOTHING",
                (study_pk, v["Modality"]),
            )
        sop_classes = _add_to_set(study_row[1], v.get("SOPClassUID", ""))
        self._x(
            db,
            "UPDATE study SET num_instances = num_instances + 1, num_series = num_series"
            " + ?, modalities = ?, sop_classes = ?, updated_at = ? WHERE pk = ?",
            (int(new_series), modalities, sop_classes, now, study_pk),
        )
        self._x(
            db,
            "UPDATE patient SET num_instances = num_instances + 1, num_series = "
            "num_series + ?, num_studies = num_studies + ? WHERE pk = ?",
            (int(new_series), int(new_study), patient_pk),
        )
        return AddResult("replaced" if row is not None else "stored", tuple(warnings))

    def _patient_pk(self, db: Any, v: dict[str, str]) -> int:
        pid = v.get("PatientID", "")
        key = (
            f"{pid}\x00{v.get('IssuerOfPatientID', '')}"
            if pid
            else f"\x00{pn_norm(v.get('PatientName', ''))}"
        )
        row = self._x(db, "SELECT pk FROM patient WHERE patient_key = ?", (key,)).fetchone()
        if row is not None:
            return int(row[0])
        return self._insert(db, "patient", Level.PATIENT, v, {"patient_key": key})

    def _insert(
        self, db: Any, table: str, level: Level, v: dict[str, str], extra: dict[str, Any]
    ) -> int:
        cols: dict[str, Any] = dict(extra)
        for a in ATTRIBUTES:
            if a.level is level:
                value = normalize_stored(a.vr, v.get(a.keyword, ""))
                cols[a.column] = value
                if a.vr == "PN":
                    cols[a.column + "_norm"] = pn_norm(value)
        names = ", ".join(cols)
        marks = ", ".join("?" * len(cols))
        cur = self._x(
            db, f"INSERT INTO {table} ({names}) VALUES ({marks}) RETURNING pk", list(cols.values())
        )
        return int(cur.fetchone()[0])

    def _insert_copy(self, db: Any, instance_pk: int, c: CopyRecord, *, ignore: bool) -> None:
        conflict = (
            "DO NOTHING"
            if ignore
            else (
                "DO UPDATE SET key = excluded.key, size = excluded.size, sha256 = excluded.sha256, "
                "stored_at = excluded.stored_at, state = excluded.state, "
                "verified_at = excluded.verified_at"
            )
        )
        self._x(
            db,
            "INSERT INTO copy (instance_pk, site, key, size, sha256, stored_at, state, "
            f"verified_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (instance_pk, site) "
            f"{conflict}",
            (instance_pk, c.site, c.key, c.size, c.sha256, c.stored_at, c.state, c.verified_at),
        )

    def _remove_instance(self, db: Any, instance_pk: int) -> None:
        """Drop an instance row (replace policy) and keep the counters right."""
        (series_pk,) = self._x(
            db, "SELECT series_pk FROM instance WHERE pk = ?", (instance_pk,)
        ).fetchone()
        (study_pk,) = self._x(
            db, "SELECT study_pk FROM series WHERE pk = ?", (series_pk,)
        ).fetchone()
        (patient_pk,) = self._x(
            db, "SELECT patient_pk FROM study WHERE pk = ?", (study_pk,)
        ).fetchone()
        self._x(db, "DELETE FROM copy WHERE instance_pk = ?", (instance_pk,))
        self._x(db, "DELETE FROM instance WHERE pk = ?", (instance_pk,))
        for table, pk in (("series", series_pk), ("study", study_pk), ("patient", patient_pk)):
            self._x(db, f"UPDATE {table} SET num_instances = num_instances - 1 WHERE pk = ?", (pk,))

    def record_copy(self, sop_uid: str, copy: CopyRecord) -> None:
        with self._tx() as db:
            row = self._x(db, "SELECT pk FROM instance WHERE sop_uid = ?", (sop_uid,)).fetchone()
            if row is not None:
                self._insert_copy(db, row[0], copy, ignore=False)

    def register_site(self, name: str) -> bool:
        with self._tx() as db:
            row = self._x(db, "SELECT name FROM site WHERE name = ?", (name,)).fetchone()
            if row is None:
                self._x(
                    db, "INSERT INTO site (name, registered_at) VALUES (?, ?)", (name, time.time())
                )
            return row is None

    def known_sites(self) -> set[str]:
        return {r[0] for r in self._all("SELECT name FROM site")}

    # ------------------------------------------------------------------ work queue
    def _enqueue(self, db: Any, kind: str, key: str, payload: str, now: float) -> int:
        cur = self._x(
            db,
            "INSERT INTO work (kind, key, payload, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, key) DO UPDATE SET "
            "state = 'pending', payload = excluded.payload, attempts = 0, not_before = 0, "
            "claimed_by = NULL, claimed_until = NULL, last_error = '', "
            "updated_at = excluded.updated_at WHERE work.state <> 'pending'",
            (kind, key, payload, now, now),
        )
        return max(0, int(cur.rowcount))

    def enqueue(self, kind: str, items: Sequence[tuple[str, str]]) -> int:
        now = time.time()
        with self._tx() as db:
            return sum(self._enqueue(db, kind, key, payload, now) for key, payload in items)

    # Appended to the claim subquery; PostgreSQL sets " FOR UPDATE SKIP LOCKED".
    CLAIM_LOCK = ""

    def claim(self, kind: str, owner: str, limit: int, lease: float) -> list[WorkItem]:
        now = time.time()
        with self._tx() as db:
            rows = self._x(
                db,
                "UPDATE work SET claimed_by = ?, claimed_until = ?, attempts = attempts + 1, "
                "updated_at = ? WHERE pk IN (SELECT pk FROM work WHERE kind = ? AND "
                "state = 'pending' AND not_before <= ? AND (claimed_until IS NULL OR "
                f"claimed_until < ?) ORDER BY pk LIMIT ?{self.CLAIM_LOCK}) "
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

    def fail(self, pk: int, error: str, retry_at: float | None) -> None:
        state = "failed" if retry_at is None else "pending"
        with self._tx() as db:
            self._x(
                db,
                "UPDATE work SET state = ?, not_before = ?, claimed_by = NULL, "
                "claimed_until = NULL, last_error = ?, updated_at = ? WHERE pk = ?",
                (state, retry_at or 0, error[:2000], time.time(), pk),
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

    # ------------------------------------------------------------------ web users
    def save_user(self, user: WebUser) -> None:
        with self._tx() as db:
            self._x(
                db,
                "INSERT INTO web_user (name, role, password_hash, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET role = excluded.role, "
                "password_hash = excluded.password_hash",
                (user.name, user.role, user.password_hash, time.time()),
            )

    def user(self, name: str) -> WebUser | None:
        r = self._one("SELECT name, role, password_hash FROM web_user WHERE name = ?", (name,))
        return None if r is None else WebUser(r[0], r[1], r[2])

    def users(self) -> list[WebUser]:
        rows = self._all("SELECT name, role, password_hash FROM web_user ORDER BY name")
        return [WebUser(r[0], r[1], r[2]) for r in rows]

    def remove_user(self, name: str) -> bool:
        with self._tx() as db:
            self._x(db, "DELETE FROM web_token WHERE user_name = ?", (name,))
            cur = self._x(db, "DELETE FROM web_user WHERE name = ?", (name,))
            return int(cur.rowcount) > 0

    def save_token(self, token_hash: str, user: str, label: str) -> None:
        with self._tx() as db:
            self._x(
                db,
                "INSERT INTO web_token (token_hash, user_name, label, created_at) "
                "VALUES (?, ?, ?, ?)",
                (token_hash, user, label, time.time()),
            )

    def token_user(self, token_hash: str) -> WebUser | None:
        r = self._one(
            "SELECT u.name, u.role, u.password_hash FROM web_token t JOIN web_user u "
            "ON t.user_name = u.name WHERE t.token_hash = ?",
            (token_hash,),
        )
        return None if r is None else WebUser(r[0], r[1], r[2])

    def copy_pages(self, after: int = 0, limit: int = 5000) -> list[tuple[int, str, str, str]]:
        rows = self._all(
            "SELECT i.pk, i.sop_uid, coalesce(c.site, ''), coalesce(c.key, '') FROM "
            "(SELECT pk, sop_uid FROM instance WHERE pk > ? ORDER BY pk LIMIT ?) i "
            "LEFT JOIN copy c ON c.instance_pk = i.pk ORDER BY i.pk, c.site",
            (after, int(limit)),
        )
        return [(int(r[0]), r[1], r[2], r[3]) for r in rows]

    # ------------------------------------------------------------------ reads
    def has_instance(self, sop_uid: str) -> bool:
        return self._one("SELECT 1 FROM instance WHERE sop_uid = ?", (sop_uid,)) is not None

    def _select(self, level: Level) -> tuple[list[str], list[str], str]:
        """(select expressions, keywords they produce, FROM clause) for a level."""
        exprs: list[str] = []
        keys: list[str] = []
        for a in ATTRIBUTES:
            if a.level.depth <= level.depth:
                exprs.append(f"{ALIAS[a.level]}.{a.column}")
                keys.append(a.keyword)
        counts = {
            Level.PATIENT: [
                ("p.num_studies", "NumberOfPatientRelatedStudies"),
                ("p.num_series", "NumberOfPatientRelatedSeries"),
                ("p.num_instances", "NumberOfPatientRelatedInstances"),
            ],
            Level.STUDY: [
                ("st.num_series", "NumberOfStudyRelatedSeries"),
                ("st.num_instances", "NumberOfStudyRelatedInstances"),
                ("st.modalities", "ModalitiesInStudy"),
                ("st.sop_classes", "SOPClassesInStudy"),
            ],
            Level.SERIES: [("se.num_instances", "NumberOfSeriesRelatedInstances")],
            Level.IMAGE: [
                ("i.transfer_syntax", "TransferSyntaxUID"),
                ("i.size", "_size"),
                ("i.sha256", "_sha256"),
                ("i.pk", "_pk"),
            ],
        }
        for lv in Level:
            if lv.depth <= level.depth:
                for expr, key in counts[lv]:
                    exprs.append(expr)
                    keys.append(key)
        return exprs, keys, JOINS[level]

    def _rows(self, query: Query) -> tuple[list[str], list[Any]]:
        exprs, keys, joins = self._select(query.level)
        where, params = compile_where(query, self.dialect)
        sql = f"SELECT {', '.join(exprs)} FROM {joins}"
        if where:
            sql += f" WHERE {where}"
        sql += f" ORDER BY {ALIAS[query.level]}.pk"
        if query.limit is not None:
            sql += f" LIMIT {int(query.limit)} OFFSET {int(query.offset)}"
        elif query.offset:
            sql += (
                f" LIMIT -1 OFFSET {int(query.offset)}"
                if self.dialect is SQLITE
                else f" OFFSET {int(query.offset)}"
            )
        return keys, self._all(sql, params)

    def find(self, query: Query) -> Iterator[dict[str, str]]:
        keys, rows = self._rows(query)
        for row in rows:
            out = {}
            for k, val in zip(keys, row, strict=True):
                if k.startswith("_"):
                    continue
                if k in ("ModalitiesInStudy", "SOPClassesInStudy"):
                    val = val.strip("\\")
                out[k] = "" if val is None else str(val)
            yield out

    def instances(self, query: Query) -> list[InstanceRecord]:
        q = Query(Level.IMAGE, query.matches, query.limit, query.offset)
        keys, rows = self._rows(q)
        records: list[tuple[int, dict[str, str], Any]] = []
        for row in rows:
            d = dict(zip(keys, row, strict=True))
            records.append((int(d["_pk"]), d, row))
        copies = self._copies([pk for pk, _, _ in records])
        out = []
        for pk, d, _ in records:
            attrs = {
                k: ("" if val is None else str(val))
                for k, val in d.items()
                if not k.startswith("_")
            }
            out.append(
                InstanceRecord(
                    sop_uid=attrs["SOPInstanceUID"],
                    study_uid=attrs["StudyInstanceUID"],
                    series_uid=attrs["SeriesInstanceUID"],
                    sop_class_uid=attrs["SOPClassUID"],
                    transfer_syntax=attrs["TransferSyntaxUID"],
                    size=int(d["_size"]),
                    sha256=str(d["_sha256"]),
                    attributes=attrs,
                    copies=tuple(copies.get(pk, ())),
                )
            )
        return out

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        from pacsgrid.index.query import Match

        found = self.instances(Query(Level.IMAGE, (Match("SOPInstanceUID", "single", (sop_uid,)),)))
        return found[0] if found else None

    def _copies(self, pks: list[int]) -> dict[int, list[CopyRecord]]:
        out: dict[int, list[CopyRecord]] = {}
        for start in range(0, len(pks), 500):
            chunk = pks[start : start + 500]
            if not chunk:
                break
            rows = self._all(
                "SELECT instance_pk, site, key, size, sha256, stored_at, state, verified_at "
                f"FROM copy WHERE instance_pk IN ({', '.join('?' * len(chunk))}) "
                "ORDER BY instance_pk, site",
                chunk,
            )
            for r in rows:
                out.setdefault(int(r[0]), []).append(
                    CopyRecord(
                        r[1],
                        r[2],
                        int(r[3]),
                        r[4],
                        float(r[5]),
                        r[6],
                        None if r[7] is None else float(r[7]),
                    )
                )
        return out

    def stats(self) -> IndexStats:
        counts = self._one(
            "SELECT (SELECT count(*) FROM patient), (SELECT count(*) FROM study), "
            "(SELECT count(*) FROM series), (SELECT count(*) FROM instance), "
            "(SELECT coalesce(sum(size), 0) FROM instance)"
        )
        sites = [
            SiteUsage(r[0], int(r[1]), int(r[2]), int(r[3]))
            for r in self._all(
                "SELECT site, count(*), coalesce(sum(size), 0), "
                "coalesce(sum(CASE WHEN state <> 'ok' THEN 1 ELSE 0 END), 0) "
                "FROM copy GROUP BY site ORDER BY site"
            )
        ]
        patients, studies, series, instances, size = (int(c) for c in counts)
        return IndexStats(patients, studies, series, instances, size, tuple(sites))


def _add_to_set(stored: str, value: str) -> str:
    """Add `value` to a set kept as '\\A\\B\\' (empty string for the empty set)."""
    if not value or f"\\{value}\\" in stored:
        return stored
    return (stored or "\\") + value + "\\"
