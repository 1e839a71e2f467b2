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
            # docs/dicom.md: a patient is its PatientID; without one, its PatientName, compared as
            # person names are (docs/matching.md).
            key = pid if pid else "\x00" + person_name(text(ds, "PatientName"))
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


# ---------------------------------------------------------------- matching
#
# Written from the standard (DICOM PS3.4 C.2.2.2, Attribute Matching, and PS3.5 6.2, Value
# Representations) and, where the standard leaves a choice to the archive, from the rules
# docs/matching.md states; never from pacsgrid's own code.

DATE_TIME = ("DA", "TM", "DT")
# PS3.4 C.2.2.2.4: wild card matching applies to these VRs (and is case-sensitive except PN).
WILDCARD_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT")
# docs/matching.md, "Several values": a backslash separates values for these VRs.
MULTI_VALUE_VRS = ("CS", "DA", "DT", "IS", "LO", "SH", "TM")


def matches(value: str, key: str, vr: str) -> bool:
    """Does the stored `value` match the request key `key` (as the requester sent it)?"""
    # PS3.5 6.2: leading and trailing spaces are padding (UIDs are padded with NUL).
    key = key.strip(" \x00")
    value = value.strip(" \x00")
    if vr == "PN":
        key, value = person_name(key), person_name(value)
    # PS3.4 C.2.2.2.3 Universal Matching: a zero-length key matches every entity; so does a
    # lone "*" (C.2.2.2.4: wild card matching on "*" is equivalent to universal matching).
    if key in ("", "*"):
        return True
    if vr == "UI":
        # C.2.2.2.2 List of UID Matching: any UID in the list, exactly.
        return value in [u.strip(" \x00") for u in key.split("\\")]
    if vr in DATE_TIME and "-" in key:
        return _in_range(value, key, vr)  # C.2.2.2.5 Range Matching
    if vr in MULTI_VALUE_VRS and "\\" in key:
        # Several values: an entity matches if any of them does (docs/matching.md).
        parts = [k.strip() for k in key.split("\\") if k.strip()]
        return not parts or "*" in parts or any(matches(value, k, vr) for k in parts)
    if vr in WILDCARD_VRS and ("*" in key or "?" in key):
        # C.2.2.2.4 Wild Card Matching: "*" any sequence (also empty), "?" one character.
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in key)
        return re.fullmatch(pattern, value, re.DOTALL) is not None
    if vr == "DA":
        key, value = key.replace(".", ""), value.replace(".", "")  # ACR-NEMA 2004.01.19
    if vr == "TM":
        key, value = key.replace(":", ""), value.replace(":", "")  # ACR-NEMA 10:30:00
    # C.2.2.2.1 Single Value Matching: exactly the value, case-sensitive except PN (above).
    return value == key


def person_name(name: str) -> str:
    """The form docs/matching.md says person names are compared in: trailing spaces and
    trailing component or group delimiters dropped (PS3.5 6.2.1: trailing null components
    and their delimiters may be omitted, so "DOE^" is the name "DOE"), then upper case
    (PS3.4 C.2.2.2.1 lets PN match insensitive to case; pacsgrid does)."""
    return name.rstrip(" ^=").upper()


def _in_range(value: str, key: str, vr: str) -> bool:
    """PS3.4 C.2.2.2.5: "a-b" matches a <= value <= b, inclusive; "-b" and "a-" are open at
    one end. An empty value is no date or time, so it is in no range."""
    low, _, high = (part.strip() for part in key.partition("-"))
    if not value:
        return False
    if vr == "DA":
        value, low, high = (v.replace(".", "") for v in (value, low, high))
    if vr == "TM":
        value, low, high = (v.replace(":", "") for v in (value, low, high))
        # docs/matching.md: an upper bound covers its whole last unit ("10" is up to
        # 10:59:59.999999, "1030" up to 10:30:59.999999, "103000" up to 10:30:00.999999).
        if high:
            whole = high.partition(".")[0]
            whole += "5959"[: max(0, 6 - len(whole))]
            high = whole[:6] + "." + (high.partition(".")[2] + "999999")[:6]
    # Text comparison: DA and TM values sort as text (fixed-width digits, PS3.5 6.2).
    return (not low or value >= low) and (not high or value <= high)
