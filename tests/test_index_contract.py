"""The Index contract: every engine (SQLite, PostgreSQL) passes these same tests.

PostgreSQL is a real server started for the session (tests.pg); each test gets a fresh database.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index import Index, NewInstance, Query, WebUser, open_index, parse_match
from pacsgrid.migration_ledger import (
    DONE,
    FAILED,
    PENDING,
    SKIPPED,
    STORED,
    FileEntry,
    StudyEntry,
)
from pacsgrid.model import CopyRecord, Level
from tests import oracle
from tests.waiting import wait_until

ENGINES = ("sqlite", "postgres")


def url_for(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if engine == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=ENGINES)
def engine_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return url_for(request.param, tmp_path, request)


@pytest.fixture
def index(engine_url: str) -> Iterator[Index]:
    ix = open_index(engine_url)
    yield ix
    ix.close()


def inst(
    sop: str,
    study: str = "1.2.3",
    series: str = "1.2.3.1",
    *,
    pid: str = "P1",
    name: str = "DOE^JANE",
    date: str = "20240115",
    modality: str = "CT",
    accession: str = "",
    sites: tuple[str, ...] = ("a",),
    sha: str = "",
    replace: bool = False,
    work: tuple[tuple[str, str, str], ...] = (),
) -> NewInstance:
    values = {
        "SOPInstanceUID": sop,
        "StudyInstanceUID": study,
        "SeriesInstanceUID": series,
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "PatientID": pid,
        "PatientName": name,
        "StudyDate": date,
        "StudyTime": "101500",
        "Modality": modality,
        "AccessionNumber": accession,
        "InstanceNumber": "1",
    }
    digest = sha or f"{hash(sop) & 0xFFFFFFFF:064x}"
    copies = tuple(CopyRecord(s, f"{study}/{series}/{sop}.dcm", 100, digest, 1.0) for s in sites)
    return NewInstance(values, "1.2.840.10008.1.2.1", 100, digest, copies, "AE", replace, work)


def find(index: Index, level: Level, **keys: str) -> list[dict[str, str]]:
    matches = tuple(m for k, v in keys.items() if (m := parse_match(k, v)) is not None)
    return list(index.find(Query(level, matches)))


def col(rows: list[dict[str, str]], key: str) -> list[str]:
    return sorted(r[key] for r in rows)


# ---------------------------------------------------------------- ingest and hierarchy


def test_add_and_find_every_level(index: Index) -> None:
    res = index.add_batch(
        [
            inst("1.1", "9.1", "9.1.1"),
            inst("1.2", "9.1", "9.1.1"),
            inst("1.3", "9.1", "9.1.2", modality="MR"),
            inst("1.4", "9.2", "9.2.1", pid="P2", name="ROE^RICHARD"),
        ]
    )
    assert [r.outcome for r in res] == ["stored"] * 4
    assert index.has_instance("1.3") and not index.has_instance("1.9")
    patients = find(index, Level.PATIENT, PatientID="")
    assert col(patients, "PatientID") == ["P1", "P2"]
    p1 = next(p for p in patients if p["PatientID"] == "P1")
    assert (p1["NumberOfPatientRelatedStudies"], p1["NumberOfPatientRelatedInstances"]) == (
        "1",
        "3",
    )
    studies = find(index, Level.STUDY, StudyInstanceUID="")
    s1 = next(s for s in studies if s["StudyInstanceUID"] == "9.1")
    assert s1["NumberOfStudyRelatedSeries"] == "2"
    assert s1["NumberOfStudyRelatedInstances"] == "3"
    assert set(s1["ModalitiesInStudy"].split("\\")) == {"CT", "MR"}
    assert col(find(index, Level.SERIES, StudyInstanceUID="9.1"), "SeriesInstanceUID") == [
        "9.1.1",
        "9.1.2",
    ]
    assert col(find(index, Level.IMAGE, SeriesInstanceUID="9.1.1"), "SOPInstanceUID") == [
        "1.1",
        "1.2",
    ]
    stats = index.stats()
    assert (stats.patients, stats.studies, stats.series, stats.instances) == (2, 2, 3, 4)
    assert stats.bytes == 400
    assert [(u.site, u.objects) for u in stats.sites] == [("a", 4)]


def test_duplicate_keep_and_replace(index: Index) -> None:
    index.add_batch([inst("1.1", sha="a" * 64)])
    [dup] = index.add_batch([inst("1.1", sha="b" * 64)])
    assert dup.outcome == "duplicate" and dup.existing_sha256 == "a" * 64
    [rep] = index.add_batch([inst("1.1", sha="c" * 64, replace=True)])
    assert rep.outcome == "replaced"
    [study] = find(index, Level.STUDY, StudyInstanceUID="1.2.3")
    assert study["NumberOfStudyRelatedInstances"] == "1"
    assert index.stats().instances == 1


def test_duplicate_with_same_bytes_records_the_new_copy(index: Index) -> None:
    index.add_batch([inst("1.1", sha="a" * 64, sites=("a",))])
    index.add_batch([inst("1.1", sha="a" * 64, sites=("b",))])


def test_study_stays_with_its_first_patient(index: Index) -> None:
    index.add_batch([inst("1.1", "9.1", "9.1.1", pid="P1")])
    [res] = index.add_batch([inst("1.2", "9.1", "9.1.1", pid="OTHER")])
    assert res.outcome == "stored" and res.warnings
    assert col(find(index, Level.PATIENT, PatientID=""), "PatientID") == ["P1"]


def test_batch_is_all_or_nothing(index: Index) -> None:
    bad = NewInstance({"SOPInstanceUID": "2.2"}, "1.2.840.10008.1.2", 1, "x", ())
    with pytest.raises(Exception):  # noqa: B017 - whatever the engine raises, nothing stays
        index.add_batch([inst("2.1"), bad])
    assert not index.has_instance("2.1")
    assert index.stats().instances == 0
    index.add_batch([inst("2.1")])  # the index is still usable
    assert index.has_instance("2.1")


def test_copies_record_and_locate(index: Index) -> None:
    index.add_batch([inst("1.1", sites=("a", "b"))])
    index.record_copy("1.1", CopyRecord("c", "k/1.1.dcm", 100, "f" * 64, 2.0, "bad", 3.0))
    [rec] = index.instances(Query(Level.STUDY, (parse_match("StudyInstanceUID", "1.2.3"),)))  # type: ignore[arg-type]
    assert rec.sop_uid == "1.1" and rec.transfer_syntax == "1.2.840.10008.1.2.1"
    assert [(c.site, c.state) for c in rec.copies] == [("a", "ok"), ("b", "ok"), ("c", "bad")]
    assert rec.copies[2].verified_at == 3.0
    assert index.instance("nope") is None
    assert index.copies_on("a", ["1.2.3/1.2.3.1/1.1.dcm", "x/y/z.dcm"]) == {"1.2.3/1.2.3.1/1.1.dcm"}
    pages = index.copy_pages(0, 10)
    assert sorted((p[1], p[2]) for p in pages) == [("1.1", "a"), ("1.1", "b"), ("1.1", "c")]


def test_sites_registry(index: Index) -> None:
    assert index.register_site("a") is True
    assert index.register_site("a") is False
    index.register_site("b")
    assert index.known_sites() == {"a", "b"}


def test_reopen_keeps_data_and_schema(engine_url: str) -> None:
    ix = open_index(engine_url)
    ix.add_batch([inst("1.1")])
    ix.close()
    ix = open_index(engine_url)  # migrations already applied: nothing to do
    try:
        assert ix.has_instance("1.1")
    finally:
        ix.close()


def test_limit_and_offset(index: Index) -> None:
    index.add_batch([inst(f"1.{i}", f"9.{i}", f"9.{i}.1") for i in range(1, 8)])
    q = Query(Level.STUDY, (), limit=3, offset=2)
    assert len(list(index.find(q))) == 3
    assert len(list(index.find(Query(Level.STUDY, (), offset=5)))) == 2


# ---------------------------------------------------------------- matching


@pytest.fixture
def matching(index: Index) -> Index:
    people = [
        ("P001", "SMITH^JOHN", "20240101", "ACC1", "CT"),
        ("P002", "smith^anna", "20240215", "ACC2", "MR"),
        ("P003", "SMYTHE^BOB", "20231231", "XACC3", "CT"),
        ("P_04", "O'HARA^50%", "", "ACC_4", "US"),
        ("P005", "[WEIRD]^NAME", "20240301", "ACC5", "CR"),
    ]
    for n, (pid, name, date, acc, mod) in enumerate(people):
        index.add_batch(
            [
                inst(
                    f"1.{n}",
                    f"9.{n}",
                    f"9.{n}.1",
                    pid=pid,
                    name=name,
                    date=date,
                    accession=acc,
                    modality=mod,
                )
            ]
        )
    return index


@pytest.mark.parametrize(
    ("key", "value", "want"),
    [
        ("PatientID", "P002", {"9.1"}),
        ("PatientID", "P_04", {"9.3"}),
        ("PatientID", "P?04", {"9.3"}),  # '?' is one character, '_' is literal
        ("PatientID", "P_0*", {"9.3"}),
        ("PatientName", "SMITH*", {"9.0", "9.1"}),  # case-insensitive
        ("PatientName", "sm?th*", {"9.0", "9.1", "9.2"}),
        ("PatientName", "SM*", {"9.0", "9.1", "9.2"}),
        ("PatientName", "*50%", {"9.3"}),  # '%' is literal
        ("PatientName", "[WEIRD]*", {"9.4"}),  # '[' is literal
        ("PatientName", "*^JOHN", {"9.0"}),
        ("StudyDate", "20240101-20240229", {"9.0", "9.1"}),
        ("StudyDate", "20240201-", {"9.1", "9.4"}),
        ("StudyDate", "-20231231", {"9.2"}),
        ("StudyDate", "20231231", {"9.2"}),
        ("AccessionNumber", "ACC*", {"9.0", "9.1", "9.3", "9.4"}),
        ("AccessionNumber", "ACC_4", {"9.3"}),
        ("ModalitiesInStudy", "MR", {"9.1"}),
        ("ModalitiesInStudy", "MR\\US", {"9.1", "9.3"}),
        ("StudyInstanceUID", "9.0\\9.4\\9.99", {"9.0", "9.4"}),
    ],
)
def test_study_matching(matching: Index, key: str, value: str, want: set[str]) -> None:
    got = find(matching, Level.STUDY, **{key: value})
    assert {r["StudyInstanceUID"] for r in got} == want


ALPHABET = st.sampled_from(list("ABab%_[]\\*?^ 1"))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    # Names as the header scanner hands them to the index: without padding spaces.
    names=st.lists(
        st.text(ALPHABET, min_size=1, max_size=6).map(str.strip).filter(bool),
        min_size=1,
        max_size=6,
    ),
    pattern=st.text(ALPHABET, min_size=1, max_size=5),
)
# docs/matching.md: trailing spaces and delimiters of a name key are dropped ("? ^" is "?").
@example(names=["1"], pattern="? ^")
def test_wildcards_agree_with_an_independent_matcher(
    index: Index, names: list[str], pattern: str
) -> None:
    """PatientName matching, whatever characters the names and the key hold, agrees with a
    regular-expression model of PS3.4 C.2.2.2.4 and docs/matching.md on every engine."""
    tag = f"{abs(hash((tuple(names), pattern)))}"
    items = [
        inst(f"{tag}.{i}", f"{tag}.{i}", f"{tag}.{i}.1", pid=f"H{tag}{i}", name=n)
        for i, n in enumerate(names)
    ]
    index.add_batch(items)
    # The key goes in as a C-FIND or QIDO front end passes it on.
    match = parse_match("PatientName", pattern)
    pid = parse_match("PatientID", f"H{tag}*")
    assert pid is not None
    got = {
        r["StudyInstanceUID"]
        for r in index.find(Query(Level.STUDY, (pid,) if match is None else (match, pid)))
    }
    want = {f"{tag}.{i}" for i, n in enumerate(names) if oracle.matches(n, pattern, "PN")}
    assert got == want


# ---------------------------------------------------------------- work queue


def test_work_queue_lifecycle(index: Index) -> None:
    assert index.enqueue("copy", [("k1", "p1"), ("k2", "p2"), ("k3", "")]) == 3
    assert index.enqueue("copy", [("k1", "again")]) == 0  # still pending: left as it is
    a = index.claim("copy", "node-a", 2, lease=60)
    assert [w.key for w in a] == ["k1", "k2"] and a[0].payload == "p1" and a[0].attempts == 1
    b = index.claim("copy", "node-b", 10, lease=60)
    assert [w.key for w in b] == ["k3"]  # leased items are not handed out again
    index.complete([a[0].pk])
    index.fail(a[1].pk, "site down", retry_at=time.time() - 1)  # retry now
    index.fail(b[0].pk, "unreadable", retry_at=None)  # give up
    again = index.claim("copy", "node-b", 10, lease=60)
    assert [w.key for w in again] == ["k2"] and again[0].attempts == 2
    index.complete([again[0].pk])
    assert index.work_counts("copy") == {"done": 2, "failed": 1}
    assert index.enqueue("copy", [("k1", "p1")]) == 1  # a done item is queued again
    assert index.work_counts("copy")["pending"] == 1


def test_work_is_claimed_in_the_order_it_became_ready(index: Index) -> None:
    """Items never tried first, as queued; then retries, by the end of their backoff."""
    index.enqueue("copy", [(k, "") for k in "abcd"])
    a, b = index.claim("copy", "n", 2, lease=60)
    index.fail_many([(a.pk, "site down", time.time() - 1), (b.pk, "site down", time.time() - 2)])
    taken = [[w.key for w in index.claim("copy", "n", n, lease=60)] for n in (2, 1, 1, 1)]
    assert taken == [["c", "d"], ["b"], ["a"], []]


def test_work_queued_with_the_instance(index: Index) -> None:
    index.add_batch([inst("1.1", work=(("copy", "1.1>b", ""),))])
    [w] = index.claim("copy", "n", 5, lease=30)
    assert w.key == "1.1>b"


def test_expired_lease_is_claimed_again(index: Index) -> None:
    index.enqueue("audit", [("x", "")])
    # The lease must outlast the next call, which on a loaded machine (PostgreSQL sharing
    # the CPU) can come well after 0.2 s: a lease run out before it would be claimed there.
    [first] = index.claim("audit", "dead-node", 1, lease=10)
    assert index.claim("audit", "other", 1, lease=60) == []
    # Claimable again as soon as the lease has run out (claim takes it when it returns it).
    [again] = wait_until(
        lambda: index.claim("audit", "other", 1, lease=60), 60, "the expired lease claimed again"
    )
    assert again.pk == first.pk and again.attempts == 2


def test_item_queued_claimed_by_its_caller(index: Index) -> None:
    item = index.enqueue_claimed("commitment", "AE/1.2", "request", "worker-1", lease=60)
    assert item is not None and item.attempts == 0 and item.payload == "request"
    assert index.claim("commitment", "job", 10, lease=60) == []  # its caller holds it
    assert index.enqueue_claimed("commitment", "AE/1.2", "again", "worker-2", lease=60) is None
    assert index.extend_claim(item.pk, "worker-1", lease=60)
    assert not index.extend_claim(item.pk, "worker-2", lease=60)
    # handed over with what the attempt learnt; due at once for anyone
    index.fail(item.pk, "requester released", retry_at=time.time() - 1, payload="result")
    assert not index.extend_claim(item.pk, "worker-1", lease=60)
    [taken] = index.claim("commitment", "job", 10, lease=60)
    assert taken.pk == item.pk and taken.payload == "result" and taken.attempts == 1
    index.fail(taken.pk, "peer down", retry_at=time.time() - 1)  # payload kept when not given
    [again] = index.claim("commitment", "job", 10, lease=60)
    assert again.payload == "result"
    index.complete([again.pk])
    # a transaction asked for again after its report is queued again, claimed
    renewed = index.enqueue_claimed("commitment", "AE/1.2", "new", "worker-3", lease=60)
    assert renewed is not None and renewed.pk == item.pk and renewed.payload == "new"
    assert index.work_counts("commitment") == {"pending": 1}


def test_pending_work_as_the_operator_sees_it(index: Index) -> None:
    index.enqueue("commitment", [("A/1", ""), ("A/2", ""), ("A/3", "")])
    held = index.enqueue_claimed("commitment", "A/4", "", "worker-1", lease=60)
    assert held is not None
    [first, _] = index.claim("commitment", "job", 2, lease=60)
    index.fail(first.pk, "connection refused", retry_at=time.time() + 300)
    [done] = index.claim("commitment", "job", 1, lease=60)
    index.complete([done.pk])
    rows = {w.key: w for w in index.pending_work("commitment")}
    assert sorted(rows) == ["A/1", "A/2", "A/4"]
    assert rows["A/1"].error == "connection refused" and rows["A/1"].not_before > time.time()
    assert rows["A/1"].claimed_by == "" and rows["A/1"].attempts == 1
    assert rows["A/2"].claimed_by == "job"  # claimed, lease running
    assert rows["A/4"].claimed_by == "worker-1" and rows["A/4"].attempts == 0
    assert [w.key for w in index.pending_work("commitment", limit=1)] == ["A/1"]


def test_claim_of_a_dead_caller_runs_out(index: Index) -> None:
    item = index.enqueue_claimed("commitment", "AE/9", "request", "dead-worker", lease=0.2)
    assert item is not None
    [taken] = wait_until(
        lambda: index.claim("commitment", "job", 1, lease=60), 60, "the dead caller's claim ran out"
    )
    assert taken.pk == item.pk and taken.attempts == 1


def _claimer(url: str, owner: str, out: multiprocessing.Queue, ready: Any, both: Any) -> None:  # type: ignore[type-arg]
    ix = open_index(url)
    got: list[int] = []
    ready.wait(120)  # both processes (and the test) are here: they start claiming together
    try:
        while True:
            items = ix.claim("race", owner, 7, lease=300)
            if not items:
                break
            if not got:
                # Each holds its first batch while the other claims its own: the two really
                # run at the same time, whatever the scheduler does.
                both.wait(120)
            got += [w.pk for w in items]
            ix.complete([w.pk for w in items])
    finally:
        ix.close()
    out.put((owner, got))


@pytest.mark.slow
def test_two_processes_never_claim_one_item_twice(engine_url: str) -> None:
    ix = open_index(engine_url)
    n = 1500
    ix.enqueue("race", [(f"item-{i}", "") for i in range(n)])
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    ready, both = ctx.Barrier(3), ctx.Barrier(2)
    procs = [
        ctx.Process(target=_claimer, args=(engine_url, f"node-{k}", out, ready, both))
        for k in range(2)
    ]
    for p in procs:
        p.start()
    ready.wait(120)
    results = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
    a, b = results["node-0"], results["node-1"]
    assert len(a) == len(set(a)) and len(b) == len(set(b))
    assert not set(a) & set(b), "an item was claimed by both processes"
    assert len(a) + len(b) == n
    assert a and b, "the two processes did not actually run concurrently"
    assert ix.work_counts("race") == {"done": n}
    ix.close()
    print(f"\nclaims: node-0 {len(a)}, node-1 {len(b)} of {n}, none twice")


def test_lease_job_runs_once_per_period(index: Index) -> None:
    assert index.lease_job("backup", "node-a", every=3600) is True
    assert index.lease_job("backup", "node-b", every=3600) is False
    assert index.lease_job("backup", "node-a", every=3600) is False
    assert index.lease_job("other", "node-b", every=3600) is True
    assert index.lease_job("backup", "node-b", every=0) is True


def test_given_up_work_listed_and_retried(index: Index) -> None:
    index.enqueue("forward", [("1.1>PEER", ""), ("1.2>PEER", "")])
    first, second = index.claim("forward", "n", 10, lease=60)
    index.fail(first.pk, "association refused", retry_at=None)
    index.fail(second.pk, "peer down", retry_at=time.time() + 3600)
    assert index.work_failures("forward") == [("1.1>PEER", 1, "association refused")]
    assert [(f.kind, f.key, f.error) for f in index.failed_work(10)] == [
        ("forward", "1.1>PEER", "association refused")
    ]
    summary = {(w.kind, w.state): w.count for w in index.work_summary()}
    assert summary == {("forward", "failed"): 1, ("forward", "pending"): 1}
    assert index.claim("forward", "n", 10, lease=60) == []  # one given up, one waiting
    assert index.wake("forward") == 1
    [woken] = index.claim("forward", "n", 10, lease=60)
    assert woken.key == "1.2>PEER"
    assert index.retry_failed_work("forward") == 1
    [retried] = index.claim("forward", "n", 10, lease=60)
    assert retried.key == "1.1>PEER"
    assert index.work_failures("forward") == []


def test_job_state(index: Index) -> None:
    assert index.get_job_state("audit-pass") is None
    index.set_job_state("audit-pass", "1700000000.5")
    index.set_job_state("audit-pass", "1700000001.5")
    assert index.get_job_state("audit-pass") == "1700000001.5"
    index.set_job_state("audit-pass", None)
    assert index.get_job_state("audit-pass") is None


# ---------------------------------------------------------------- copies on sites


def test_copy_states_and_site_report(index: Index) -> None:
    index.add_batch([inst("1.1", sites=("a", "b")), inst("1.2", sites=("a",))])
    assert index.site_bytes("a") == 200 and index.site_bytes("b") == 100
    assert index.count_under_replicated(["a", "b"], 2) == 1
    assert [sop for _, sop in index.under_replicated(["a", "b"], 2, 0, 10)] == ["1.2"]
    pk = index.site_copies("b", 0, 10)[0].instance_pk
    index.set_copy_state("b", [pk], "bad")
    assert index.count_under_replicated(["a", "b"], 2) == 2
    index.set_copy_state("b", [pk], "ok", verified_at=5.0)
    index.remove_copy("1.2", "a")
    assert index.count_under_replicated(["a", "b"], 1) == 1  # 1.2 has no copy left
    report = {r.site: r for r in index.site_report()}
    assert (report["a"].objects, report["a"].bytes) == (1, 100)
    assert report["b"].last_verified == 5.0 and report["b"].bad == 0


def test_pages_of_copies_resume_exactly_after_their_cursor(index: Index) -> None:
    """The repair scan and the audit read copies a page at a time from a cursor; pages of one
    give the same copies, in the same order, as one page of all: an instance with copies on
    two sites is split across pages by its (instance, site) cursor, and nothing is read twice
    or skipped."""
    index.add_batch([inst(f"1.{n}", sites=("a", "b") if n % 2 else ("a",)) for n in range(7)])
    whole = [(c.instance_pk, c.site) for c in index.audit_candidates(["a", "b"], 1e12, (0, ""), 99)]
    assert len(whole) == 10 and whole == sorted(whole)
    paged: list[tuple[int, str]] = []
    cursor = (0, "")
    while page := index.audit_candidates(["a", "b"], 1e12, cursor, 1):
        cursor = (page[0].instance_pk, page[0].site)
        paged.append(cursor)
    assert paged == whole
    on_b = [c.instance_pk for c in index.site_copies("b", 0, 99)]
    assert len(on_b) == 3
    after = 0
    walked: list[int] = []
    while page2 := index.site_copies("b", after, 1):
        after = page2[0].instance_pk
        walked.append(after)
    assert walked == on_b


def test_stats_count_what_was_added(index: Index) -> None:
    index.add_batch([inst("1.1"), inst("1.2"), inst("2.1", "9.9", "9.9.1", pid="P2")])
    stats = index.stats()
    assert (stats.patients, stats.studies, stats.instances) == (2, 2, 3)
    assert index.study_sop_uids("1.2.3") == {"1.1", "1.2"}
    assert index.has_instances(["1.1", "2.1", "nope"]) == {"1.1", "2.1"}


# ---------------------------------------------------------------- migration ledgers


def test_migration_ledgers(index: Index) -> None:
    a = FileEntry("x/a.dcm", 10, 1, "f" * 64, "1.1", STORED)
    b = FileEntry("x/b.dcm", 20, 2, "e" * 64, "", SKIPPED, "DICOMDIR")
    index.record_files("/legacy", [a, b])
    index.record_files("/legacy", [dataclasses.replace(b, state=FAILED, reason="refused")])
    ledger = index.folder_ledger("/legacy")
    assert sorted(ledger) == ["x/a.dcm", "x/b.dcm"]
    assert ledger["x/a.dcm"].sop_uid == "1.1" and ledger["x/a.dcm"].unchanged(10, 1)
    assert (ledger["x/b.dcm"].state, ledger["x/b.dcm"].reason) == (FAILED, "refused")
    assert index.folder_ledger("/elsewhere") == {}
    index.record_studies("OLD@host:104", [StudyEntry("1.2.3", expected=2), StudyEntry("4.5.6")])
    index.record_studies("OLD@host:104", [StudyEntry("1.2.3", expected=2, received=2, state=DONE)])
    assert {e.study_uid: e.state for e in index.study_ledger("OLD@host:104")} == {
        "1.2.3": DONE,
        "4.5.6": PENDING,
    }
    [pending] = index.study_ledger("OLD@host:104", [PENDING])
    assert pending.study_uid == "4.5.6"


# ---------------------------------------------------------------- web users


def test_users_and_tokens(index: Index) -> None:
    index.save_user(WebUser("bob", "read", "hash-1"))
    index.save_user(WebUser("alice", "admin"))
    index.save_user(WebUser("bob", "write", "hash-2"))  # updated, not added
    assert index.users() == [WebUser("alice", "admin", ""), WebUser("bob", "write", "hash-2")]
    assert index.user("carol") is None
    index.save_token("t" * 64, "bob", "script")
    assert index.token_user("t" * 64) == WebUser("bob", "write", "hash-2")
    assert index.remove_user("bob") is True
    assert index.remove_user("bob") is False
    assert index.token_user("t" * 64) is None  # the user's tokens went with them


def test_unreachable_postgres_fails_promptly() -> None:
    """Nothing listens: opening the index raises IndexUnavailable at once, never hangs."""
    from tests.conftest import free_port

    t0 = time.monotonic()
    with pytest.raises(IndexUnavailable, match="cannot reach a writable PostgreSQL"):
        open_index(f"host=127.0.0.1 port={free_port()} user=postgres dbname=x connect_timeout=2")
    assert time.monotonic() - t0 < 30  # a bound on a hang, not a speed measurement


def _adder(url: str, offset: int, ready: Any, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ix = open_index(url)
    ready.wait(120)  # both processes (and the test) are here: they start together
    outcomes: list[str] = []
    try:
        for n in range(60):
            # Both processes create the same new patients, studies and series at once.
            study = n % 6
            series = f"8.{study}.{(n // 6) % 2}"
            item = inst(f"5.{offset}.{n}", f"8.{study}", series, pid=f"Q{study % 3}")
            outcomes += [r.outcome for r in ix.add_batch([item])]
    except Exception as e:
        outcomes.append(f"error: {e}")
    finally:
        ix.close()
        out.put(outcomes)


@pytest.mark.slow
def test_two_writers_filing_into_the_same_new_studies(engine_url: str) -> None:
    """Two processes (two nodes) store instances of the same new studies at the same moment:
    every store succeeds, the hierarchy and its counters come out right."""
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    ready = ctx.Barrier(3)
    open_index(engine_url).close()  # schema first
    procs = [ctx.Process(target=_adder, args=(engine_url, k, ready, out)) for k in range(2)]
    for p in procs:
        p.start()
    ready.wait(120)
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(60)
    errors = [o for r in results for o in r if o != "stored"]
    assert not errors and sum(map(len, results)) == 120, errors
    ix = open_index(engine_url)
    try:
        stats = ix.stats()
        assert (stats.patients, stats.studies, stats.series, stats.instances) == (3, 6, 12, 120)
        for row in ix.find(Query(Level.STUDY)):
            assert row["NumberOfStudyRelatedInstances"] == "20"
            assert row["NumberOfStudyRelatedSeries"] == "2"
        for row in ix.find(Query(Level.PATIENT)):
            assert row["NumberOfPatientRelatedStudies"] == "2"
            assert row["NumberOfPatientRelatedInstances"] == "40"
    finally:
        ix.close()
