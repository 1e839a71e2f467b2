"""Rejection notes (IHE IOCM): Key Object Selection Documents that reject instances.

A Key Object Selection Document (SOP Class 1.2.840.10008.5.1.4.1.1.88.59, PS3.3 A.35.4) whose
document title (ConceptNameCodeSequence) is one of the rejection codes of scheme DCM
(pacsgrid.correction.REJECTION_CODES) asks the archive to hide every instance its Current
Requested Procedure Evidence Sequence references. Such documents are small; this reads one with
pydicom (every other object is only scanned, see pacsgrid.dicomfile.header).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from pydicom.dataset import Dataset

from pacsgrid.correction import KEY_OBJECT_SELECTION, REJECTION_CODES
from pacsgrid.dicomfile.coercion import CoercionError, parse
from pacsgrid.errors import InvalidDataset


@dataclass(frozen=True)
class Referenced:
    study: str
    series: str
    sop_class: str
    sop: str


@dataclass(frozen=True)
class RejectionNote:
    sop_uid: str  # the note's own SOP Instance UID
    code: str  # 113001, 113037, 113038 or 113039
    meaning: str
    referenced: tuple[Referenced, ...]


def rejection_note(dataset: bytes | memoryview, transfer_syntax: str) -> RejectionNote | None:
    """The rejection a Key Object Selection Document asks for; None when its title is not a
    rejection code (an ordinary key object selection). Raises InvalidDataset when the document
    cannot be read or references nothing."""
    try:
        ds = parse(dataset, transfer_syntax)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _note(ds)
    except CoercionError as e:
        raise InvalidDataset(f"key object selection: {e}") from None
    except InvalidDataset:
        raise
    except Exception as e:  # pydicom raises many kinds of errors on broken datasets
        raise InvalidDataset(
            f"key object selection cannot be read: {type(e).__name__}: {e}"
        ) from None


def _note(ds: Dataset) -> RejectionNote | None:
    if str(ds.get("SOPClassUID", "")) != KEY_OBJECT_SELECTION:
        return None
    titles = ds.get("ConceptNameCodeSequence") or []
    if not titles:
        return None
    title = titles[0]
    code = str(title.get("CodeValue", "")).strip()
    scheme = str(title.get("CodingSchemeDesignator", "")).strip()
    if scheme != "DCM" or code not in REJECTION_CODES:
        return None
    own = str(ds.get("SOPInstanceUID", ""))
    referenced: list[Referenced] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        study_uid = str(study.get("StudyInstanceUID", ""))
        for series in study.get("ReferencedSeriesSequence") or []:
            series_uid = str(series.get("SeriesInstanceUID", ""))
            for sop in series.get("ReferencedSOPSequence") or []:
                uid = str(sop.get("ReferencedSOPInstanceUID", "")).strip()
                if uid and uid != own:
                    referenced.append(
                        Referenced(
                            study_uid, series_uid, str(sop.get("ReferencedSOPClassUID", "")), uid
                        )
                    )
    if not referenced:
        raise InvalidDataset(
            f"rejection note ({code}) references no instance in its "
            "CurrentRequestedProcedureEvidenceSequence"
        )
    meaning = str(title.get("CodeMeaning", "")) or REJECTION_CODES[code]
    return RejectionNote(own, code, meaning, tuple(referenced))
