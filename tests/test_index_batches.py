"""Batches filed set-wise (pacsgrid.index.filing) do exactly what filing their items one at a
time does, on every engine: new, duplicate and replaced instances mixed in one batch, several
instances of one new study, the same instance twice, and the hierarchy's warnings.

The differential test files random batches twice into one index, once item by item and once
as one batch (under other UIDs and patients), and compares everything the index answers.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacsgrid.index import AddResult, Index, NewInstance, Query, open_index
from pacsgrid.model import CopyRecord, Level
from tests import test_index_contract as contract
from tests.test_index_contract import col, find, inst
from tests.waiting import wait_until

# The contract's fixtures: every test here runs on SQLite and on PostgreSQL.
engine_url = contract.engine_url
index = contract.index


def outcomes(results: list[AddResult]) -> list[str]:
    return [r.outcome for r in results]


def test_batch_mixing_new_duplicate_and_replace(index: Index) -> None:
    index.add_batch(
        [
            inst("1.1", "9.1", "9.1.1", sha="a" * 64, sites=("a",)),
            inst("1.2", "9.1", "9.1.1", sha="b" * 64, sites=("a",)),
            inst("1.3", "9.1", "9.1.1", sha="c" * 64, sites=("a",)),
        ]
    )
    results = index.add_batch(
        [
            inst("2.1", "9.2", "9.2.1", pid="P2", modality="MR"),  # a new study ...
            inst("1.1", "9.1", "9.1.1", sha="a" * 64, sites=("b",)),  # same bytes elsewhere
            inst("2.2", "9.2", "9.2.1", pid="P2", modality="MR"),  # ... and its second instance
            inst("1.2", "9.1", "9.1.1", sha="x" * 64, sites=("b",)),  # other bytes: kept out
            inst("1.3", "9.1", "9.1.2", sha="d" * 64, modality="US", replace=True),
            inst("1.4", "9.1", "9.1.1", work=(("copy", "1.4>b", ""),)),  # into an old series
        ]
    )
    assert outcomes(results) == ["stored", "duplicate", "stored", "duplicate", "replaced", "stored"]
    assert results[1].existing_sha256 == "a" * 64 and results[3].existing_sha256 == "b" * 64
    assert not any(r.warnings for r in results)

    one = index.instance("1.1")
    assert one is not None and sorted(c.site for c in one.copies) == ["a", "b"]
    two = index.instance("1.2")
    assert two is not None and [c.site for c in two.copies] == ["a"] and two.sha256 == "b" * 64
    three = index.instance("1.3")
    assert three is not None and three.sha256 == "d" * 64 and three.series_uid == "9.1.2"

    studies = {s["StudyInstanceUID"]: s for s in find(index, Level.STUDY, StudyInstanceUID="")}
    assert studies["9.1"]["NumberOfStudyRelatedInstances"] == "4"  # 1.1, 1.2, 1.3 (moved), 1.4
    assert studies["9.1"]["NumberOfStudyRelatedSeries"] == "2"
    assert set(studies["9.1"]["ModalitiesInStudy"].split("\\")) == {"CT", "US"}
    assert studies["9.2"]["NumberOfStudyRelatedInstances"] == "2"
    assert studies["9.2"]["ModalitiesInStudy"] == "MR"
    series = {s["SeriesInstanceUID"]: s for s in find(index, Level.SERIES, StudyInstanceUID="9.1")}
    assert series["9.1.1"]["NumberOfSeriesRelatedInstances"] == "3"
    assert series["9.1.2"]["NumberOfSeriesRelatedInstances"] == "1"
    patients = {p["PatientID"]: p for p in find(index, Level.PATIENT, PatientID="")}
    assert patients["P1"]["NumberOfPatientRelatedInstances"] == "4"
    assert patients["P2"]["NumberOfPatientRelatedStudies"] == "1"
    assert col(find(index, Level.STUDY, ModalitiesInStudy="US"), "StudyInstanceUID") == ["9.1"]
    [work] = index.claim("copy", "n", 5, lease=30)
    assert work.key == "1.4>b"
    stats = index.stats()
    assert (stats.patients, stats.studies, stats.series, stats.instances) == (2, 2, 3, 6)


def test_several_instances_of_one_new_study_in_one_batch(index: Index) -> None:
    results = index.add_batch(
        [inst(f"1.{n}", "9.1", f"9.1.{n % 2}", modality=("CT", "MR")[n % 2]) for n in range(7)]
    )
    assert outcomes(results) == ["stored"] * 7
    [patient] = find(index, Level.PATIENT, PatientID="")
    assert patient["NumberOfPatientRelatedStudies"] == "1"
    assert patient["NumberOfPatientRelatedSeries"] == "2"
    assert patient["NumberOfPatientRelatedInstances"] == "7"
    [study] = find(index, Level.STUDY, StudyInstanceUID="")
    assert (study["NumberOfStudyRelatedSeries"], study["NumberOfStudyRelatedInstances"]) == (
        "2",
        "7",
    )
    assert set(study["ModalitiesInStudy"].split("\\")) == {"CT", "MR"}
    counts = {
        s["SeriesInstanceUID"]: s["NumberOfSeriesRelatedInstances"]
        for s in find(index, Level.SERIES, StudyInstanceUID="9.1")
    }
    assert counts == {"9.1.0": "4", "9.1.1": "3"}
    for modality in ("CT", "MR"):
        assert col(find(index, Level.STUDY, ModalitiesInStudy=modality), "StudyInstanceUID") == [
            "9.1"
        ]


def test_one_instance_three_times_in_one_batch(index: Index) -> None:
    """Stored, then a copy of the same bytes on another site, then replaced: in that order."""
    results = index.add_batch(
        [
            inst("1.1", sha="a" * 64, sites=("a",)),
            inst("1.1", sha="a" * 64, sites=("b",)),
            inst("1.1", sha="c" * 64, sites=("c",), replace=True),
            inst("1.1", sha="c" * 64, sites=("d",)),
        ]
    )
    assert outcomes(results) == ["stored", "duplicate", "replaced", "duplicate"]
    rec = index.instance("1.1")
    assert rec is not None and rec.sha256 == "c" * 64
    assert sorted(c.site for c in rec.copies) == ["c", "d"]
    [study] = find(index, Level.STUDY, StudyInstanceUID="")
    assert study["NumberOfStudyRelatedInstances"] == "1"
    assert index.stats().instances == 1


def test_warnings_within_one_batch(index: Index) -> None:
    """The hierarchy rules hold between items of the same batch as between batches."""
    results = index.add_batch(
        [
            inst("1.1", "9.1", "9.1.1", pid="P1"),
            inst("1.2", "9.1", "9.1.1", pid="OTHER"),  # the study is P1's since item 1
            inst("1.3", "9.2", "9.1.1", pid="P1"),  # the series is in study 9.1
        ]
    )
    assert outcomes(results) == ["stored"] * 3
    assert results[0].warnings == ()
    assert "another PatientID" in results[1].warnings[0]
    assert "belongs to another study" in results[2].warnings[0]
    assert col(find(index, Level.PATIENT, PatientID=""), "PatientID") == ["P1"]
    studies = {s["StudyInstanceUID"]: s for s in find(index, Level.STUDY, StudyInstanceUID="")}
    assert studies["9.1"]["NumberOfStudyRelatedInstances"] == "3"
    assert "9.2" not in studies  # created, then left empty: nothing in it to answer
    assert index.stats().studies == 2


# ---------------------------------------------------------------- one at a time = one batch

ITEM = st.fixed_dictionaries(
    {
        "sop": st.integers(1, 5),
        "study": st.integers(1, 3),
        "series": st.integers(1, 4),
        "pid": st.sampled_from(["", "1", "2"]),
        "name": st.sampled_from(["DOE^A", "ROE^B"]),
        "modality": st.sampled_from(["CT", "MR"]),
        "sha": st.sampled_from(["a", "b"]),
        "sites": st.sampled_from([("x",), ("y",), ("x", "y")]),
        "replace": st.booleans(),
        "work": st.booleans(),
    }
)


def make(run: str, d: dict[str, Any]) -> NewInstance:
    """An item under the UIDs and patients of `run` (so two runs share one index)."""
    sop = f"9{run}.{d['sop']}"
    values = {
        "SOPInstanceUID": sop,
        "StudyInstanceUID": f"9{run}.{d['study']}",
        "SeriesInstanceUID": f"9{run}.{d['study']}0{d['series']}",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "PatientID": f"P{run}{d['pid']}" if d["pid"] else "",
        "PatientName": f"N{run}{d['name']}",
        "Modality": d["modality"],
        "StudyDate": "20240101",
        "InstanceNumber": str(d["sop"]),
    }
    if d["series"] == 4:
        values["SeriesInstanceUID"] = f"9{run}.404"  # one series whichever study is given
    sha = d["sha"] * 64
    copies = tuple(CopyRecord(s, f"{sop}/{s}.dcm", 100, sha, 1.0) for s in d["sites"])
    work = (("copy", f"{sop}>z", d["sha"]),) if d["work"] else ()
    return NewInstance(values, "1.2.840.10008.1.2.1", 100, sha, copies, "AE", d["replace"], work)


def normal(run: str, value: object) -> str:
    return re.sub(rf"(?<![0-9])9{run}\.|P{run}|N{run}", "#", str(value))


def snapshot(ix: Index, run: str) -> list[str]:
    """Everything the index answers about `run`'s rows, with `run` taken out."""
    out = []
    for level in Level:
        for row in ix.find(Query(level)):
            if any(normal(run, v) != str(v) for v in row.values()):
                out.append(f"{level.name} {sorted(normal(run, kv) for kv in row.items())}")
    for rec in ix.instances(Query(Level.IMAGE)):
        if normal(run, rec.sop_uid) != rec.sop_uid:
            copies = sorted((c.site, normal(run, c.key), c.sha256) for c in rec.copies)
            out.append(f"COPIES {normal(run, rec.sop_uid)} {rec.sha256} {copies}")
    return sorted(out)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=st.lists(ITEM, min_size=1, max_size=10), split=st.integers(0, 10))
