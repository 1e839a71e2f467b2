"""Corrections: what they are, as the index keeps them and as the sites keep them.

Stored objects never change. A correction (a patient's attributes updated, patients merged, a
study moved to another patient, instances hidden by a rejection note, and the undo of any of
these) is a small JSON document, written to every archive site under `_corrections/` and
recorded in the index, which applies it. `pacsgrid reindex` replays the documents in order
(`seq`) after indexing the objects, so the index rebuilt from the sites alone answers as the
lost one did.

A document records what was asked (`request`, for people) and what it did, in three kinds of
effects that replay needs no other knowledge for:
- `assign`: these studies now belong to the patient with these values (PatientID,
  IssuerOfPatientID, PatientName, PatientBirthDate, PatientSex); each study with the values
  it had before, so that the correction can be undone;
- `hide`: these instances (by SOP Instance UID) are hidden from queries and retrieves, by
  correction `by` (a rejection note; instances that arrive later are hidden too);
- `show`: hidden by correction `by` no more;
- `purge`: these hidden instances were deleted from every site (the retention policy of a
  113039 rejection note, `pacsgrid reject purge`): their index rows go too.
The undo of correction N is a correction too: the inverse effects of N (`inverse`); a purge
has none.

The keys of the sites' documents (`doc_key`) end in `.json`: a site's object listing
(`StorageSite.list`, objects end in `.dcm`) never returns one, so nothing mistakes a
correction for an image.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pacsgrid.matching import pn_norm

FORMAT = "pacsgrid-correction/1"
DOC_PREFIX = "_corrections/"
DOC_SUFFIX = ".json"

# The patient attributes a correction sets, in the order of the Patient module.
PATIENT = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")

KINDS = ("patient", "merge", "move-study", "reject", "unhide", "undo", "purge")

# Document titles (ConceptNameCodeSequence, scheme DCM) of an IOCM rejection note: a Key
# Object Selection Document with one of these hides the instances it references.
REJECTION_CODES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


class CorrectionFormatError(ValueError):
    """A correction document that cannot be read (not JSON, another format, a bad field)."""


def doc_key(seq: int) -> str:
    """Where correction `seq` lives on every archive site (zero-padded: names sort in order)."""
    return f"{DOC_PREFIX}{seq:012d}{DOC_SUFFIX}"


def seq_of_key(key: str) -> int | None:
    """The sequence number a document key names, None for any other key."""
    if not key.startswith(DOC_PREFIX) or not key.endswith(DOC_SUFFIX):
        return None
    digits = key[len(DOC_PREFIX) : -len(DOC_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def patient_values(values: Mapping[str, str]) -> dict[str, str]:
    """The five patient attributes of `values` (missing ones empty), in a fixed order."""
    return {k: str(values.get(k, "") or "") for k in PATIENT}


def patient_key(values: Mapping[str, str]) -> str:
    """The index's identity of a patient (as ingest files one): PatientID and issuer, or the
    name where an object has no PatientID."""
    pid = values.get("PatientID", "")
    if pid:
        return f"{pid}\x00{values.get('IssuerOfPatientID', '')}"
    return f"\x00{pn_norm(values.get('PatientName', ''))}"


@dataclass(frozen=True)
class StudyMove:
    """One study of an `assign` effect, with the patient values it had before."""

    study: str
    before: dict[str, str]


@dataclass(frozen=True)
class Assign:
    patient: dict[str, str]  # the five values the studies now carry
    studies: tuple[StudyMove, ...]


@dataclass(frozen=True)
class Mark:
    """An instance hidden (`hide`) or shown again (`show`) on behalf of correction `by`."""

    sop: str
    by: int
    study: str = ""
    series: str = ""


@dataclass(frozen=True)
class Who:
    user: str = ""
    ae: str = ""
    address: str = ""
    via: str = ""

    def __str__(self) -> str:
        who = self.user or self.ae or self.via
        return f"{who}@{self.address}" if self.address else who


@dataclass(frozen=True)
class Correction:
    seq: int
    kind: str
    time: str  # ISO 8601, UTC
    who: Who
    reason: str = ""
    source: str = ""  # what asked for it, once: "hl7:APP|FACILITY|CONTROL-ID", "kos:<SOP UID>"
    request: dict[str, Any] = field(default_factory=dict)
    undoes: int = 0
    assign: tuple[Assign, ...] = ()
    hide: tuple[Mark, ...] = ()
    show: tuple[Mark, ...] = ()
    purge: tuple[Mark, ...] = ()

    @property
    def studies(self) -> list[str]:
        return [m.study for a in self.assign for m in a.studies]

    def subjects(self) -> set[str]:
        """What this correction touches: studies, patients (by index key) and instances. An
        earlier correction can be undone only while no later one touches what it touched."""
        out: set[str] = set()
        for a in self.assign:
            out.add("patient:" + patient_key(a.patient))
            for m in a.studies:
                out.add("study:" + m.study)
                out.add("patient:" + patient_key(m.before))
        for mark in (*self.hide, *self.show, *self.purge):
            out.add("sop:" + mark.sop)
        return out

    def summary(self) -> str:
        """One line without patient identifiers (for the audit log and the ordinary log)."""
        parts = []
        if self.assign:
            parts.append(f"{len(self.studies)} study(ies) assigned")
        if self.hide:
            parts.append(f"{len(self.hide)} instance(s) hidden")
        if self.show:
            parts.append(f"{len(self.show)} instance(s) shown again")
        if self.purge:
            parts.append(f"{len(self.purge)} instance(s) deleted from every site")
        what = ", ".join(parts) or "nothing to change"
        undo = f" (undoes #{self.undoes})" if self.undoes else ""
        return f"correction #{self.seq} {self.kind}{undo}: {what}"

    # ------------------------------------------------------------------ documents
    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "seq": self.seq,
            "kind": self.kind,
            "time": self.time,
            "who": {
                "user": self.who.user,
                "ae": self.who.ae,
                "address": self.who.address,
                "via": self.who.via,
            },
            "reason": self.reason,
            "source": self.source,
            "request": self.request,
            "undoes": self.undoes,
            "assign": [
                {
                    "patient": a.patient,
                    "studies": [{"study": m.study, "before": m.before} for m in a.studies],
                }
                for a in self.assign
            ],
            "hide": [_mark_json(m) for m in self.hide],
            "show": [_mark_json(m) for m in self.show],
        }
        if self.purge:
            doc["purge"] = [_mark_json(m) for m in self.purge]
        return json.dumps(doc, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> Correction:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorrectionFormatError(f"not a JSON document: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CorrectionFormatError(f"not a {FORMAT} document")
        try:
            who = doc.get("who") or {}
            c = cls(
                seq=int(doc["seq"]),
                kind=str(doc["kind"]),
                time=str(doc["time"]),
                who=Who(
                    str(who.get("user", "")),
                    str(who.get("ae", "")),
                    str(who.get("address", "")),
                    str(who.get("via", "")),
                ),
                reason=str(doc.get("reason", "")),
                source=str(doc.get("source", "")),
                request=dict(doc.get("request") or {}),
                undoes=int(doc.get("undoes") or 0),
                assign=tuple(
                    Assign(
                        patient_values(a["patient"]),
                        tuple(
                            StudyMove(str(m["study"]), patient_values(m["before"]))
                            for m in a["studies"]
                        ),
                    )
                    for a in doc.get("assign", [])
                ),
                hide=tuple(_mark(m) for m in doc.get("hide", [])),
                show=tuple(_mark(m) for m in doc.get("show", [])),
                purge=tuple(_mark(m) for m in doc.get("purge", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorrectionFormatError(f"malformed correction document: {e!r}") from None
        if c.seq <= 0 or c.kind not in KINDS:
            raise CorrectionFormatError(f"malformed correction document: seq {c.seq}, {c.kind}")
        return c


def _mark_json(m: Mark) -> dict[str, Any]:
    return {"sop": m.sop, "by": m.by, "study": m.study, "series": m.series}


def _mark(d: Mapping[str, Any]) -> Mark:
    return Mark(str(d["sop"]), int(d["by"]), str(d.get("study", "")), str(d.get("series", "")))


def inverse(c: Correction) -> tuple[tuple[Assign, ...], tuple[Mark, ...], tuple[Mark, ...]]:
    """The effects that undo `c` (assign, hide, show): every study goes back to the values
    it had before, every instance it hid is shown, every instance it showed is hidden again."""
    groups: dict[tuple[str, ...], list[StudyMove]] = {}
    for a in c.assign:
        for m in a.studies:
            groups.setdefault(tuple(m.before[k] for k in PATIENT), []).append(
                StudyMove(m.study, dict(a.patient))
            )
    assign = tuple(
        Assign(dict(zip(PATIENT, values, strict=True)), tuple(moves))
        for values, moves in groups.items()
    )
    return assign, tuple(c.show), tuple(c.hide)


def unique(items: Iterable[str]) -> list[str]:
    """`items` without repeats, in their order."""
    return list(dict.fromkeys(items))
