"""What "committed" means, in process: the Archive's storage commitment rule on real folder
sites (write quorum, copies read back and hashed, corrupt and unreachable copies, cache
copies), and the durable request that carries a report to its requester.

The DICOM end-to-end tests (pynetdicom and DCMTK against `pacsgrid serve`) are in
test_commitment.py; these pin the rule underneath.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from pacsgrid.archive import Archive, Caller
from pacsgrid.archive.commitment import (
    CLASS_INSTANCE_CONFLICT,
    KIND,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    CommitmentRequest,
    Reference,
)
from pacsgrid.errors import AccessDenied
from pacsgrid.settings import Overrides, load_settings, parse_site_options
from tests.behind_the_archive import index_of, placement_of
from tests.test_archive import dataset, flip_last_byte

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
MODALITY = Caller("MODALITY", "127.0.0.1")


def make_archive(tmp_path: Path, sites: list[str], quorum: int, **extra: str) -> Archive:
    """An archive on folder sites whose every copy is in the write quorum; MODALITY is a
    configured peer (it may store, so it may ask for commitment)."""
    cfg = tmp_path / "peers.toml"
    cfg.write_text("[[peers]]\nae_title = 'MODALITY'\nhost = '127.0.0.1'\nport = 104\n")
    ov = Overrides(config=cfg, data_dir=tmp_path / "data", sites=parse_site_options(sites))  # type: ignore[arg-type]
    ov.values["replication.copies"] = str(quorum)
    ov.values["replication.write_quorum"] = str(quorum)
    ov.values.update(extra)
    return Archive(load_settings(ov, environ={}), probe_interval=0)


@pytest.fixture
def two_sites(tmp_path: Path) -> Iterator[Archive]:
    a = make_archive(tmp_path, [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], quorum=2)
    yield a
    a.close()


def store(a: Archive, *uids: str) -> list[Reference]:
    for uid in uids:
        a.ingest(dataset(uid), EXPLICIT, MODALITY)
    return [Reference(CT, uid) for uid in uids]


def reads(site: str) -> float:
    return (
        REGISTRY.get_sample_value("pacsgrid_site_operations_total", {"site": site, "op": "get"})
        or 0.0
    )


def copy_path(a: Archive, site: str, sop: str) -> Path:
    record = a.instance(sop)
    assert record is not None
    [copy] = [c for c in record.copies if c.site == site]
    return Path(placement_of(a).sites[site].root) / copy.key  # type: ignore[attr-defined]


def test_stored_instances_are_committed_unknown_ones_are_not(two_sites: Archive) -> None:
    refs = store(two_sites, "1.2.3.1", "1.2.3.2")
    unknown = Reference(CT, "1.2.3.999")
    before = reads("a") + reads("b")
    result = two_sites.commitment.verify([*refs, unknown])
    assert result is not None
    assert result.committed == tuple(refs)
    assert [(f.reference, f.reason) for f in result.failed] == [(unknown, NO_SUCH_OBJECT_INSTANCE)]
    assert result.event_type == 2
    # each committed instance read once per copy counted toward the quorum of two
    assert reads("a") + reads("b") - before == 2 * len(refs)


def test_all_committed_is_event_type_1(two_sites: Archive) -> None:
    refs = store(two_sites, "1.2.4.1")
    result = two_sites.commitment.verify(refs)
    assert result is not None and result.event_type == 1 and not result.failed


def test_a_sop_class_that_does_not_match_is_a_class_instance_conflict(two_sites: Archive) -> None:
    store(two_sites, "1.2.5.1")
    result = two_sites.commitment.verify([Reference(MR, "1.2.5.1")])
    assert result is not None and not result.committed
    [failure] = result.failed
    assert failure.reason == CLASS_INSTANCE_CONFLICT and CT in failure.why


def test_a_corrupt_copy_does_not_count(
    two_sites: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    refs = store(two_sites, "1.2.6.1", "1.2.6.2")
    flip_last_byte(copy_path(two_sites, "b", "1.2.6.1"))
    verify_errors = (
        REGISTRY.get_sample_value("pacsgrid_site_errors_total", {"site": "b", "op": "verify"})
        or 0.0
    )
    result = two_sites.commitment.verify(refs)
    assert result is not None
    assert result.committed == (refs[1],)
    [failure] = result.failed
    assert failure.reference == refs[0] and failure.reason == PROCESSING_FAILURE
    assert "1 verified archive copies of the 2 required" in failure.why
    assert "does not match its SHA-256" in failure.why
    # reported like a failed read: counted, and logged with the operator's hint
    after = REGISTRY.get_sample_value("pacsgrid_site_errors_total", {"site": "b", "op": "verify"})
    assert after == verify_errors + 1
    assert "run 'pacsgrid audit' to quarantine and repair it" in caplog.text


def test_a_missing_copy_or_a_site_down_does_not_count(two_sites: Archive) -> None:
    refs = store(two_sites, "1.2.7.1", "1.2.7.2")
    copy_path(two_sites, "a", "1.2.7.1").unlink()
    result = two_sites.commitment.verify(refs[:1])
    assert result is not None and result.failed[0].reason == PROCESSING_FAILURE
    assert "no object" in result.failed[0].why
    placement_of(two_sites).mark_down("b", "unplugged for the test")
    result = two_sites.commitment.verify(refs[1:])
    assert result is not None and not result.committed
    assert "site b is down" in result.failed[0].why


def test_quorum_one_commits_with_one_good_copy_of_two(tmp_path: Path) -> None:
    a = make_archive(tmp_path, [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], quorum=1)
    try:
        [ref] = store(a, "1.2.8.1")
        before = reads("a") + reads("b")
        result = a.commitment.verify([ref])
        assert result is not None and result.committed == (ref,)
        assert reads("a") + reads("b") - before == 1  # one copy counts: one read
    finally:
        a.close()


def test_cache_copies_never_count(tmp_path: Path) -> None:
    sites = parse_site_options([f"a={tmp_path / 'a'}", f"c={tmp_path / 'c'}"], roles=["c=cache"])
    ov = Overrides(data_dir=tmp_path / "data", sites=sites)  # type: ignore[arg-type]
    a = Archive(load_settings(ov, environ={}), probe_interval=0)
    try:
        [ref] = store(a, "1.2.9.1")
        record = a.instance(ref.sop_instance_uid)
        assert record is not None
        a.read(record)  # fills the cache
        assert {c.site for c in a.instance(ref.sop_instance_uid).copies} == {"a", "c"}  # type: ignore[union-attr]
        shutil.rmtree(tmp_path / "a")  # the archive site's volume is gone
        result = a.commitment.verify([ref])
        assert result is not None and not result.committed
    finally:
        a.close()


def test_verification_stops_when_cancelled(two_sites: Archive) -> None:
    refs = store(two_sites, "1.2.10.1", "1.2.10.2")
    seen: list[int] = []

    def cancelled() -> bool:
        seen.append(1)
        return len(seen) > 1

    assert two_sites.commitment.verify(refs, cancelled) is None


def test_a_request_is_durable_and_claimed_by_its_caller(two_sites: Archive) -> None:
    refs = store(two_sites, "1.2.11.1")
    c = two_sites.commitment
    pending = c.request(MODALITY, "1.2.99.1", refs, owner="worker")
    assert pending is not None and pending.request.requester == "MODALITY"
    assert c.claim("job", 10) == []  # the worker holds it
    # the same transaction again while pending: answered by the first report
    assert c.request(MODALITY, "1.2.99.1", refs, owner="other") is None
    result = c.verify(refs)
    assert result is not None
    c.hand_over(pending, result, "the requester released the association")
    [taken] = c.claim("job", 10)
    assert taken.request.result is not None
    assert taken.request.result.committed == result.committed
    c.reported(taken, taken.request.result, "on a new association")
    assert c.counts() == {"done": 1}
    audit = two_sites.settings.audit_path.read_text()
    assert '"operation":"N-ACTION"' in audit and '"operation":"N-EVENT-REPORT"' in audit


def test_delivery_backs_off_then_gives_up(tmp_path: Path) -> None:
    limit = {"commitment.max_attempts": "2"}
    a = make_archive(tmp_path, [f"a={tmp_path / 'a'}"], quorum=1, **limit)
    try:
        refs = store(a, "1.2.12.1")
        c = a.commitment
        pending = c.request(MODALITY, "1.2.99.2", refs, owner="worker")
        assert pending is not None and pending.attempts == 0  # its verifier's try: not counted
        c.hand_over(pending, None, "")
        [first] = c.claim("job", 10)
        assert first.attempts == 1
        assert not c.retry_later(first, None, "connection refused")
        assert c.claim("job", 10) == []  # not before its backoff
        # an item whose payload cannot be read is given up when it is claimed
        item = index_of(a).enqueue_claimed(KIND, "x", "{}", "job", 60)
        assert item is not None
        index_of(a).fail(item.pk, "", retry_at=0.0)
        index_of(a).wake(KIND)  # as after a restart: every waiting report is due
        [again] = c.claim("job", 10)
        assert again.request.transaction_uid == "1.2.99.2" and again.attempts == 2
        assert c.retry_later(again, None, "connection refused")  # given up
        assert [key for key, _, _ in c.given_up()] == ["MODALITY/1.2.99.2", "x"]
        assert c.given_up()[0][1:] == (2, "connection refused")
        assert c.retry_given_up() == 2
    finally:
        a.close()


def test_only_configured_peers_that_may_store_ask(two_sites: Archive) -> None:
    refs = store(two_sites, "1.2.13.1")
    with pytest.raises(AccessDenied):
        two_sites.commitment.request(Caller("STRANGER", "127.0.0.1"), "1.2.99.3", refs, owner="w")
    assert two_sites.commitment.counts() == {}


def test_payload_round_trip() -> None:
    refs = (Reference(CT, "1.1"), Reference(MR, "1.2"))
    req = CommitmentRequest("9.9", "CT1", "10.0.0.1", refs, 1.5)
    assert CommitmentRequest.from_payload(req.payload()) == req
    with pytest.raises(ValueError, match="unreadable storage commitment request"):
        CommitmentRequest.from_payload('{"refs": 3}')