def test_one_batch_files_what_one_at_a_time_files(
    index: Index, history: list[dict[str, Any]], split: int
) -> None:
    """Random items (repeated UIDs, replace, patients with and without an ID, series that
    belong to another study): filed one by one under run 1, and as two batches under run 2
    (the first `split` items, then the rest), the index answers the same for both runs."""
    tag = f"{abs(hash((repr(history), split))) % 10**6:06d}"  # one width: no run contains another
    one, two = f"1{tag}", f"2{tag}"
    singles = [r for d in history for r in index.add_batch([make(one, d)])]
    items = [make(two, d) for d in history]
    batched = index.add_batch(items[:split]) if items[:split] else []
    batched += index.add_batch(items[split:]) if items[split:] else []

    def said(run: str, results: list[AddResult]) -> list[tuple[str, str, list[str]]]:
        return [
            (r.outcome, r.existing_sha256, [normal(run, w) for w in r.warnings]) for r in results
        ]

    assert said(one, singles) == said(two, batched)
    assert snapshot(index, one) == snapshot(index, two)
    work = index.claim("copy", "n", 1000, lease=60)
    index.complete([w.pk for w in work])
    queued = {}
    for run in (one, two):
        queued[run] = sorted((normal(run, w.key), w.payload) for w in work if f"9{run}." in w.key)
    assert queued[one] == queued[two]


