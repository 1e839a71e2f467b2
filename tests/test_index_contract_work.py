"""The Index contract for the work queue beyond its lifecycle (tests/test_index_contract.py):
items queued again after they failed, failures listed for the operator, failures recorded in
bulk, and waking the items waiting on a site, on every engine.
"""

from __future__ import annotations

import time

from pacsgrid.index import Index
from tests import test_index_contract as contract

# The contract's fixtures: every test here runs on SQLite and on PostgreSQL.
engine_url = contract.engine_url
index = contract.index


def test_given_up_item_queued_again_starts_afresh_with_its_new_payload(index: Index) -> None:
    index.enqueue("copy", [("k", "old")])
    [item] = index.claim("copy", "n", 1, lease=60)
    index.fail(item.pk, "unreadable", retry_at=None)
    assert index.enqueue("copy", [("k", "new"), ("other", "")]) == 2
    [row, _] = index.pending_work("copy")
    assert (row.key, row.attempts, row.error, row.not_before, row.claimed_by) == ("k", 0, "", 0, "")
    assert index.work_failures("copy") == []
    [again, _] = index.claim("copy", "n", 2, lease=60)
    assert (again.pk, again.key, again.payload, again.attempts) == (item.pk, "k", "new", 1)
    assert index.work_counts("copy") == {"pending": 2}


def test_given_up_work_listed_newest_first_within_its_limit(index: Index) -> None:
    index.enqueue("copy", [("c1", ""), ("c2", ""), ("c3", "")])
    index.enqueue("forward", [("f1", "")])
    items = {w.key: w for k in ("copy", "forward") for w in index.claim(k, "n", 9, lease=60)}
    for key in ("c2", "f1", "c1"):  # given up in this order
        index.fail(items[key].pk, f"error of {key}", retry_at=None)
    index.fail(items["c3"].pk, "site down", retry_at=time.time() + 3600)  # waiting, not failed
    assert index.work_failures("copy") == [("c1", 1, "error of c1"), ("c2", 1, "error of c2")]
    assert index.work_failures("copy", limit=1) == [("c1", 1, "error of c1")]
    assert index.work_failures("forward") == [("f1", 1, "error of f1")]
    assert [(f.kind, f.key, f.error) for f in index.failed_work(10)] == [
        ("copy", "c1", "error of c1"),
        ("forward", "f1", "error of f1"),
        ("copy", "c2", "error of c2"),
    ]
    assert [f.key for f in index.failed_work(2)] == ["c1", "f1"]
    summary = [(w.kind, w.state, w.count) for w in index.work_summary()]
    assert summary == [("copy", "failed", 2), ("copy", "pending", 1), ("forward", "failed", 1)]


def test_failures_recorded_together_each_with_its_own_outcome(index: Index) -> None:
    index.enqueue("copy", [("a", "pa"), ("b", "pb"), ("c", "pc")])
    a, b, _ = index.claim("copy", "n", 3, lease=60)
    index.fail_many([(a.pk, "gone", None), (b.pk, "busy", time.time() - 1)], payload="learnt")
    index.fail_many([])  # nothing to do, no error
    assert index.work_counts("copy") == {"failed": 1, "pending": 2}
    assert index.work_failures("copy") == [("a", 1, "gone")]
    pending = {w.key: w for w in index.pending_work("copy")}
    assert pending["b"].error == "busy" and pending["b"].claimed_by == ""
    assert pending["c"].claimed_by == "n"  # untouched: still leased
    [retried] = index.claim("copy", "m", 9, lease=60)
    assert (retried.key, retried.payload, retried.attempts) == ("b", "learnt", 2)
    index.fail_many([(retried.pk, "busy again", time.time() - 1)])  # payload kept
    [kept] = index.claim("copy", "m", 9, lease=60)
    assert kept.payload == "learnt"


def test_wake_makes_only_the_waiting_items_of_its_kind_ready(index: Index) -> None:
    index.enqueue("copy", [("a", ""), ("b", ""), ("c", "")])
    index.enqueue("forward", [("f", "")])
    later = time.time() + 3600
    a, b, c = index.claim("copy", "n", 3, lease=60)
    [f] = index.claim("forward", "n", 1, lease=60)
    index.fail_many([(a.pk, "site down", later), (b.pk, "site down", later), (c.pk, "x", None)])
    index.fail(f.pk, "peer down", later)
    assert index.claim("copy", "n", 9, lease=60) == []
    assert index.wake("copy") == 2  # not the given-up one
    assert index.wake("copy") == 0  # nothing waits any more
    assert [w.key for w in index.claim("copy", "n", 9, lease=60)] == ["a", "b"]
    assert index.claim("forward", "n", 9, lease=60) == []  # another kind still waits
    assert index.wake("forward") == 1
    assert [w.key for w in index.claim("forward", "n", 9, lease=60)] == ["f"]
