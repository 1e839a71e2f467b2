"""What a correction request does, resolved against the index (see pacsgrid.correction).

Each `plan_*` turns a request (update a patient, merge two, move a study, undo, show hidden
instances, a rejection note) into the correction document that records it, with every study
and instance it touches and the values they had before, or None when there is nothing to
change. Plans are made under the corrections lock (archive/corrections.py), so the index they
read is the one the correction is applied to.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from pacsgrid.correction import (
    PATIENT,
    Assign,
    Correction,
    Mark,
    StudyMove,
    Who,
    inverse,
    patient_key,
    patient_values,
    unique,
)
from pacsgrid.dicomfile.kos import RejectionNote
from pacsgrid.errors import CorrectionConflict, InvalidCorrection, NotFound
from pacsgrid.index import CorrectionLog, Index
from pacsgrid.model import InstanceRecord
from pacsgrid.settings import RetentionSettings

_SEX = ("", "M", "F", "O")
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


@dataclass(frozen=True)
class PatientRef:
    """A patient as the archive knows them: PatientID and IssuerOfPatientID."""

    pid: str
    issuer: str = ""

    def __str__(self) -> str:
        return f"{self.pid} (issuer {self.issuer})" if self.issuer else self.pid


@dataclass(frozen=True)
class Request:
    """Who asks, when, why, and (once-only requests) the id of what asked."""

    who: Who
    time: str
    reason: str = ""
    source: str = ""


def clean_values(changes: Mapping[str, str]) -> dict[str, str]:
    """Patient attribute values as the archive keeps them; InvalidCorrection naming the
    attribute when one cannot be held by its VR."""
    out: dict[str, str] = {}
    for key, raw in changes.items():
        if key not in PATIENT:
            raise InvalidCorrection(f"{key}: not a patient attribute ({', '.join(PATIENT)})")
        if not isinstance(raw, str):
            raise InvalidCorrection(f"{key}: must be text")
        value = raw.strip()
        if "\\" in value or any(not ch.isprintable() for ch in value):
            raise InvalidCorrection(f"{key}: no backslash or control character allowed")
        if key == "PatientBirthDate" and value:
            m = _DATE.match(value)
            if not m or not (1 <= int(m[2]) <= 12 and 1 <= int(m[3]) <= 31):
                raise InvalidCorrection(f"{key}: a date is YYYYMMDD, got {value[:20]!r}")
            value = "".join(m.groups())
        elif key == "PatientSex":
            value = value.upper()
            if value not in _SEX:
                raise InvalidCorrection(f"{key}: M, F, O or empty, got {value[:10]!r}")
        elif key == "PatientName":
            if any(len(group) > 64 for group in value.split("=")):
                raise InvalidCorrection(f"{key}: at most 64 characters per name group")
        elif len(value) > 64:
            raise InvalidCorrection(f"{key}: at most 64 characters")
        out[key] = value
    if "PatientID" in out and not out["PatientID"]:
        raise InvalidCorrection("PatientID: cannot be empty")
    return out


def _correction(seq: int, kind: str, req: Request, **fields: object) -> Correction:
    return Correction(
        seq=seq,
        kind=kind,
        time=req.time,
        who=req.who,
        reason=req.reason,
        source=req.source,
        **fields,  # type: ignore[arg-type]
    )


def _known(index: CorrectionLog, ref: PatientRef) -> tuple[dict[str, str], list[str]]:
    values = index.patient(ref.pid, ref.issuer)
    studies = index.patient_studies(ref.pid, ref.issuer) if values else []
    if not values or not studies:
        raise NotFound(f"no study of patient {ref} in the archive")
    return values, studies


def _with_target_row(
    index: CorrectionLog, target: dict[str, str], moves: list[StudyMove]
) -> list[StudyMove]:
    """When the patient row the studies go to gets other values, its own studies change
    with it (they answer with the row's values): they are part of the correction."""
    ref = PatientRef(target["PatientID"], target["IssuerOfPatientID"])
    current = index.patient(ref.pid, ref.issuer)
    if current is None or current == target:
        return moves
    moving = {m.study for m in moves}
    own = [s for s in index.patient_studies(ref.pid, ref.issuer) if s not in moving]
    return moves + [StudyMove(s, dict(current)) for s in own]


def plan_update(
    index: CorrectionLog, seq: int, req: Request, patient: PatientRef, changes: Mapping[str, str]
) -> Correction | None:
    """Every study of `patient` gets the changed values (a new PatientID included)."""
    values, studies = _known(index, patient)
    target = {**values, **clean_values(changes)}
    if target == values:
        return None
    if patient_key(target) != patient_key(values) and index.patient_studies(
        target["PatientID"], target["IssuerOfPatientID"]
    ):
        raise CorrectionConflict(
            f"patient {PatientRef(target['PatientID'], target['IssuerOfPatientID'])} has "
            "studies already: merge the two patients instead"
        )
    moves = [StudyMove(s, dict(values)) for s in studies]
    return _correction(
        seq,
        "patient",
        req,
        request={"patient": _ref_json(patient), "set": dict(changes)},
        assign=(Assign(target, tuple(_with_target_row(index, target, moves))),),
    )


def plan_merge(
    index: CorrectionLog,
    seq: int,
    req: Request,
    merged: PatientRef,
    into: PatientRef,
    changes: Mapping[str, str],
) -> Correction | None:
    """Every study of `merged` goes to `into` (with `into`'s values, and `changes`)."""
    if patient_key({"PatientID": merged.pid, "IssuerOfPatientID": merged.issuer}) == patient_key(
        {"PatientID": into.pid, "IssuerOfPatientID": into.issuer}
    ):
        raise InvalidCorrection(f"patient {merged} cannot be merged into itself")
    values, studies = _known(index, merged)
    surviving = index.patient(into.pid, into.issuer)
    base = dict(surviving) if surviving else {**values, "PatientID": into.pid}
    base["IssuerOfPatientID"] = into.issuer
    target = {**base, **clean_values(changes)}
    if patient_key(target) != patient_key(
        {"PatientID": into.pid, "IssuerOfPatientID": into.issuer}
    ):
        raise InvalidCorrection("a merge keeps the surviving patient's PatientID and issuer")
    moves = [StudyMove(s, dict(values)) for s in studies]
    return _correction(
        seq,
        "merge",
        req,
        request={"merged": _ref_json(merged), "into": _ref_json(into), "set": dict(changes)},
        assign=(Assign(target, tuple(_with_target_row(index, target, moves))),),
    )


def plan_move(
    index: CorrectionLog,
    seq: int,
    req: Request,
    study_uid: str,
    to: PatientRef,
    changes: Mapping[str, str],
) -> Correction | None:
    """One study goes to patient `to` (known or new)."""
    before = index.study_patient(study_uid)
    if before is None:
        raise NotFound(f"no study {study_uid} in the archive")
    known = index.patient(to.pid, to.issuer)
    base = dict(known) if known else {**before, "PatientID": to.pid, "IssuerOfPatientID": to.issuer}
    target = {**base, **clean_values(changes)}
    if patient_key(target) != patient_key({"PatientID": to.pid, "IssuerOfPatientID": to.issuer}):
        raise InvalidCorrection("the study goes to the patient named: set no other PatientID")
    if target == before:
        return None
    moves = [StudyMove(study_uid, dict(before))]
    return _correction(
        seq,
        "move-study",
        req,
        request={"study": study_uid, "to": _ref_json(to), "set": dict(changes)},
        assign=(Assign(target, tuple(_with_target_row(index, target, moves))),),
    )


def plan_undo(index: CorrectionLog, seq: int, req: Request, undo: int) -> Correction:
    row = index.correction(undo)
    if row is None:
        raise NotFound(f"no correction #{undo}")
    if row.state != "applied":
        raise CorrectionConflict(f"correction #{undo} is not applied yet")
    if row.undone_by is not None:
        raise CorrectionConflict(f"correction #{undo} was undone already (by #{row.undone_by})")
    if row.doc.purge:
        raise CorrectionConflict(f"correction #{undo} deleted objects: it cannot be undone")
    later = [
        (s, kind)
        for s, kind, undoes in index.later_corrections(undo, sorted(row.doc.subjects()))
        if not (kind == "undo" and undoes > undo)  # the undo of a later one restores its state
    ]
    if later:
        names = ", ".join(f"#{s}" for s, _ in later[:5])
        raise CorrectionConflict(
            f"correction #{undo} cannot be undone while later corrections of the same "
            f"studies, patients or instances stand ({names}): undo those first, newest first"
        )
    assign, hide, show = inverse(row.doc)
    return _correction(
        seq,
        "undo",
        req,
        request={"undo": undo},
        undoes=undo,
        assign=assign,
        hide=hide,
        show=show,
    )


def plan_unhide(
    index: CorrectionLog,
    seq: int,
    req: Request,
    sop_uids: list[str],
    by: int = 0,
    study_uid: str = "",
) -> Correction | None:
    """Show hidden instances again: these SOP Instance UIDs, or all a correction hid, or all
    of a study."""
    if sop_uids:
        rows = [(s, b, st) for s, b, st in index.hiding(unique(sop_uids)) if not by or b == by]
    else:
        rows = [
            (h.sop_uid, h.by, h.study_uid)
            for h in index.hidden_instances(1_000_000, by=by, study_uid=study_uid)
        ]
    if not rows:
        return None
    show = tuple(Mark(sop, b, st) for sop, b, st in rows)
    request: dict[str, object] = {"instances": unique(sop_uids)} if sop_uids else {}
    if by:
        request["by"] = by
    if study_uid:
        request["study"] = study_uid
    return _correction(seq, "unhide", req, request=request, show=show)


def plan_reject(index: CorrectionLog, seq: int, req: Request, note: RejectionNote) -> Correction:
    seen: set[str] = set()
    hide = []
    for ref in note.referenced:
        if ref.sop not in seen:
            seen.add(ref.sop)
            hide.append(Mark(ref.sop, seq, ref.study, ref.series))
    return _correction(
        seq,
        "reject",
        req,
        request={"note": note.sop_uid, "code": note.code, "meaning": note.meaning},
        hide=tuple(hide),
    )


@dataclass(frozen=True)
class PurgePlan:
    """What `pacsgrid reject purge --by N` would delete, and the code that confirms it."""

    by: int
    instances: tuple[InstanceRecord, ...]
    code: str  # changes whenever the list does
    refusal: str  # why it may not be done now ('' when it may)

    @property
    def bytes(self) -> int:
        return sum(r.size * len(r.copies) for r in self.instances)


def plan_purge(index: Index, retention: RetentionSettings, by: int, now: float) -> PurgePlan:
    """The objects rejection `by` hides, if the retention policy allows deleting them."""
    row = index.correction(by)
    if row is None:
        raise NotFound(f"no correction #{by}")
    records: list[InstanceRecord] = []
    for h in index.hidden_instances(10_000_000, by=by):
        record = index.instance(h.sop_uid) if h.stored else None
        if record is not None:
            records.append(record)
    records.sort(key=lambda r: r.sop_uid)
    listed = [[r.sop_uid, r.sha256, [c.site for c in r.copies]] for r in records]
    code = hashlib.sha256(json.dumps([by, listed]).encode()).hexdigest()[:12]
    refusal = ""
    age_days = (now - _epoch(row.doc.time)) / 86400
    if row.kind != "reject" or row.doc.request.get("code") != "113039":
        refusal = (
            f"correction #{by} is not a rejection note titled 113039 (Data Retention Policy "
            "Expired): only those objects may be purged"
        )
    elif row.undone_by is not None:
        refusal = f"correction #{by} was undone (by #{row.undone_by}): nothing is hidden by it"
    elif age_days < retention.purge_after_days:
        refusal = (
            f"correction #{by} is {age_days:.1f} days old; retention.purge_after_days is "
            f"{retention.purge_after_days:g} (the time to undo a mistaken rejection)"
        )
    elif not retention.purge_rejected:
        refusal = "retention.purge_rejected is off: this archive deletes no object"
    return PurgePlan(by, tuple(records), code, refusal)


def purge_correction(seq: int, req: Request, plan: PurgePlan) -> Correction:
    marks = tuple(Mark(r.sop_uid, plan.by, r.study_uid, r.series_uid) for r in plan.instances)
    request = {
        "rejection": plan.by,
        "instances": len(plan.instances),
        "bytes": plan.bytes,
        "sha256": {r.sop_uid: r.sha256 for r in plan.instances},
    }
    return _correction(seq, "purge", req, request=request, purge=marks)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _ref_json(ref: PatientRef) -> dict[str, str]:
    return {"PatientID": ref.pid, "IssuerOfPatientID": ref.issuer}


__all__ = [
    "PatientRef",
    "PurgePlan",
    "Request",
    "clean_values",
    "patient_values",
    "plan_merge",
    "plan_move",
    "plan_purge",
    "plan_reject",
    "plan_undo",
    "plan_unhide",
    "plan_update",
    "purge_correction",
]