# ---------------------------------------------------------------- two nodes, one study


def waiting_for_a_lock(conn: Any, what: str) -> None:
    """Until one of pacsgrid's connections waits for a lock (PostgreSQL says so)."""
    wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name = 'pacsgrid'"
            ).fetchone()[0]
            == 1
        ),
        60,
        f"{what} (waiting)",
    )


def test_a_study_filed_into_by_two_nodes_keeps_both_modalities(pg_url: str) -> None:
    """While another node's transaction has filed an MR instance into a study (not yet
    committed), this node files a CT one into it: ModalitiesInStudy ends up with both. The
    study is read once the other commit is in (it was read before, and the MR lost)."""
    import psycopg

    ix = open_index(pg_url)
    try:
        ix.add_batch([inst("1.1", "9.1", "9.1.1", modality="US")])
        with psycopg.connect(pg_url) as other:
            other.execute(
                "UPDATE study SET modalities = modalities || 'MR\\', "
                "num_instances = num_instances + 1 WHERE study_uid = '9.1'"
            )
            done: list[AddResult] = []
            filer = threading.Thread(
                target=lambda: done.extend(ix.add_batch([inst("1.2", "9.1", "9.1.2")]))
            )
            filer.start()
            waiting_for_a_lock(other, "this node's batch, for the other node's lock on the study")
            other.commit()
            filer.join(120)
        assert [r.outcome for r in done] == ["stored"]
        [study] = find(ix, Level.STUDY, StudyInstanceUID="9.1")
        assert set(study["ModalitiesInStudy"].split("\\")) == {"US", "MR", "CT"}
        assert study["NumberOfStudyRelatedInstances"] == "3"
    finally:
        ix.close()


