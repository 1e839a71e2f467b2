"""Filing a batch of instances into the index: patients, studies, series, instances, their
copies and the work queued with them (a mixin of SqlIndex).

Hierarchy rules (real-world untidiness is stored, never refused):
- a study belongs to the patient it was first stored under; a later instance of the same
  study with another PatientID is filed in that study, with a warning;
- likewise a series stays in the study it was first stored in.
Patient, study and series attributes are those of the first instance stored. An instance
already indexed is a duplicate (a copy of it with the same bytes is recorded) or, with
`replace`, is removed and filed anew.

Why batches are filed set-wise: one instance at a time costs about ten statements, and on
PostgreSQL each is a round trip. Here a batch costs two steps, whatever its size:
1. the lookups: one set of queries for everything the batch refers to (its instances,
   studies, series and patients) plus fresh primary keys for the rows it may add;
2. `Planner` decides, item by item in batch order, what filing them one at a time would do,
   and returns the writes: per kind of row, one statement run for many rows (deletes of
   replaced instances, inserts, one counter update per existing row touched).
PostgreSQL sends each step as one round trip (pipeline mode), the second with the COMMIT;
SQLite runs the same statements in-process.

An item whose SOP Instance UID appeared earlier in the same batch (one object stored twice
at the same moment) starts a new round of both steps, so that within a round every instance
is filed at most once and each round sees the rounds before it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pacsgrid.index.changes import Change, Delete, Insert, Rows, Update
from pacsgrid.index.records import AddResult, NewInstance
from pacsgrid.index.sql_base import SqlBase, marks
from pacsgrid.index.work import ENQUEUE_CONFLICT, WORK_COLUMNS
from pacsgrid.matching import normalize_stored, pn_norm
from pacsgrid.model import ATTRIBUTES, CopyRecord, Level

ROUND_MAX = 500  # instances per round: bounds the IN lists of the lookups
# (column, values) -> an SQL condition "column is one of values" and its parameters.
WhereIn = Callable[[str, Sequence[str]], tuple[str, list[Any]]]

COPY_COLUMNS = ("instance_pk", "site", "key", "size", "sha256", "stored_at", "state", "verified_at")
# A copy as ingest records it: a new one, or one that replaces the copy on the same site.
COPY_CONFLICT = (
    "ON CONFLICT (instance_pk, site) DO UPDATE SET key = excluded.key, size = excluded.size, "
    "sha256 = excluded.sha256, stored_at = excluded.stored_at, state = excluded.state, "
    "verified_at = excluded.verified_at"
)
NOTHING = "ON CONFLICT DO NOTHING"
COPY_UPSERT = Insert("copy", COPY_COLUMNS, [], COPY_CONFLICT).statement()


def copy_row(instance_pk: int, c: CopyRecord) -> tuple[Any, ...]:
    return (instance_pk, c.site, c.key, c.size, c.sha256, c.stored_at, c.state, c.verified_at)


def patient_key(v: dict[str, str]) -> str:
    """What makes two instances the same patient: PatientID and its issuer, or, without a
    PatientID, the normalised name."""
    pid = v.get("PatientID", "")
    if pid:
        return f"{pid}\x00{v.get('IssuerOfPatientID', '')}"
    return f"\x00{pn_norm(v.get('PatientName', ''))}"


def add_to_set(stored: str, value: str) -> str:
    """Add `value` to a set kept as '\\A\\B\\' (empty string for the empty set)."""
    if not value or f"\\{value}\\" in stored:
        return stored
    return (stored or "\\") + value + "\\"


def attribute_columns(level: Level) -> list[str]:
    """The columns of `level`'s attributes (with the upper-cased twin of each PN one)."""
    out = []
    for a in ATTRIBUTES:
        if a.level is level:
            out.append(a.column)
            if a.vr == "PN":
                out.append(a.column + "_norm")
    return out


def attribute_values(level: Level, v: dict[str, str]) -> list[str]:
    out = []
    for a in ATTRIBUTES:
        if a.level is level:
            value = normalize_stored(a.vr, v.get(a.keyword, ""))
            out.append(value)
            if a.vr == "PN":
                out.append(pn_norm(value))
    return out


