"""DICOM matching in the index agrees with a plain reading of PS3.4 C.2.2.2 (tests/oracle.py).

Random studies go into a real SQLite index; random keys (single values, `*`/`?` wildcards,
date and time ranges, UID lists, universal) must select exactly the studies the oracle picks.
The oracle is written from the standard and, where the standard leaves the choice to the
archive (person names, the grouping of patients without an ID), from docs/matching.md; nothing
here calls pacsgrid's own normalisation.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacsgrid.index import NewInstance
from pacsgrid.index.sql_matching import POSTGRES, SQLITE, Dialect, column_for, compile_where
from pacsgrid.index.sqlite import SqliteIndex
from pacsgrid.matching import Match, Query, parse_match
from pacsgrid.model import BY_KEYWORD, CopyRecord, Level
from tests.oracle import matches, person_name

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
    """The rows as docs/dicom.md says the index files them: a patient is its PatientID; without
    one, its PatientName (compared as docs/matching.md says names are); every study of a
    patient carries the patient attributes of the first one stored."""
    first: dict[str, dict[str, str]] = {}
    out = []
    for r in rows:
        pid = r["PatientID"]
        key = f"{pid}\x00" if pid else f"\x00{person_name(r['PatientName'])}"
        patient = first.setdefault(key, r)
        out.append({**r, "PatientName": patient["PatientName"]})
    return out


def expected(rows: list[dict[str, str]], keyword: str, key: str, vr: str) -> set[str]:
    return {r["StudyInstanceUID"] for r in as_filed(rows) if matches(r[keyword], key, vr)}


@pytest.mark.slow
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


@pytest.mark.slow
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


# docs/matching.md, "Person names": each rule there, with the names it must and must not find
# (written out by hand, not computed).
NAMES = {
    "1.4.1": "DOE^JOHN",
    "1.4.2": "DOE",
    "1.4.3": "doe^jane^^",
    "1.4.4": "JOHNSON^ANN",
    "1.4.5": "Éclair^Zoé",
    "1.4.6": "Yamada^Tarou=山田^太郎",
}
PN_CASES = [
    ("DOE^*", {"1.4.1", "1.4.3"}),  # wildcards span the whole name: not "DOE" alone
    ("DOE*", {"1.4.1", "1.4.2", "1.4.3"}),
    ("doe^john", {"1.4.1"}),  # case does not matter
    ("DOE^", {"1.4.2"}),  # trailing empty components do not matter, in the key ...
    ("DOE^JANE", {"1.4.3"}),  # ... nor in the stored name
    ("DOE^JANE ^ ", {"1.4.3"}),  # nor trailing spaces and delimiters together
    ("*JOHN*", {"1.4.1", "1.4.4"}),
    ("éCLAIR*", {"1.4.5"}),  # Unicode upper case
    ("*=山田*", {"1.4.6"}),  # '=' is an ordinary character to wildcards
    ("?OE", {"1.4.2"}),
    ("=^^", set(NAMES)),  # only delimiters: universal
    ("DOE\\DOE^JOHN", set()),  # a backslash in a name key is a character, not a list
]


def test_person_name_rules_as_documented() -> None:
    rows = [
        {
            "StudyInstanceUID": uid,
            "SeriesInstanceUID": uid + ".1",
            "SOPInstanceUID": uid + ".1.1",
            "SOPClassUID": "1.2.3",
            "PatientID": f"P{i}",
            "PatientName": name,
        }
        for i, (uid, name) in enumerate(NAMES.items())
    ]
    index = load(rows)
    try:
        for key, want in PN_CASES:
            m = parse_match("PatientName", key)
            got = {r["StudyInstanceUID"] for r in index.find(Query(Level.STUDY, (m,) if m else ()))}
            assert got == want, key
            assert expected(rows, "PatientName", key, "PN") == want, key  # the oracle agrees
    finally:
        index.close()


def test_patients_without_an_id_are_one_per_name_as_documented() -> None:
    """docs/matching.md: without a PatientID, one patient per name compared as names are."""
    names = ["DOE^JOHN", "doe^john", "DOE^JOHN^^", "DOE^JANE"]
    rows = [
        {
            "StudyInstanceUID": f"1.5.{i}",
            "SeriesInstanceUID": f"1.5.{i}.1",
            "SOPInstanceUID": f"1.5.{i}.1.1",
            "SOPClassUID": "1.2.3",
            "PatientID": "",
            "PatientName": name,
        }
        for i, name in enumerate(names)
    ]
    index = load(rows)
    try:
        patients = list(index.find(Query(Level.PATIENT)))
    finally:
        index.close()
    assert sorted(p["PatientName"] for p in patients) == ["DOE^JANE", "DOE^JOHN"]
    assert sorted(p["NumberOfPatientRelatedStudies"] for p in patients) == ["1", "3"]


# ------------------------------------------ the SQL of both engines, evaluated by one of them
#
# The conditions compile_where writes for PostgreSQL (LIKE with escapes, strpos, %s) are run in
# SQLite with LIKE made case-sensitive, as PostgreSQL's is: the patterns, ranges and lists of
# both dialects are checked against the oracle without a PostgreSQL server. SQLite and
# PostgreSQL agree on what LIKE with ESCAPE '\\', strpos/instr and text comparison mean.


def run_where(dialect: Dialect, keyword: str, key: str, stored: list[str]) -> set[int]:
    """Indexes of the `stored` values (as the index keeps them) that the compiled key selects."""
    m = parse_match(keyword, key)
    if m is None:
        return set(range(len(stored)))
    # the table is named from the catalogue, not from column_for: its names are under test
    attr = BY_KEYWORD.get(keyword)
    column = attr.column + ("_norm" if attr.vr == "PN" else "") if attr else "sop_classes"
    alias = "st"
    assert column_for(keyword) == (f"st.{column}", Level.STUDY)
    where, params = compile_where(Query(Level.STUDY, (m,)), dialect)
    if dialect is POSTGRES:
        assert "?" not in where and "instr(" not in where
        where = where.replace("%s", "?").replace("strpos(", "instr(")
    con = sqlite3.connect(":memory:")
    try:
        con.execute("PRAGMA case_sensitive_like = ON")
        con.execute(f"CREATE TABLE t (n INTEGER, {column} TEXT)")
        con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(stored)))
        sql = f"SELECT n FROM t AS {alias} WHERE {where}"
        return {n for (n,) in con.execute(sql, params)}
    finally:
        con.close()


# ids without "postgres": scripts/mutate leaves tests of that name out (they need a server)
both = pytest.mark.parametrize("dialect", [SQLITE, POSTGRES], ids=["glob", "like"])
# As the index keeps a name for matching (upper case, no trailing delimiters): see below.
stored_names = st.lists(st.text(alphabet="AB%_\\[]*?.", max_size=4), min_size=1, max_size=6)


@both
@settings(max_examples=150, deadline=None, derandomize=True)
@given(stored=stored_names, key=st.text(alphabet="Ab%_\\[]*?.", max_size=4))
def test_wildcard_patterns_of_both_dialects(dialect: Dialect, stored: list[str], key: str) -> None:
    """Wild cards (PS3.4 C.2.2.2.4) against values holding LIKE's and GLOB's own special
    characters (% _ \\ [ ]), which must match only themselves. A person name: a backslash in
    its key is a character, not a list, and case does not matter."""
    got = run_where(dialect, "ReferringPhysicianName", key, stored)
    want = {i for i, v in enumerate(stored) if matches(v, key, "PN")}
    assert got == want


@both
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    stored=st.lists(st.text(alphabet="Ab%_*?", max_size=3), min_size=1, max_size=6),
    key=st.lists(st.text(alphabet="Ab%_*?", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_lists_with_and_without_wildcards_of_both_dialects(
    dialect: Dialect, stored: list[str], key: list[str]
) -> None:
    joined = "\\".join(key)
    got = run_where(dialect, "AccessionNumber", joined, stored)
    assert got == {i for i, v in enumerate(stored) if matches(v, joined, "SH")}


TIMES = [
    "",
    "0959",
    "10",
    "1000",
    "100000.5",
    "1030",
    "103000",
    "103000.999999",
    "103001",
    "1059",
    "105959",
    "105959.999999",
    "110000",
    "23",
    "235959.999999",
]
TIME_BOUNDS = ["", "10", "1030", "103000", "103000.5", "1059", "105959.9", "23", "2359"]
DATES = ["", "19991231", "20200101", "20200615", "20201231", "20210101"]


@both
def test_time_ranges_and_values_of_both_dialects(dialect: Dialect) -> None:
    """Every range of these bounds and every single time, against every time stored. An upper
    bound covers its whole last unit (docs/matching.md): "10" is up to 10:59:59.999999, "1030"
    up to 10:30:59.999999, "105959.9" up to 10:59:59.999999."""
    keys = [f"{low}-{high}" for low in TIME_BOUNDS for high in TIME_BOUNDS] + TIME_BOUNDS
    for key in keys:
        got = run_where(dialect, "StudyTime", key, TIMES)
        assert got == {i for i, v in enumerate(TIMES) if matches(v, key, "TM")}, key


@both
def test_date_ranges_and_lists_of_both_dialects(dialect: Dialect) -> None:
    keys = [f"{low}-{high}" for low in DATES for high in DATES] + DATES
    keys += ["\\".join(DATES[1:3]), "\\".join(DATES[2:5]), "20200101\\*"]
    for key in keys:
        got = run_where(dialect, "StudyDate", key, DATES)
        assert got == {i for i, v in enumerate(DATES) if matches(v, key, "DA")}, key


@both
def test_uid_lists_and_sop_classes_in_study_of_both_dialects(dialect: Dialect) -> None:
    uids = ["1.2.3", "1.2.30", "1.2.3.4", "1.2"]
    assert run_where(dialect, "StudyInstanceUID", "1.2.3", uids) == {0}
    assert run_where(dialect, "StudyInstanceUID", "1.2.3\\1.2\\9", uids) == {0, 3}
    # stored as the index keeps them: "\\" around and between the classes of a study
    classes = ["\\1.2.3\\", "\\1.2.30\\1.2.4\\", "\\1.2\\1.2.3.4\\", ""]
    assert run_where(dialect, "SOPClassesInStudy", "1.2.3", classes) == {0}
    assert run_where(dialect, "SOPClassesInStudy", "1.2.4\\1.2", classes) == {1, 2}
    assert run_where(dialect, "SOPClassesInStudy", "9.9", classes) == set()


def test_keys_that_cannot_restrict_the_match_leave_the_others_in_force() -> None:
    """A key the index has no column for, a key below the query level (PS3.4 C.4.1.2.1) and
    the computed keys come before the one that selects: it still selects."""
    rows = [
        {
            "StudyInstanceUID": f"1.6.{i}",
            "SeriesInstanceUID": f"1.6.{i}.1",
            "SOPInstanceUID": f"1.6.{i}.1.1",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "PatientID": "P",
            "AccessionNumber": f"A{i}",
            "Modality": "CT",
            "SeriesNumber": "1",
        }
        for i in range(3)
    ]
    keys = [
        Match("Manufacturer", "single", ("nobody",)),
        Match("SeriesNumber", "single", ("99",)),
        Match("ModalitiesInStudy", "single", ("CT",)),
        Match("SOPClassesInStudy", "single", ("1.2.840.10008.5.1.4.1.1.2",)),
        Match("AccessionNumber", "single", ("A1",)),
    ]
    index = load(rows)
    try:
        got = {r["StudyInstanceUID"] for r in index.find(Query(Level.STUDY, tuple(keys)))}
        for i in range(len(keys)):  # every key that restricts, alone after the others
            alone = keys[:i] + [keys[-1]]
            assert {
                r["StudyInstanceUID"] for r in index.find(Query(Level.STUDY, tuple(alone)))
            } == {"1.6.1"}
    finally:
        index.close()
    assert got == {"1.6.1"}