def test_postgres_commits_a_batch_while_another_waits(pg_url: str, tmp_path: Path) -> None:
    """Through the group committer, a store into one study commits while the batch of
    another store waits for a lock (another node busy with its study): PostgreSQL's batches
    do not queue behind each other. SQLite's take turns (one leader)."""
    import psycopg

    from pacsgrid.index.commit import GroupCommitter

    ix = open_index(pg_url)
    try:
        committer = GroupCommitter(ix)
        assert committer.max_leaders == ix.concurrent_batches > 1
        ix.add_batch([inst("1.1", "9.1", "9.1.1"), inst("2.1", "9.2", "9.2.1", pid="P2")])
        with psycopg.connect(pg_url) as other:
            other.execute("SELECT 1 FROM study WHERE study_uid = '9.1' FOR UPDATE")
            first: list[AddResult] = []
            second: list[AddResult] = []
            waiting = threading.Thread(
                target=lambda: first.append(committer.commit(inst("1.2", "9.1", "9.1.1")))
            )
            waiting.start()
            waiting_for_a_lock(other, "the first store's batch, for the lock on study 9.1")
            passing = threading.Thread(
                target=lambda: second.append(
                    committer.commit(inst("2.2", "9.2", "9.2.1", pid="P2"))
                )
            )
            passing.start()
            passing.join(120)  # a bound on a hang: with one leader it waits for `other`
            assert [r.outcome for r in second] == ["stored"], "the second store queued"
            assert not first
            other.commit()
            waiting.join(120)
        assert [r.outcome for r in first] == ["stored"]
    finally:
        ix.close()
    lite = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        assert GroupCommitter(lite).max_leaders == 1
    finally:
        lite.close()


# ---------------------------------------------------------------- totals without a scan


def sized(item: NewInstance, size: int) -> NewInstance:
    return dataclasses.replace(item, size=size)


