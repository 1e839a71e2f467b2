"""What a C-FIND should answer, computed independently of pacsgrid's index.

The model is built from the stored objects as pydicom reads them, with the archive's documented
filing rule (a study and a series keep the patient/study of the first instance stored), and
matched with a few lines of regular expressions per PS3.4 C.2.2.2.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def text(ds: Any, keyword: str) -> str:
    v = ds.get(keyword)
    if v is None:
        return ""
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        return str(v[0]).strip(" ") if len(v) else ""
    return str(v).rstrip("\x00 ").strip(" ")  # DICOM pads with spaces only


@dataclass
class Model:
    patients: dict[str, dict[str, str]] = field(default_factory=dict)  # by patient key
    studies: dict[str, dict[str, str]] = field(default_factory=dict)
    series: dict[str, dict[str, str]] = field(default_factory=dict)
    instances: dict[str, dict[str, str]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # SOP UID -> first file stored

    def study_instances(self, study_uid: str) -> set[str]:
        return {k for k, v in self.instances.items() if v["StudyInstanceUID"] == study_uid}


def build(paths_in_arrival_order: list[Path]) -> Model:
    import pydicom

    m = Model()
    for path in paths_in_arrival_order:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        sop = text(ds, "SOPInstanceUID")
        if sop in m.instances:
            continue  # a duplicate: the archive kept the first
        study_uid, series_uid = text(ds, "StudyInstanceUID"), text(ds, "SeriesInstanceUID")
        if study_uid not in m.studies:
            pid = text(ds, "PatientID")
            m.studies[study_uid] = {
                "StudyInstanceUID": study_uid,
                "PatientID": pid,
                "PatientName": text(ds, "PatientName"),
                "StudyDate": text(ds, "StudyDate"),
                "StudyTime": text(ds, "StudyTime"),
                "AccessionNumber": text(ds, "AccessionNumber"),
                "StudyID": text(ds, "StudyID"),
            }
            # Documented rule: a patient is its PatientID; without one, its PatientName.
            key = pid if pid else "\x00" + text(ds, "PatientName").rstrip("^= ").upper()
            m.patients.setdefault(key, {"PatientID": pid, "PatientName": text(ds, "PatientName")})
        if series_uid not in m.series:
            m.series[series_uid] = {
                "SeriesInstanceUID": series_uid,
                "StudyInstanceUID": study_uid,
                "Modality": text(ds, "Modality"),
                "SeriesNumber": text(ds, "SeriesNumber"),
            }
        owner = m.series[series_uid]["StudyInstanceUID"]
        m.instances[sop] = {
            "SOPInstanceUID": sop,
            "SeriesInstanceUID": series_uid,
            "StudyInstanceUID": owner,
            "SOPClassUID": text(ds, "SOPClassUID"),
            "InstanceNumber": text(ds, "InstanceNumber"),
        }
        m.files[sop] = path
    return m


def counts(m: Model) -> dict[str, dict[str, Any]]:
    per_study: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"series": set(), "n": 0, "mods": set()}
    )
    for inst in m.instances.values():
        st = per_study[inst["StudyInstanceUID"]]
        st["series"].add(inst["SeriesInstanceUID"])
        st["n"] += 1
        mod = m.series[inst["SeriesInstanceUID"]]["Modality"]
        if mod:
            st["mods"].add(mod)
    return per_study


def matches(value: str, key: str, vr: str) -> bool:
    """DICOM matching of one stored value against one request key (non-empty).

    Person names compare without their empty trailing components ("DOE^" is "DOE", and so
    is the key "DOE ^") and without regard to case, as docs/dicom.md documents: the same rule
    on both sides."""
    if vr == "PN":
        value = value.rstrip("^= ")
        key = key.strip().rstrip("^= ")
    if vr == "UI":
        return value in key.split("\\")
    if "\\" in key and vr != "PN":
        # Multiple values (PS3.4 C.2.2.2.8): any of them matches.
        parts = [k.strip() for k in key.split("\\") if k.strip()]
        return not parts or any(matches(value, k, vr) for k in parts)
    if vr in ("DA", "TM") and "-" in key:
        lo, _, hi = key.partition("-")
        if not value:
            return False
        if vr == "TM":
            value, lo, hi = (t.replace(":", "") for t in (value, lo, hi))
            hi = hi + "5959"[len(hi) - 2 :] if len(hi) in (2, 4) else hi
        return (not lo or value >= lo) and (not hi or value[: len(hi)] <= hi)
    if "*" in key or "?" in key:
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in key)
        flags = re.IGNORECASE if vr == "PN" else 0
        return re.fullmatch(pattern, value, flags | re.DOTALL) is not None
    if vr == "PN":
        return value.upper() == key.upper()
    return value == key
