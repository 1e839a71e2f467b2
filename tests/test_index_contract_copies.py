"""The Index contract for copies written in bulk and for the cache tier: `record_copies`
(repair, fixity audit, recovery), `touch_copies` and `eviction_candidates` (a cache site's
least recently read copies, never an instance's only safe copy), on every engine.
"""

from __future__ import annotations

from pacsgrid.index import Index, SiteUsage
from pacsgrid.index.sites import SiteReport
from pacsgrid.model import CopyRecord
from tests import test_index_contract as contract
from tests.test_index_contract import inst

# The contract's fixtures: every test here runs on SQLite and on PostgreSQL.
engine_url = contract.engine_url
index = contract.index


def copies(index: Index, sop: str) -> list[tuple[str, str, int, str, str, float | None]]:
    rec = index.instance(sop)
    assert rec is not None
    return [(c.site, c.key, c.size, c.sha256, c.state, c.verified_at) for c in rec.copies]


def pk_of(index: Index, site: str, sop: str) -> int:
    [pk] = [c.instance_pk for c in index.site_copies(site, 0, 99) if c.sop_uid == sop]
    return pk


def test_record_copies_adds_and_replaces_copies_and_skips_unknown_instances(index: Index) -> None:
    index.add_batch([inst("1.1", sites=("a",)), inst("1.2", sites=("a",))])
    index.record_copies(
        [
            ("1.1", CopyRecord("a", "new/1.1.dcm", 120, "e" * 64, 5.0, "bad", 6.0)),  # replaced
            ("1.1", CopyRecord("b", "b/1.1.dcm", 100, "f" * 64, 7.0)),  # added
            ("1.2", CopyRecord("c", "c/1.2.dcm", 90, "d" * 64, 8.0, "missing")),
            ("9.9", CopyRecord("b", "b/9.9.dcm", 1, "0" * 64, 9.0)),  # not indexed: nothing
        ]
    )
    assert copies(index, "1.1") == [
        ("a", "new/1.1.dcm", 120, "e" * 64, "bad", 6.0),
        ("b", "b/1.1.dcm", 100, "f" * 64, "ok", None),
    ]
    assert [(c[0], c[4]) for c in copies(index, "1.2")] == [("a", "ok"), ("c", "missing")]
    assert index.copies_on("b", ["b/1.1.dcm", "b/9.9.dcm"]) == {"b/1.1.dcm"}
    assert not index.has_instance("9.9")
    index.record_copies([])  # nothing to do, no error
    assert sorted((p[1], p[2]) for p in index.copy_pages(0, 10)) == [
        ("1.1", "a"),
        ("1.1", "b"),
        ("1.2", "a"),
        ("1.2", "c"),
    ]


def test_record_copies_changes_what_counts_as_safe_copies_and_site_usage(index: Index) -> None:
    """A copy found bad by the audit and one recreated by repair change the under-replicated
    instances and the bytes of each site as they should."""
    index.add_batch([inst("1.1", sites=("a", "b")), inst("1.2", sites=("a", "b"))])
    assert index.count_under_replicated(["a", "b"], 2) == 0
    index.record_copies([("1.1", CopyRecord("b", "k", 100, "f" * 64, 2.0, "bad", 3.0))])
    assert [sop for _, sop in index.under_replicated(["a", "b"], 2, 0, 10)] == ["1.1"]
    assert index.site_bytes("b") == 100 and index.site_bytes("a") == 200
    index.record_copies([("1.1", CopyRecord("b", "k", 100, "f" * 64, 4.0, "ok", 4.0))])
    assert index.count_under_replicated(["a", "b"], 2) == 0
    assert index.site_bytes("b") == 200


def _cache_with_five(index: Index) -> None:
    """1.1 .. 1.5, each with a copy on cache site `c` (stored at 1.0) and on archive sites."""
    index.add_batch(
        [
            inst("1.1", sites=("a", "c")),
            inst("1.2", sites=("a", "c")),
            inst("1.3", sites=("a", "c")),
            inst("1.4", sites=("z", "c")),
            inst("1.5", sites=("a", "c")),
        ]
    )
    verified = [pk_of(index, "a", s) for s in ("1.1", "1.3", "1.5")]
    index.set_copy_state("a", verified, "ok", verified_at=10.0)
    index.set_copy_state("a", [pk_of(index, "a", "1.3")], "bad")  # verified, then found bad
    index.set_copy_state("z", [pk_of(index, "z", "1.4")], "ok", verified_at=10.0)


def test_eviction_offers_only_copies_with_a_verified_ok_archive_copy(index: Index) -> None:
    """1.2's archive copy was never verified, 1.3's is bad, 1.4's is on a site that is not
    an archive site: none of them may leave the cache; 1.1 and 1.5 may, in pk order while
    nothing was read."""
    _cache_with_five(index)
    assert index.eviction_candidates("c", ["a"], 10) == [
        ("1.1", "1.2.3/1.2.3.1/1.1.dcm", 100),
        ("1.5", "1.2.3/1.2.3.1/1.5.dcm", 100),
    ]
    assert [e[0] for e in index.eviction_candidates("c", ["a", "z"], 10)] == ["1.1", "1.4", "1.5"]
    assert [e[0] for e in index.eviction_candidates("c", ["a"], 1)] == ["1.1"]
    assert index.eviction_candidates("c", [], 10) == []
    assert index.eviction_candidates("a", ["c"], 10) == []  # the cache's copies never verified