# Columns of the rows a batch inserts: (leading, attributes of the level, trailing).
_LEAD = {
    "patient": ["pk", "patient_key"],
    "study": ["pk", "patient_pk"],
    "series": ["pk", "study_pk"],
    "instance": ["pk", "series_pk"],
}
_TRAIL = {
    "patient": ["num_studies", "num_series", "num_instances"],
    "study": ["modalities", "sop_classes", "num_series", "num_instances", "updated_at"],
    "series": ["num_instances", "size"],
    "instance": ["transfer_syntax", "size", "sha256", "stored_at", "source_ae"],
}
_LEVEL = {
    "patient": Level.PATIENT,
    "study": Level.STUDY,
    "series": Level.SERIES,
    "instance": Level.IMAGE,
}
TABLES = ("patient", "study", "series", "instance")  # parents first


COLUMNS = {t: (*_LEAD[t], *attribute_columns(_LEVEL[t]), *_TRAIL[t]) for t in TABLES}
_PATIENT_ID = 2 + attribute_columns(Level.PATIENT).index("patient_id")  # in a patient row


# ---------------------------------------------------------------- what the lookups found


@dataclass
class _Node:
    """A patient, study or series the round files into: indexed already, or a new row."""

    pk: int
    parent: int = 0  # study: its patient; series: its study
    patient_id: str = ""  # patient, study: the PatientID stored with the patient
    modalities: str = ""  # study
    sop_classes: str = ""  # study
    row: list[Any] | None = None  # a new row: its columns (counters filled in at the end)
    filed: bool = False  # study: an instance was filed in it


@dataclass(frozen=True)
class _Indexed:
    """An instance indexed before the round, with the rows above it."""

    pk: int
    sha256: str
    series_pk: int
    study_pk: int
    patient_pk: int
    size: int


class Lookups:
    """The queries of step 1 for one round, and what their rows mean.

    `key` is the engine's form of a text value (PostgreSQL stores NUL as U+241E), so that
    values of the batch and values read back compare equal."""

    def __init__(self, items: Sequence[NewInstance], key: Callable[[str], str]) -> None:
        self.key = key
        self.sops = list(dict.fromkeys(key(i.sop_uid) for i in items))
        self.studies = list(dict.fromkeys(key(i.values["StudyInstanceUID"]) for i in items))
        self.series = list(dict.fromkeys(key(i.values["SeriesInstanceUID"]) for i in items))
        self.patients = list(dict.fromkeys(key(patient_key(i.values)) for i in items))

    def queries(self, lock: str, where_in: WhereIn) -> list[tuple[str, list[Any]]]:
        """Instances, series, studies (those of the batch and those its series are in;
        `lock` makes concurrent writers to a study take turns), patients. Each column
        name appears once per query (PostgreSQL returns rows as JSON objects)."""
        sop_in, sops = where_in("i.sop_uid", self.sops)
        series_in, series = where_in("series_uid", self.series)
        study_in, studies = where_in("study_uid", self.studies)
        patient_in, patients = where_in("patient_key", self.patients)
        hidden_in, hidden = where_in("sop_uid", self.sops)
        return [
            (
                "SELECT i.pk, i.sop_uid, i.sha256, i.series_pk, se.study_pk, st.patient_pk, i.size "
                "FROM instance i JOIN series se ON se.pk = i.series_pk "
                f"JOIN study st ON st.pk = se.study_pk WHERE {sop_in}",
                sops,
            ),
            (f"SELECT pk, series_uid, study_pk FROM series WHERE {series_in}", series),
            (
                "SELECT st.pk, st.study_uid, st.patient_pk, p.patient_id, st.modalities, "
                "st.sop_classes FROM study st JOIN patient p ON p.pk = st.patient_pk "
                f"WHERE st.pk IN (SELECT pk FROM study WHERE {study_in} UNION "
                f"SELECT study_pk FROM series WHERE {series_in}) ORDER BY st.pk{lock}",
                [*studies, *series],
            ),
            (f"SELECT pk, patient_key, patient_id FROM patient WHERE {patient_in}", patients),
            # Instances a rejection note hid before they arrived (index/corrections.py).
            (f"SELECT sop_uid FROM hidden_instance WHERE {hidden_in}", hidden),
        ]

    def new_rows_at_most(self) -> dict[str, int]:
        """How many rows of each table the round may add (primary keys to reserve)."""
        return {
            "patient": len(self.patients),
            "study": len(self.studies),
            "series": len(self.series),
            "instance": len(self.sops),
        }


