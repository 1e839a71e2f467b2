"""DICOM matching in the index agrees with a plain reading of PS3.4 C.2.2.2 (tests/oracle.py).

Random studies go into a real SQLite index; random keys (single values, `*`/`?` wildcards,
date and time ranges, UID lists, universal) must select exactly the studies the oracle picks.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacsgrid.index import NewInstance
from pacsgrid.index.query import pn_norm
from pacsgrid.index.sqlite import SqliteIndex
from pacsgrid.model import CopyRecord, Level
from pacsgrid.query import Query, parse_match
from tests.oracle import matches

ALPHABET = "ABCab*?[]%_\\^ .é"
text_values = st.text(alphabet="ABCabé []%_.^", max_size=6).map(str.strip)  # as scanned: unpadded
dates = st.sampled_from(["", "20200101", "20200615", "20201231", "19991231", "20210101"])
times = st.sampled_from(["", "0800", "083000", "120000.5", "235959", "1200"])
modalities = st.sampled_from(["CT", "MR", "US", ""])


@st.composite
def studies(draw: st.DrawFn) -> list[dict[str, str]]:
    n = draw(st.integers(1, 8))
    out = []
    for i in range(n):
        out.append(
            {
                "StudyInstanceUID": f"1.2.{i}",
                "SeriesInstanceUID": f"1.2.{i}.1",
                "SOPInstanceUID": f"1.2.{i}.1.1",
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                "PatientID": draw(text_values),
                "PatientName": draw(text_values),
                "StudyDate": draw(dates),
                "StudyTime": draw(times),
                "AccessionNumber": draw(text_values),
                "Modality": draw(modalities),
            }
        )
    return out


keys = st.one_of(
    st.tuples(st.just("PatientName"), st.text(alphabet=ALPHABET, max_size=5), st.just("PN")),
    st.tuples(st.just("PatientID"), st.text(alphabet=ALPHABET, max_size=5), st.just("LO")),
    st.tuples(st.just("AccessionNumber"), st.text(alphabet="ABab*?%_", max_size=4), st.just("SH")),
    st.tuples(
        st.just("StudyDate"),
        st.one_of(dates, st.tuples(dates, dates).map(lambda t: f"{t[0]}-{t[1]}")),
        st.just("DA"),
    ),
    st.tuples(
        st.just("StudyTime"),
        st.one_of(times, st.tuples(times, times).map(lambda t: f"{t[0]}-{t[1]}")),
        st.just("TM"),
    ),
    st.tuples(
        st.just("StudyInstanceUID"),
        st.lists(st.sampled_from(["1.2.0", "1.2.1", "1.2.5", "9.9"]), min_size=1, max_size=3).map(
            "\\".join
        ),
        st.just("UI"),
    ),
)


def load(rows: list[dict[str, str]]) -> SqliteIndex:
    index = SqliteIndex(Path(tempfile.mkdtemp()) / "index.sqlite")
    items = [
        NewInstance(
            r,
            "1.2.840.10008.1.2.1",
            1,
            "0" * 64,
            (CopyRecord("s", r["SOPInstanceUID"], 1, "0" * 64, time.time()),),
        )
        for r in rows
    ]
    index.add_batch(items)
    return index


def as_filed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows as the index files them: studies of one patient (same PatientID, or no
    PatientID and the same normalised name) carry the patient attributes of the first."""
    first: dict[str, dict[str, str]] = {}
    out = []
    for r in rows:
        pid = r["PatientID"]
        key = f"{pid}\x00" if pid else f"\x00{pn_norm(r['PatientName'])}"
        patient = first.setdefault(key, r)
        out.append({**r, "PatientName": patient["PatientName"]})
    return out


def expected(rows: list[dict[str, str]], keyword: str, key: str, vr: str) -> set[str]:
    if key.strip().rstrip("^=" if vr == "PN" else "") in ("", "*"):
        return {r["StudyInstanceUID"] for r in rows}
    filed = as_filed(rows)
    return {r["StudyInstanceUID"] for r in filed if matches(r[keyword], key.strip(), vr)}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=studies(), key=keys)
def test_study_matching_agrees_with_the_standard(
    rows: list[dict[str, str]], key: tuple[str, str, str]
) -> None:
    keyword, value, vr = key
    index = load(rows)
    try:
        m = parse_match(keyword, value)
        query = Query(Level.STUDY, (m,) if m else ())
        got = {r["StudyInstanceUID"] for r in index.find(query)}
    finally:
        index.close()
    assert got == expected(rows, keyword, value, vr)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=studies(), wanted=st.lists(modalities.filter(bool), min_size=1, max_size=2))
def test_modalities_in_study(rows: list[dict[str, str]], wanted: list[str]) -> None:
    index = load(rows)
    try:
        m = parse_match("ModalitiesInStudy", "\\".join(wanted))
        got = {r["StudyInstanceUID"] for r in index.find(Query(Level.STUDY, (m,) if m else ()))}
    finally:
        index.close()
    assert got == {r["StudyInstanceUID"] for r in rows if r["Modality"] in wanted}


def test_paging_is_stable() -> None:
    rows = [
        {
            "StudyInstanceUID": f"1.3.{i}",
            "SeriesInstanceUID": f"1.3.{i}.1",
            "SOPInstanceUID": f"1.3.{i}.1.1",
            "SOPClassUID": "1.2.3",
            "PatientID": "P",
        }
        for i in range(25)
    ]
    index = load(rows)
    try:
        pages = [
            [r["StudyInstanceUID"] for r in index.find(Query(Level.STUDY, (), 10, off))]
            for off in (0, 10, 20)
        ]
    finally:
        index.close()
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sorted(uid for page in pages for uid in page) == sorted(
        r["StudyInstanceUID"] for r in rows
    )