def test_touched_copies_are_evicted_last_and_only_on_their_site(index: Index) -> None:
    _cache_with_five(index)
    index.touch_copies("a", ["1.1"], 100.0)  # read from the archive site: the cache's LRU stays
    assert [e[0] for e in index.eviction_candidates("c", ["a", "z"], 10)] == ["1.1", "1.4", "1.5"]
    index.touch_copies("c", ["1.1", "1.5", "9.9"], 50.0)
    index.touch_copies("c", ["1.1"], 60.0)
    assert [e[0] for e in index.eviction_candidates("c", ["a", "z"], 10)] == ["1.4", "1.5", "1.1"]
    index.touch_copies("c", [], 70.0)  # nothing to do, no error
    # A copy recorded again (a cache fill) counts as read when it was stored.
    index.record_copies([("1.4", CopyRecord("c", "k/1.4", 100, "f" * 64, 55.0))])
    assert [e[0] for e in index.eviction_candidates("c", ["a", "z"], 10)] == ["1.5", "1.4", "1.1"]


def test_under_replicated_counts_only_ok_copies_on_archive_sites_page_by_page(
    index: Index,
) -> None:
    """A copy on a cache site, a bad one and a missing one are not safe copies; the repair
    scan reads the instances short of copies a page at a time after its cursor."""
    index.add_batch(
        [
            inst("1.1", sites=("a", "b")),
            inst("1.2", sites=("a",)),
            inst("1.3", sites=("a", "cache")),
            inst("1.4", sites=("b", "a")),
            inst("1.5", sites=("a", "b")),
            inst("1.6", sites=("a", "b")),
        ]
    )
    index.set_copy_state("b", [pk_of(index, "b", "1.4")], "bad")
    index.set_copy_state("b", [pk_of(index, "b", "1.5")], "missing")
    want = ["1.2", "1.3", "1.4", "1.5"]
    assert index.count_under_replicated(["a", "b"], 2) == 4
    assert [sop for _, sop in index.under_replicated(["a", "b"], 2, 0, 99)] == want
    paged: list[str] = []
    after = 0
    for _ in range(5):  # bounded: a cursor that does not advance fails, not hangs
        page = index.under_replicated(["a", "b"], 2, after, 3)
        if not page:
            break
        assert len(page) <= 3
        after = page[-1][0]
        paged += [sop for _, sop in page]
    assert paged == want
    assert index.count_under_replicated(["a", "b"], 1) == 0
    assert index.count_under_replicated(["b"], 1) == 4  # 1.2, 1.3: none on b; 1.4, 1.5: not ok
    assert index.count_under_replicated(["a", "b"], 3) == 6
    assert index.count_under_replicated([], 2) == 0
    assert index.under_replicated([], 2, 0, 99) == []


def test_site_report_and_usage_count_each_state_per_site(index: Index) -> None:
    index.add_batch(
        [inst("1.1", sites=("a", "b")), inst("1.2", sites=("a", "b")), inst("1.3", sites=("a",))]
    )
    index.set_copy_state("a", [pk_of(index, "a", "1.1")], "ok", verified_at=5.0)
    index.set_copy_state("a", [pk_of(index, "a", "1.2")], "bad", verified_at=7.0)
    index.set_copy_state("b", [pk_of(index, "b", "1.1")], "missing")
    assert index.site_report() == [
        SiteReport("a", 2, 200, 1, 0, 7.0, 1),  # 1.1 and 1.3 ok, 1.3 never verified
        SiteReport("b", 1, 100, 0, 1, None, 1),
    ]
    assert (index.site_bytes("a"), index.site_bytes("b"), index.site_bytes("z")) == (200, 100, 0)
    # The usage totals count every recorded copy, and how many of them are not ok.
    assert index.stats().sites == (SiteUsage("a", 3, 300, 1), SiteUsage("b", 2, 200, 1))
    index.remove_copy("1.2", "a")
    assert index.site_report()[0] == SiteReport("a", 2, 200, 0, 0, 5.0, 1)
    assert index.stats().sites[0] == SiteUsage("a", 2, 200, 0)


def test_bulk_copy_operations_reach_every_item_beyond_one_statement(index: Index) -> None:
    """More items than one statement takes (the engines work in chunks of 500): every one
    of them is updated and found, none twice."""
    n = 1201
    sops = [f"1.{i}" for i in range(n)]
    index.add_batch([inst(s, sites=("a", "c")) for s in sops])
    pks = [c.instance_pk for c in index.site_copies("a", 0, n + 1)]
    assert len(pks) == n
    index.set_copy_state("a", pks, "bad")
    assert index.site_report()[0] == SiteReport("a", 0, 0, n, 0, None, 0)
    index.set_copy_state("a", pks, "ok", verified_at=5.0)
    assert index.site_report()[0] == SiteReport("a", n, 100 * n, 0, 0, 5.0, 0)
    index.touch_copies("c", sops[:1100], 9.0)
    lru = index.eviction_candidates("c", ["a"], n + 1)
    assert [e[0] for e in lru[:101]] == sops[1100:]  # never read: evicted first
    assert sorted(e[0] for e in lru[101:]) == sorted(sops[:1100])
    keys = [f"1.2.3/1.2.3.1/{s}.dcm" for s in sops]
    assert index.copies_on("a", [*keys, "x/y.dcm"]) == set(keys)
    assert index.has_instances([*sops, "9.9"]) == set(sops)