# ---------------------------------------------------------------- step 2: the plan


class Planner:
    """Files the items of one round in memory, in order, and turns the outcome into writes.

    `found`: the rows of `Lookups.queries`, in that order; `fresh`: reserved primary keys
    by table."""

    def __init__(
        self,
        found: list[list[Any]],
        fresh: dict[str, Iterator[int]],
        key: Callable[[str], str],
    ) -> None:
        self.fresh = fresh
        self.key = key
        self.now = time.time()
        inst, series, studies, patients, hidden = found
        self.hidden = {key(r[0]) for r in hidden}
        # Studies and patients to count again: an instance filed into them stays hidden.
        self.recount: tuple[set[int], set[int]] = (set(), set())
        self.indexed = {
            key(r[1]): _Indexed(int(r[0]), r[2], r[3], r[4], r[5], int(r[6])) for r in inst
        }
        self.series = {key(r[1]): _Node(int(r[0]), parent=int(r[2])) for r in series}
        self.studies: dict[str, _Node] = {}
        self.study_pk: dict[int, _Node] = {}
        for r in studies:
            node = _Node(int(r[0]), int(r[2]), r[3], r[4], r[5])
            self.studies[key(r[1])] = self.study_pk[node.pk] = node
        self.patients = {key(r[1]): _Node(int(r[0]), patient_id=r[2]) for r in patients}
        self.new: dict[str, list[_Node]] = defaultdict(list)  # new rows by table
        self.instances: Rows = []
        # Counter changes by (table, pk): instances, series, studies, bytes (series only).
        self.counts: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.removed: Rows = []
        self.copies: dict[tuple[int, str], Sequence[Any]] = {}  # the last one of a site wins
        self.copies_if_absent: Rows = []
        self.modalities: Rows = []
        self.work: Rows = []

    def file(self, item: NewInstance) -> AddResult:
        v = item.values
        old = self.indexed.get(self.key(item.sop_uid))
        if old is not None:
            if not item.replace:
                for c in item.copies:
                    if c.sha256 == old.sha256:
                        self.copies_if_absent.append(copy_row(old.pk, c))
                return AddResult("duplicate", existing_sha256=old.sha256)
            self.removed.append((old.pk,))
            for table, pk in (
                ("series", old.series_pk),
                ("study", old.study_pk),
                ("patient", old.patient_pk),
            ):
                self.counts[(table, pk)][0] -= 1
            self.counts[("series", old.series_pk)][3] -= old.size
        warnings: list[str] = []

        study = self.studies.get(self.key(v["StudyInstanceUID"]))
        new_study = study is None
        if study is None:
            patient = self._patient(v)
            study = self._add("study", v, parent=patient.pk, patient_id=patient.patient_id)
            self.studies[self.key(v["StudyInstanceUID"])] = self.study_pk[study.pk] = study
        elif study.patient_id != v.get("PatientID", ""):
            # No PatientID values here: warnings reach the ordinary log.
            warnings.append(
                f"study {v['StudyInstanceUID']} is stored under another PatientID than "
                f"instance {item.sop_uid} gives; the instance is filed in the existing study"
            )

        series = self.series.get(self.key(v["SeriesInstanceUID"]))
        new_series = series is None
        if series is None:
            series = self._add("series", v, parent=study.pk)
            self.series[self.key(v["SeriesInstanceUID"])] = series
        elif series.parent != study.pk:
            warnings.append(
                f"series {v['SeriesInstanceUID']} belongs to another study; "
                f"instance {item.sop_uid} is filed in that series"
            )
            study = self.study_pk[series.parent]
            new_study = False

        pk = next(self.fresh["instance"])
        self.instances.append(
            [
                pk,
                series.pk,
                *attribute_values(Level.IMAGE, v),
                item.transfer_syntax,
                item.size,
                item.sha256,
                self.now,
                item.source_ae,
            ]
        )
        for c in item.copies:
            self.copies[(pk, c.site)] = copy_row(pk, c)
        self.work += [(kind, k, payload, self.now, self.now) for kind, k, payload in item.work]

        modalities = add_to_set(study.modalities, v.get("Modality", ""))
        if modalities != study.modalities:
            self.modalities.append((study.pk, v["Modality"]))
        study.modalities = modalities
        study.sop_classes = add_to_set(study.sop_classes, v.get("SOPClassUID", ""))
        study.filed = True
        if self.key(item.sop_uid) in self.hidden:
            self.recount[0].add(study.pk)
            self.recount[1].add(study.parent)
        self._count("series", series.pk, 1, size=item.size)
        self._count("study", study.pk, 1, int(new_series))
        self._count("patient", study.parent, 1, int(new_series), int(new_study))
        return AddResult("replaced" if old is not None else "stored", tuple(warnings))

    def _patient(self, v: dict[str, str]) -> _Node:
        k = self.key(patient_key(v))
        node = self.patients.get(k)
        if node is None:
            node = self.patients[k] = self._add("patient", v, key=patient_key(v))
            assert node.row is not None
            node.patient_id = node.row[_PATIENT_ID]
        return node

    def _add(
        self, table: str, v: dict[str, str], *, parent: int = 0, patient_id: str = "", key: str = ""
    ) -> _Node:
        """A new row of `table` (its leading column: the patient key, or the parent)."""
        pk = next(self.fresh[table])
        lead: Any = key if table == "patient" else parent
        node = _Node(pk, parent, patient_id, row=[pk, lead, *attribute_values(_LEVEL[table], v)])
        self.new[table].append(node)
        return node

    def _count(
        self,
        table: str,
        pk: int,
        instances: int,
        series: int = 0,
        studies: int = 0,
        size: int = 0,
    ) -> None:
        c = self.counts[(table, pk)]
        c[0] += instances
        c[1] += series
        c[2] += studies
        c[3] += size

    # ------------------------------------------------------------------ the writes
    def writes(self) -> list[Change]:
        """The changes in the order they may run one after the other: replaced instances
        out, new rows parents first, copies, ModalitiesInStudy rows, work, then the
        counters of rows that existed (in primary key order: concurrent writers lock rows
        in one order). Changes without rows are left out."""
        removed = self.removed
        out: list[Change] = [
            Delete("copy", "instance_pk", removed),
            Delete("instance", "pk", removed),
        ]
        new_pks: set[tuple[str, int]] = set()
        for table in ("patient", "study", "series"):
            rows: Rows = []
            for node in self.new[table]:
                new_pks.add((table, node.pk))
                rows.append([*(node.row or ()), *self._trailer(table, node)])
            out.append(Insert(table, COLUMNS[table], rows))
        out += [
            Insert("instance", COLUMNS["instance"], self.instances),
            Insert("copy", COPY_COLUMNS, list(self.copies.values()), COPY_CONFLICT),
            Insert(
                "copy", COPY_COLUMNS, _first(self.copies_if_absent, 2), "ON CONFLICT DO NOTHING"
            ),
            Insert(
                "study_modality",
                ("study_pk", "modality"),
                self.modalities,
                "ON CONFLICT DO NOTHING",
            ),
            Insert("work", WORK_COLUMNS, _first(self.work, 2), ENQUEUE_CONFLICT),
        ]
        series_rows: Rows = []
        study_rows: Rows = []
        filed_rows: Rows = []
        patient_rows: Rows = []
        for (table, pk), (n_inst, n_series, n_studies, n_bytes) in sorted(self.counts.items()):
            if (table, pk) in new_pks:
                continue
            if table == "series" and (n_inst or n_bytes):
                series_rows.append((n_inst, n_bytes, pk))
            elif table == "study":
                filed = self.study_pk.get(pk)
                if filed is not None and filed.filed:
                    filed_rows.append(
                        (n_inst, n_series, filed.modalities, filed.sop_classes, self.now, pk)
                    )
                elif n_inst or n_series:
                    study_rows.append((n_inst, n_series, pk))
            elif table == "patient" and (n_inst or n_series or n_studies):
                patient_rows.append((n_inst, n_series, n_studies, pk))
        out += [
            Update("series", ("num_instances", "size"), (), series_rows),
            Update(
                "study",
                ("num_instances", "num_series"),
                ("modalities", "sop_classes", "updated_at"),
                filed_rows,
            ),
            Update("study", ("num_instances", "num_series"), (), study_rows),
            Update("patient", ("num_instances", "num_series", "num_studies"), (), patient_rows),
        ]
        return [c for c in out if c.rows]

    def _trailer(self, table: str, node: _Node) -> list[Any]:
        n_inst, n_series, n_studies, n_bytes = self.counts.get((table, node.pk), (0, 0, 0, 0))
        if table == "patient":
            return [n_studies, n_series, n_inst]
        if table == "study":
            return [node.modalities, node.sop_classes, n_series, n_inst, self.now]
        return [n_inst, n_bytes]


