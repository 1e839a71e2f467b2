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
from pacsgrid.index.ledger_queries import LedgerQueries
from pacsgrid.index.schema import MIGRATIONS, TRACKING_TABLE, Types
from pacsgrid.index.sites import SiteQueries
from pacsgrid.index.sql_matching import (
    ALIAS,
    SQLITE,
    Query,
    compile_where,
    normalize_stored,
    pn_norm,
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


class SqlIndex(WorkQueries, SiteQueries, LedgerQueries, UserQueries, CorrectionQueries):
    """Shared implementation; engines provide `_all`, `_one` and `_tx` (see SqlBase).

    Here: filing instances (add_batch), queries (find, instances, stats). In the mixins: the
    work queue (index/work.py), copies on sites (index/sites.py), migration ledgers
    (index/ledger_queries.py), web users (index/users.py), corrections (index/corrections.py)."""

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
    def add_batch(self, items: Sequence[NewInstance], *, durable: bool = True) -> list[AddResult]:
        with self._tx(durable=durable) as db:
            return [self._add_one(db, item) for item in items]

    def sync(self) -> None:
        with self._tx(durable=True) as db:
            self._x(db, "UPDATE checkpoint_mark SET at = ? WHERE id = 1", (time.time(),))

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
        self._hidden_on_arrival(db, item.sop_uid, study_pk, patient_pk)
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
