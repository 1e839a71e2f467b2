"""Corrections in the index (a mixin of SqlIndex; see pacsgrid.correction).

The index answers with the corrected state: a correction rewrites the derived rows (which
patient row a study belongs to, that row's attributes, which instances are hidden, the counts),
never an object. What the objects carry stays known (`corrected_study.original`), so that a
retrieve sends corrected values only for studies that need them, and an undo returns a study to
"as stored". `apply_correction` is one transaction, and replaying the same documents in the
same order gives the same rows (that is how `reindex` restores them).

Counts follow what is visible: a hidden instance is not counted, a series or study with no
visible instance is not counted either, and `find` leaves out what has nothing visible.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from pacsgrid.correction import PATIENT, Assign, Correction, patient_key, patient_values
from pacsgrid.index.sql_base import SqlBase, marks
from pacsgrid.index.sql_matching import normalize_stored, pn_norm

_NOT_HIDDEN = "NOT EXISTS (SELECT 1 FROM hidden_instance h WHERE h.sop_uid = i.sop_uid)"
_PATIENT_COLUMNS = ("patient_id", "issuer", "patient_name", "birth_date", "sex")


@dataclass(frozen=True, slots=True)
class CorrectionRow:
    seq: int
    kind: str
    state: str  # pending | applied
    doc: Correction
    undone_by: int | None
    missing: tuple[str, ...]  # archive sites that do not hold the document yet
    created_at: float


@dataclass(frozen=True, slots=True)
class HiddenInstance:
    sop_uid: str
    by: int  # the correction (a rejection note) that hides it
    study_uid: str
    series_uid: str  # '' when the instance has not arrived
    sop_class_uid: str
    stored: bool  # whether the archive holds the instance


class CorrectionQueries(SqlBase):
    # ------------------------------------------------------------------ engine hook
    def corrections_lock(self) -> AbstractContextManager[None]:
        """Held while a correction is made: one at a time across every process and node, so
        the order of `seq` is the order in which corrections were applied."""
        raise NotImplementedError

    # ------------------------------------------------------------------ writing
    def next_correction_seq(self) -> int:
        row = self._one("SELECT coalesce(max(seq), 0) FROM correction")
        return int(row[0]) + 1

    def add_pending_correction(self, c: Correction) -> None:
        """Record `c` before its document goes to the sites: a crash between the two leaves
        it `pending`, and whoever next holds the lock finishes it (roll forward)."""
        with self._tx() as db:
            self._x(
                db,
                "INSERT INTO correction (seq, kind, state, doc, source, undoes, created_at) "
                "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                (c.seq, c.kind, c.to_json().decode(), c.source, c.undoes, time.time()),
            )

    def pending_corrections(self) -> list[Correction]:
        rows = self._all("SELECT doc FROM correction WHERE state = 'pending' ORDER BY seq")
        return [Correction.from_json(r[0]) for r in rows]

    def apply_correction(self, c: Correction, missing: Sequence[str] = ()) -> bool:
        """Apply `c` in one transaction (False if it was applied already)."""
        with self._tx() as db:
            row = self._x(db, "SELECT state FROM correction WHERE seq = ?", (c.seq,)).fetchone()
            if row is not None and row[0] == "applied":
                return False
            now = time.time()
            if row is None:
                self._x(
                    db,
                    "INSERT INTO correction (seq, kind, state, doc, source, undoes, missing, "
                    "created_at, applied_at) VALUES (?, ?, 'applied', ?, ?, ?, ?, ?, ?)",
                    (
                        c.seq,
                        c.kind,
                        c.to_json().decode(),
                        c.source,
                        c.undoes,
                        ",".join(missing),
                        now,
                        now,
                    ),
                )
            else:
                self._x(
                    db,
                    "UPDATE correction SET state = 'applied', applied_at = ?, missing = ? "
                    "WHERE seq = ?",
                    (now, ",".join(missing), c.seq),
                )
            if c.undoes:
                self._x(db, "UPDATE correction SET undone_by = ? WHERE seq = ?", (c.seq, c.undoes))
            for subject in sorted(c.subjects()):
                self._x(
                    db,
                    "INSERT INTO correction_subject (subject, seq) VALUES (?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (subject, c.seq),
                )
            if c.source:
                self._x(
                    db,
                    "INSERT INTO correction_source (source, seq, outcome, at) VALUES "
                    "(?, ?, 'applied', ?) ON CONFLICT (source) DO UPDATE SET seq = excluded.seq, "
                    "outcome = excluded.outcome, at = excluded.at",
                    (c.source, c.seq, now),
                )
            studies: set[int] = set()
            patients: set[int] = set()
            for a in c.assign:
                patients |= self._assign(db, a)
            for m in c.hide:
                self._x(
                    db,
                    "INSERT INTO hidden_instance (sop_uid, seq, study_uid) VALUES (?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (m.sop, m.by, m.study),
                )
            for m in c.show:
                self._x(
                    db, "DELETE FROM hidden_instance WHERE sop_uid = ? AND seq = ?", (m.sop, m.by)
                )
            sops = [m.sop for m in (*c.hide, *c.show, *c.purge)]
            for start in range(0, len(sops), 500):
                chunk = sops[start : start + 500]
                for st_pk, p_pk in self._x(
                    db,
                    "SELECT DISTINCT st.pk, st.patient_pk FROM instance i JOIN series se ON "
                    "i.series_pk = se.pk JOIN study st ON se.study_pk = st.pk "
                    f"WHERE i.sop_uid IN ({marks(len(chunk))})",
                    chunk,
                ).fetchall():
                    studies.add(int(st_pk))
                    patients.add(int(p_pk))
            for m in c.purge:  # the objects are gone from every site: so are their rows
                row = self._x(db, "SELECT pk FROM instance WHERE sop_uid = ?", (m.sop,)).fetchone()
                if row is not None:
                    self._x(db, "DELETE FROM copy WHERE instance_pk = ?", (row[0],))
                    self._x(db, "DELETE FROM instance WHERE pk = ?", (row[0],))
            self._recount(db, studies, patients)
            return True

    def _assign(self, db: Any, a: Assign) -> set[int]:
        """Studies of `a` to the patient row of its values; the patient rows touched."""
        values = patient_values(a.patient)
        key = patient_key(values)
        cols = _patient_columns(values)
        row = self._x(
            db,
            f"SELECT pk, {', '.join(_PATIENT_COLUMNS)} FROM patient WHERE patient_key = ?",
            (key,),
        ).fetchone()
        if row is None:
            names = ["patient_key", *cols]
            target = int(
                self._x(
                    db,
                    f"INSERT INTO patient ({', '.join(names)}) VALUES ({marks(len(names))}) "
                    "RETURNING pk",
                    [key, *cols.values()],
                ).fetchone()[0]
            )
        else:
            target = int(row[0])
            if tuple(row[1:]) != tuple(cols[c] for c in _PATIENT_COLUMNS):
                sets = ", ".join(f"{c} = ?" for c in cols)
                self._x(db, f"UPDATE patient SET {sets} WHERE pk = ?", [*cols.values(), target])
        touched = {target}
        for move in a.studies:
            st = self._x(
                db, "SELECT pk, patient_pk FROM study WHERE study_uid = ?", (move.study,)
            ).fetchone()
            if st is None:
                continue  # not indexed (a reindex of part of the sites): nothing to move
            study_pk = int(st[0])
            touched.add(int(st[1]))
            kept = self._x(
                db, "SELECT original FROM corrected_study WHERE study_pk = ?", (study_pk,)
            ).fetchone()
            original = patient_values(json.loads(kept[0])) if kept else patient_values(move.before)
            if kept is None:
                self._x(
                    db,
                    "INSERT INTO corrected_study (study_pk, original) VALUES (?, ?)",
                    (study_pk, json.dumps(original, sort_keys=True)),
                )
            self._x(db, "UPDATE study SET patient_pk = ? WHERE pk = ?", (target, study_pk))
            if _same(original, values):
                self._x(db, "DELETE FROM corrected_study WHERE study_pk = ?", (study_pk,))
        return touched

    def _recount(self, db: Any, studies: set[int], patients: set[int]) -> None:
        """Counts, modalities and SOP classes of `studies` from their visible instances (in
        the order the instances arrived, as ingest builds them), then of their patients."""
        for study_pk in sorted(studies):
            self._x(
                db,
                "UPDATE series SET num_instances = (SELECT count(*) FROM instance i WHERE "
                f"i.series_pk = series.pk AND {_NOT_HIDDEN}) WHERE study_pk = ?",
                (study_pk,),
            )
            n_series, n_instances = self._x(
                db,
                "SELECT count(*), coalesce(sum(num_instances), 0) FROM series "
                "WHERE study_pk = ? AND num_instances > 0",
                (study_pk,),
            ).fetchone()
            modalities = [
                r[0]
                for r in self._x(
                    db,
                    "SELECT se.modality, min(i.pk) FROM series se JOIN instance i ON "
                    f"i.series_pk = se.pk WHERE se.study_pk = ? AND se.modality <> '' AND "
                    f"{_NOT_HIDDEN} GROUP BY se.modality ORDER BY 2",
                    (study_pk,),
                ).fetchall()
            ]
            classes = [
                r[0]
                for r in self._x(
                    db,
                    "SELECT i.sop_class_uid, min(i.pk) FROM series se JOIN instance i ON "
                    f"i.series_pk = se.pk WHERE se.study_pk = ? AND i.sop_class_uid <> '' AND "
                    f"{_NOT_HIDDEN} GROUP BY i.sop_class_uid ORDER BY 2",
                    (study_pk,),
                ).fetchall()
            ]
            self._x(
                db,
                "UPDATE study SET num_series = ?, num_instances = ?, modalities = ?, "
                "sop_classes = ? WHERE pk = ?",
                (int(n_series), int(n_instances), _as_set(modalities), _as_set(classes), study_pk),
            )
            self._x(db, "DELETE FROM study_modality WHERE study_pk = ?", (study_pk,))
            for m in modalities:
                self._x(
                    db,
                    "INSERT INTO study_modality (study_pk, modality) VALUES (?, ?)",
                    (study_pk, m),
                )
            row = self._x(db, "SELECT patient_pk FROM study WHERE pk = ?", (study_pk,)).fetchone()
            patients.add(int(row[0]))
        for p in sorted(patients):
            self._x(
                db,
                "UPDATE patient SET num_studies = (SELECT count(*) FROM study WHERE "
                "patient_pk = patient.pk AND num_instances > 0), num_series = (SELECT "
                "coalesce(sum(num_series), 0) FROM study WHERE patient_pk = patient.pk), "
                "num_instances = (SELECT coalesce(sum(num_instances), 0) FROM study WHERE "
                "patient_pk = patient.pk) WHERE pk = ?",
                (p,),
            )

    def record_source(self, source: str, outcome: str) -> None:
        """Remember that `source` (an HL7 message) was answered `outcome` without a correction
        (nothing to change): a second copy of it is answered the same, not acted on."""
        with self._tx() as db:
            self._x(
                db,
                "INSERT INTO correction_source (source, seq, outcome, at) VALUES (?, NULL, ?, ?) "
                "ON CONFLICT (source) DO NOTHING",
                (source, outcome, time.time()),
            )

    def set_correction_missing(self, seq: int, missing: Sequence[str]) -> None:
        with self._tx() as db:
            self._x(db, "UPDATE correction SET missing = ? WHERE seq = ?", (",".join(missing), seq))

    # ------------------------------------------------------------------ reading
    def source_outcome(self, source: str) -> tuple[str, int | None] | None:
        """(outcome, correction) of a source already acted on, None if it is new."""
        row = self._one("SELECT outcome, seq FROM correction_source WHERE source = ?", (source,))
        return None if row is None else (str(row[0]), None if row[1] is None else int(row[1]))

    def correction(self, seq: int) -> CorrectionRow | None:
        rows = self._correction_rows("WHERE seq = ?", [seq])
        return rows[0] if rows else None

    def corrections(
        self, limit: int = 50, offset: int = 0, *, missing_only: bool = False
    ) -> list[CorrectionRow]:
        """Newest first (`missing_only`: those some archive site does not hold, oldest first)."""
        if missing_only:
            return self._correction_rows(f"WHERE missing <> '' ORDER BY seq LIMIT {int(limit)}", [])
        return self._correction_rows(
            f"ORDER BY seq DESC LIMIT {int(limit)} OFFSET {int(offset)}", []
        )

    def _correction_rows(self, tail: str, params: list[Any]) -> list[CorrectionRow]:
        rows = self._all(
            f"SELECT seq, kind, state, doc, undone_by, missing, created_at FROM correction {tail}",
            params,
        )
        return [
            CorrectionRow(
                int(r[0]),
                r[1],
                r[2],
                Correction.from_json(r[3]),
                None if r[4] is None else int(r[4]),
                tuple(x for x in str(r[5]).split(",") if x),
                float(r[6]),
            )
            for r in rows
        ]

    def later_corrections(self, seq: int, subjects: Sequence[str]) -> list[tuple[int, str, int]]:
        """(seq, kind, undoes) of corrections after `seq` that touch any of `subjects` and
        are not undone."""
        out: dict[int, tuple[int, str, int]] = {}
        for start in range(0, len(subjects), 500):
            chunk = list(subjects[start : start + 500])
            for r in self._all(
                "SELECT DISTINCT c.seq, c.kind, c.undoes FROM correction_subject s JOIN "
                "correction c ON c.seq = s.seq WHERE s.seq > ? AND c.undone_by IS NULL "
                f"AND s.subject IN ({marks(len(chunk))}) ORDER BY c.seq",
                [seq, *chunk],
            ):
                out[int(r[0])] = (int(r[0]), str(r[1]), int(r[2]))
        return [out[k] for k in sorted(out)]

    def patient(self, pid: str, issuer: str) -> dict[str, str] | None:
        """The values of a patient as the index answers them (None if unknown)."""
        row = self._one(
            f"SELECT {', '.join(_PATIENT_COLUMNS)} FROM patient WHERE patient_key = ?",
            (patient_key({"PatientID": pid, "IssuerOfPatientID": issuer}),),
        )
        return None if row is None else dict(zip(PATIENT, map(str, row), strict=True))

    def patient_studies(self, pid: str, issuer: str) -> list[str]:
        """Study Instance UIDs filed under a patient, in the order they arrived."""
        rows = self._all(
            "SELECT st.study_uid FROM study st JOIN patient p ON st.patient_pk = p.pk "
            "WHERE p.patient_key = ? ORDER BY st.pk",
            (patient_key({"PatientID": pid, "IssuerOfPatientID": issuer}),),
        )
        return [str(r[0]) for r in rows]

    def study_patient(self, study_uid: str) -> dict[str, str] | None:
        """The patient values a study answers with (None if the study is unknown)."""
        cols = ", ".join(f"p.{c}" for c in _PATIENT_COLUMNS)
        row = self._one(
            f"SELECT {cols} FROM study st JOIN patient p ON st.patient_pk = p.pk "
            "WHERE st.study_uid = ?",
            (study_uid,),
        )
        return None if row is None else dict(zip(PATIENT, map(str, row), strict=True))

    def hidden_instances(
        self, limit: int = 100, offset: int = 0, *, by: int = 0, study_uid: str = ""
    ) -> list[HiddenInstance]:
        conds: list[str] = []
        params: list[Any] = []
        if by:
            conds.append("h.seq = ?")
            params.append(by)
        if study_uid:
            conds.append("(h.study_uid = ? OR st.study_uid = ?)")
            params += [study_uid, study_uid]
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        rows = self._all(
            "SELECT h.sop_uid, h.seq, h.study_uid, st.study_uid, se.series_uid, i.sop_class_uid, "
            "i.pk FROM hidden_instance h LEFT JOIN instance i ON i.sop_uid = h.sop_uid "
            "LEFT JOIN series se ON i.series_pk = se.pk LEFT JOIN study st ON "
            f"se.study_pk = st.pk {where} ORDER BY h.seq DESC, h.sop_uid "
            f"LIMIT {int(limit)} OFFSET {int(offset)}",
            params,
        )
        return [
            HiddenInstance(
                str(r[0]),
                int(r[1]),
                str(r[3] or r[2] or ""),
                str(r[4] or ""),
                str(r[5] or ""),
                r[6] is not None,
            )
            for r in rows
        ]

    def hiding(self, sop_uids: Sequence[str]) -> list[tuple[str, int, str]]:
        """(SOP Instance UID, correction, study) of every hide row of `sop_uids`."""
        out: list[tuple[str, int, str]] = []
        for start in range(0, len(sop_uids), 500):
            chunk = list(sop_uids[start : start + 500])
            out += [
                (str(r[0]), int(r[1]), str(r[2]))
                for r in self._all(
                    "SELECT sop_uid, seq, study_uid FROM hidden_instance "
                    f"WHERE sop_uid IN ({marks(len(chunk))}) ORDER BY seq, sop_uid",
                    chunk,
                )
            ]
        return out

    def iter_corrections(self) -> Iterator[CorrectionRow]:
        """Every correction in order (for exports and tests)."""
        after = 0
        while True:
            rows = self._correction_rows(f"WHERE seq > ? ORDER BY seq LIMIT {500}", [after])
            if not rows:
                return
            yield from rows
            after = rows[-1].seq


def _patient_columns(values: dict[str, str]) -> dict[str, str]:
    """Patient row columns for `values`, normalised as ingest stores them."""
    name = values["PatientName"]
    return {
        "patient_id": values["PatientID"],
        "issuer": values["IssuerOfPatientID"],
        "patient_name": name,
        "patient_name_norm": pn_norm(name),
        "birth_date": normalize_stored("DA", values["PatientBirthDate"]),
        "sex": values["PatientSex"],
    }


def _same(a: dict[str, str], b: dict[str, str]) -> bool:
    return all(a.get(k, "") == b.get(k, "") for k in PATIENT)


def _as_set(values: list[str]) -> str:
    """A set kept as '\\A\\B\\' (empty string for the empty set), as ingest keeps it."""
    return ("\\" + "\\".join(values) + "\\") if values else ""