def test_totals_follow_new_duplicate_and_replaced_instances(index: Index) -> None:
    """The index's totals (`status`, the dashboard) come from counters filing keeps: they
    stay exact through duplicates and replaced instances of another size, in one batch and
    across batches."""
    index.add_batch([sized(inst("1.1", series="9.1"), 100), sized(inst("1.2", series="9.2"), 300)])
    index.add_batch(
        [
            sized(inst("1.1", series="9.1", sites=("b",)), 999),  # a duplicate: not counted
            sized(inst("1.2", series="9.1", replace=True), 50),  # replaced, into another series
            sized(inst("1.3", series="9.2"), 7),
            sized(inst("1.3", series="9.2", replace=True), 8),  # replaced in the same batch
        ]
    )
    stats = index.stats()
    assert (stats.series, stats.instances, stats.bytes) == (2, 3, 100 + 50 + 8)
    assert {s.site: s.objects for s in stats.sites} == {"a": 3, "b": 1}


def test_status_reads_no_instance_and_copies_from_an_index_only(tmp_path: Path) -> None:
    """On 10 million instances, counting instances and summing their sizes took minutes:
    the totals add up series, and usage per site is read from the copies' index alone."""
    from pacsgrid.index.sql import SITE_USAGE, STATS_COUNTS

    ix = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        ix.add_batch([inst("1.1")])
        counts = " ".join(str(r[-1]) for r in ix._all(f"EXPLAIN QUERY PLAN {STATS_COUNTS}"))  # type: ignore[attr-defined]
        usage = " ".join(str(r[-1]) for r in ix._all(f"EXPLAIN QUERY PLAN {SITE_USAGE}"))  # type: ignore[attr-defined]
    finally:
        ix.close()
    # Instances only by key: those a rejection hides (index/corrections.py).
    assert "SCAN instance" not in counts and "copy" not in counts, counts
    assert "COVERING INDEX copy_site_idx" in usage, usage


def test_pages_of_copies_are_read_in_key_order_without_a_sort(tmp_path: Path) -> None:
    """The repair scan's and the audit's pages of copies, on an index never analyzed (an
    archive that grew by ingest): read from the copies' primary key from the cursor on, not
    from the (site, ...) index with every copy of the site sorted for each page (60 ms per
    page on 200,000 copies, growing with the site, against 2.6 ms)."""
    ix = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    seen: list[tuple[str, Any]] = []
    try:
        ix.add_batch([inst(f"1.{n}", sites=("a", "b")) for n in range(20)])
        read = ix._all  # type: ignore[attr-defined]

        def capture(sql: str, params: Any = ()) -> Any:
            seen.append((sql, params))
            return read(sql, params)

        ix._all = capture  # type: ignore[attr-defined]
        assert len(ix.site_copies("b", 3, 5)) == 5
        assert len(ix.audit_candidates(["a", "b"], 1e12, (3, "a"), 5)) == 5
        ix._all = read  # type: ignore[attr-defined]
        plans = [" ".join(str(r[-1]) for r in read(f"EXPLAIN QUERY PLAN {q}", p)) for q, p in seen]
    finally:
        ix.close()
    assert len(plans) == 2
    for plan in plans:
        assert "TEMP B-TREE" not in plan and "copy_site" not in plan, plan


def test_an_older_index_gets_its_series_sizes(tmp_path: Path) -> None:
    """Upgrading an index made before the series counted their bytes fills them in."""
    import sqlite3

    db = tmp_path / "index.sqlite"
    ix = open_index(f"sqlite:///{db}")
    ix.add_batch([sized(inst("1.1", series="9.1"), 100), sized(inst("1.2", series="9.1"), 20)])
    ix.add_batch([sized(inst("1.3", series="9.2"), 3)])
    ix.close()
    with sqlite3.connect(db) as conn:  # as an older pacsgrid left it
        conn.execute("DELETE FROM schema_migrations WHERE name = '0006_totals'")
        conn.execute("DROP INDEX copy_site_idx")
        conn.execute("CREATE INDEX copy_site_idx ON copy(site, state)")
        conn.execute("ALTER TABLE series DROP COLUMN size")
    ix = open_index(f"sqlite:///{db}")
    try:
        assert ix.stats().bytes == 123
        ix.add_batch([sized(inst("1.4", series="9.2"), 1000)])
        assert ix.stats().bytes == 1123
    finally:
        ix.close()