# ---------------------------------------------------------------- the mixin


def _first(rows: Rows, width: int) -> Rows:
    """`rows` without those whose first `width` values came earlier (one statement may
    not write a row twice; filed one at a time, the first of them decides)."""
    seen: dict[tuple[Any, ...], Sequence[Any]] = {}
    for row in rows:
        seen.setdefault(tuple(row[:width]), row)
    return list(seen.values())


def rounds(items: Sequence[NewInstance], key: Callable[[str], str]) -> Iterator[list[NewInstance]]:
    """The batch cut where a SOP Instance UID comes again (and every ROUND_MAX items)."""
    current: list[NewInstance] = []
    seen: set[str] = set()
    for item in items:
        sop = key(item.sop_uid)
        if sop in seen or len(current) >= ROUND_MAX:
            yield current
            current, seen = [], set()
        current.append(item)
        seen.add(sop)
    if current:
        yield current


class FilingQueries(SqlBase):
    def _file(self, db: Any, items: Sequence[NewInstance]) -> list[AddResult]:
        """File `items` in the open transaction `db` (see the module docstring)."""
        results: list[AddResult] = []
        for batch in rounds(items, self._text_key):
            lookups = Lookups(batch, self._text_key)
            found, fresh = self._look_up(db, lookups)
            plan = Planner(found, {t: iter(pks) for t, pks in fresh.items()}, self._text_key)
            results += [plan.file(item) for item in batch]
            self._write(db, plan.writes())
            if plan.recount[0]:
                self._recount_hidden(db, *plan.recount)
        return results

    def _recount_hidden(self, db: Any, studies: set[int], patients: set[int]) -> None:
        """Count `studies` and `patients` again from their visible instances: instances a
        rejection note named before they arrived were filed into them (SqlIndex)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ engine hooks
    STUDY_LOCK = ""  # see PostgresIndex

    def _text_key(self, value: str) -> str:
        """A text value as the engine stores it (identity; PostgreSQL maps NUL)."""
        return value

    def _where_in(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        return f"{column} IN ({marks(len(values))})", list(values)

    def _look_up(self, db: Any, lookups: Lookups) -> tuple[list[list[Any]], dict[str, list[int]]]:
        """Step 1: the rows of `lookups.queries`, and fresh primary keys by table. SQLite:
        query by query in-process; new keys follow the largest one (the write transaction
        holds the database lock)."""
        found = [
            self._x(db, sql, params).fetchall()
            for sql, params in lookups.queries(self.STUDY_LOCK, self._where_in)
        ]
        fresh = {}
        for table, n in lookups.new_rows_at_most().items():
            (top,) = self._x(db, f"SELECT coalesce(max(pk), 0) FROM {table}").fetchone()
            fresh[table] = list(range(int(top) + 1, int(top) + n + 1))
        return found, fresh

    def _write(self, db: Any, changes: Sequence[Change]) -> None:
        """Step 2: each change, one row at a time (SQLite: in-process, nothing to save)."""
        for c in changes:
            db.executemany(self._sql(c.statement()), c.rows)
