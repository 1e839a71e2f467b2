"""The Index logic both SQL engines share: schema shape, batch insert, find, locate, stats.

Queries are written once with `?` placeholders; an engine whose driver wants `%s` sets
`dialect = POSTGRES` and `_sql()` rewrites them. Engines supply connections, transactions and
the DDL type names; everything DICOM-specific lives here.

Filing instances into the hierarchy (its rules, and how a batch costs two round trips) is
in pacsgrid.index.filing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from pacsgrid.correction import PATIENT
from pacsgrid.errors import IndexUnavailable
from pacsgrid.index.base import (
    AddResult,
    IndexStats,
    NewInstance,
    SiteUsage,
)
from pacsgrid.index.corrections import CorrectionQueries
from pacsgrid.index.filing import COPY_UPSERT, FilingQueries, copy_row
from pacsgrid.index.ledger_queries import LedgerQueries
from pacsgrid.index.schema import MIGRATIONS, TRACKING_TABLE, Types
from pacsgrid.index.sites import SiteQueries
from pacsgrid.index.sql_matching import (
    ALIAS,
    SQLITE,
    Query,
    compile_where,
)
from pacsgrid.index.users import UserQueries
from pacsgrid.index.work import WorkQueries
from pacsgrid.model import ATTRIBUTES, CopyRecord, InstanceRecord, Level

JOINS = {
    Level.PATIENT: "patient p",
    Level.STUDY: "study st JOIN patient p ON st.patient_pk = p.pk",
    Level.SERIES: "series se JOIN study st ON se.study_pk = st.pk "
    "JOIN patient p ON st.patient_pk = p.pk",
    Level.IMAGE: "instance i JOIN series se ON i.series_pk = se.pk "
    "JOIN study st ON se.study_pk = st.pk JOIN patient p ON st.patient_pk = p.pk",
}


# What `find` answers, and a retrieve sends: entities with something visible, instances no
# rejection hides (see index/corrections.py).
VISIBLE = {
    Level.PATIENT: "p.num_instances > 0",
    Level.STUDY: "st.num_instances > 0",
    Level.SERIES: "se.num_instances > 0",
    Level.IMAGE: "NOT EXISTS (SELECT 1 FROM hidden_instance h WHERE h.sop_uid = i.sop_uid)",
}


# The index's totals from the counters filing keeps (no instance is read), and usage per site
# from the copies' (site, state, size) index alone (schema: 0006_totals).
STATS_COUNTS = (
    "SELECT (SELECT count(*) FROM patient), (SELECT count(*) FROM study), "
    "(SELECT count(*) FROM series), (SELECT coalesce(sum(num_instances), 0) FROM series) + "
    # num_instances counts what is visible: add the instances a rejection hides.
    "(SELECT count(*) FROM instance WHERE sop_uid IN (SELECT sop_uid FROM hidden_instance)), "
    "(SELECT coalesce(sum(size), 0) FROM series)"
)
SITE_USAGE = (
    "SELECT site, count(*), coalesce(sum(size), 0), "
    "coalesce(sum(CASE WHEN state <> 'ok' THEN 1 ELSE 0 END), 0) "
    "FROM copy GROUP BY site ORDER BY site"
)


class SqlIndex(
    FilingQueries, WorkQueries, SiteQueries, LedgerQueries, UserQueries, CorrectionQueries
):
    """Shared implementation; engines provide `_all`, `_one` and `_tx` (see SqlBase).

    Here: queries (find, instances, stats). In the mixins: filing instances (add_batch,
    index/filing.py), the work queue (index/work.py), copies on sites (index/sites.py),
    migration ledgers (index/ledger_queries.py), web users (index/users.py), corrections
    (index/corrections.py)."""

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
    concurrent_batches = 1
    gather_seconds = 0.0

    def add_batch(self, items: Sequence[NewInstance], *, durable: bool = True) -> list[AddResult]:
        with self._tx(durable=durable) as db:
            return self._file(db, items)

    def _recount_hidden(self, db: Any, studies: set[int], patients: set[int]) -> None:
        self._recount(db, studies, patients)  # an arriving instance a rejection note hid

    def sync(self) -> None:
        with self._tx(durable=True) as db:
            self._x(db, "UPDATE checkpoint_mark SET at = ? WHERE id = 1", (time.time(),))

    def record_copy(self, sop_uid: str, copy: CopyRecord) -> None:
        with self._tx() as db:
            row = self._x(db, "SELECT pk FROM instance WHERE sop_uid = ?", (sop_uid,)).fetchone()
            if row is not None:
                self._x(db, COPY_UPSERT, copy_row(row[0], copy))

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

    def _rows(
        self, query: Query, *, visible: bool = False, corrected: bool = False
    ) -> tuple[list[str], list[Any]]:
        """`visible`: only what a query answers and a retrieve sends; `corrected` (instances):
        also whether their study is corrected (`_corrected`)."""
        exprs, keys, joins = self._select(query.level)
        where, params = compile_where(query, self.dialect)
        conds = [where] if where else []
        if visible:
            conds.append(VISIBLE[query.level])
        if corrected:
            joins += " LEFT JOIN corrected_study cs ON cs.study_pk = st.pk"
            exprs.append("cs.study_pk")
            keys.append("_corrected")
        sql = f"SELECT {', '.join(exprs)} FROM {joins}"
        if conds:
            sql += f" WHERE {' AND '.join(conds)}"
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
        keys, rows = self._rows(query, visible=True)
        for row in rows:
            out = {}
            for k, val in zip(keys, row, strict=True):
                if k.startswith("_"):
                    continue
                if k in ("ModalitiesInStudy", "SOPClassesInStudy"):
                    val = val.strip("\\")
                out[k] = "" if val is None else str(val)
            yield out

    def instances(self, query: Query, *, visible: bool = False) -> list[InstanceRecord]:
        q = Query(Level.IMAGE, query.matches, query.limit, query.offset)
        keys, rows = self._rows(q, visible=visible, corrected=visible)
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
                    corrections=(
                        {k: attrs[k] for k in PATIENT} if d.get("_corrected") is not None else {}
                    ),
                )
            )
        return out

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        from pacsgrid.index.sql_matching import Match

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
        counts = self._one(STATS_COUNTS)
        sites = [SiteUsage(r[0], int(r[1]), int(r[2]), int(r[3])) for r in self._all(SITE_USAGE)]
        patients, studies, series, instances, size = (int(c) for c in counts)
        return IndexStats(patients, studies, series, instances, size, tuple(sites))
