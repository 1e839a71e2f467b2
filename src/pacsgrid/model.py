"""The archive's domain vocabulary, shared by every layer.

`ATTRIBUTES` is the one catalogue of DICOM attributes the archive indexes: the header scanner
extracts exactly these, the index has a column for each, and C-FIND/QIDO match and return them.
Adding an indexed attribute means adding one line here (plus a schema migration).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Level(enum.Enum):
    """Query/Retrieve levels, named as in PS3.4 C.6 (the instance level is called IMAGE)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]

    @classmethod
    def parse(cls, text: str) -> Level:
        try:
            return cls(text.strip().upper())
        except ValueError:
            raise ValueError(f"unknown QueryRetrieveLevel {text!r}") from None


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


@dataclass(frozen=True, slots=True)
class Attribute:
    keyword: str
    tag: int
    vr: str
    level: Level
    column: str


def _a(keyword: str, tag: int, vr: str, level: Level, column: str) -> Attribute:
    return Attribute(keyword, tag, vr, level, column)


P, S, SE, I = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE  # noqa: E741

ATTRIBUTES: tuple[Attribute, ...] = (
    _a("PatientID", 0x00100020, "LO", P, "patient_id"),
    _a("PatientName", 0x00100010, "PN", P, "patient_name"),
    _a("IssuerOfPatientID", 0x00100021, "LO", P, "issuer"),
    _a("PatientBirthDate", 0x00100030, "DA", P, "birth_date"),
    _a("PatientSex", 0x00100040, "CS", P, "sex"),
    _a("StudyInstanceUID", 0x0020000D, "UI", S, "study_uid"),
    _a("StudyDate", 0x00080020, "DA", S, "study_date"),
    _a("StudyTime", 0x00080030, "TM", S, "study_time"),
    _a("AccessionNumber", 0x00080050, "SH", S, "accession"),
    _a("StudyID", 0x00200010, "SH", S, "study_id"),
    _a("StudyDescription", 0x00081030, "LO", S, "study_description"),
    _a("ReferringPhysicianName", 0x00080090, "PN", S, "referring_physician"),
    _a("SeriesInstanceUID", 0x0020000E, "UI", SE, "series_uid"),
    _a("Modality", 0x00080060, "CS", SE, "modality"),
    _a("SeriesNumber", 0x00200011, "IS", SE, "series_number"),
    _a("SeriesDescription", 0x0008103E, "LO", SE, "series_description"),
    _a("SeriesDate", 0x00080021, "DA", SE, "series_date"),
    _a("SeriesTime", 0x00080031, "TM", SE, "series_time"),
    _a("BodyPartExamined", 0x00180015, "CS", SE, "body_part"),
    _a("SOPInstanceUID", 0x00080018, "UI", I, "sop_uid"),
    _a("SOPClassUID", 0x00080016, "UI", I, "sop_class_uid"),
    _a("InstanceNumber", 0x00200013, "IS", I, "instance_number"),
    _a("ContentDate", 0x00080023, "DA", I, "content_date"),
    _a("ContentTime", 0x00080033, "TM", I, "content_time"),
    _a("NumberOfFrames", 0x00280008, "IS", I, "number_of_frames"),
    _a("Rows", 0x00280010, "US", I, "rows"),
    _a("Columns", 0x00280011, "US", I, "columns"),
)
BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}
BY_TAG = {a.tag: a for a in ATTRIBUTES}

# Attributes computed by the index rather than read from an object.
COMPUTED: dict[str, tuple[int, str, Level]] = {
    "NumberOfPatientRelatedStudies": (0x00201200, "IS", P),
    "NumberOfPatientRelatedSeries": (0x00201202, "IS", P),
    "NumberOfPatientRelatedInstances": (0x00201204, "IS", P),
    "NumberOfStudyRelatedSeries": (0x00201206, "IS", S),
    "NumberOfStudyRelatedInstances": (0x00201208, "IS", S),
    "NumberOfSeriesRelatedInstances": (0x00201209, "IS", SE),
    "ModalitiesInStudy": (0x00080061, "CS", S),
    "SOPClassesInStudy": (0x00080062, "UI", S),
}

UNIQUE_KEY = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# Keys the archive needs to file an object at all.
REQUIRED_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """One stored copy of an instance on one site."""

    site: str
    key: str
    size: int
    sha256: str
    stored_at: float
    state: str = "ok"  # ok | bad | missing
    verified_at: float | None = None


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What the index knows about one instance (attribute values keyed by DICOM keyword)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    attributes: dict[str, str] = field(default_factory=dict)
    copies: tuple[CopyRecord, ...] = ()
    # Values its object is sent with instead of the stored ones (its study is corrected, see
    # pacsgrid.correction); set only on records a retrieve asked for (Index.instances visible).
    corrections: dict[str, str] = field(default_factory=dict)
