"""Several sites, in process and fast: configuration of sites on the command line, the durable
outbox, repair waiting for a site, cache eviction rules, a resumable audit.

The DCMTK-driven end-to-end tests are in test_sites.py; these pin the rules underneath.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as settings_hyp
from hypothesis import strategies as st

from bench.synth import Spec, write
from pacsgrid.archive import LOCAL, Archive
from pacsgrid.errors import ConfigError
from pacsgrid.index import Query
from pacsgrid.jobs.repair import KIND, Repairer
from pacsgrid.model import Level
from pacsgrid.node import auditor, repairer
from pacsgrid.settings import (
    Overrides,
    Settings,
    SiteSettings,
    load_settings,
    parse_site_options,
    parse_size,
)
from pacsgrid.storage import open_site
from tests.behind_the_archive import cache_of, index_of, placement_of


def settings(tmp_path: Path, sites: list[str], copies: int, quorum: int, **more: str) -> Settings:
    ov = Overrides(data_dir=tmp_path / "archive", sites=parse_site_options(sites, **more))  # type: ignore[arg-type]
    ov.values["replication.copies"] = str(copies)
    ov.values["replication.write_quorum"] = str(quorum)
    return load_settings(ov, environ={})


def files(tmp_path: Path, n_studies: int = 2, instances: int = 3) -> list[Path]:
    spec = Spec(studies=n_studies, series=1, instances=instances, size=16, seed=tmp_path.name)
    return write(spec, tmp_path / "data")


# ---------------------------------------------------------------------------- configuration
def test_sites_from_the_command_line(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        [f"a={tmp_path / 'a'}", "b=s3://bucket/pacs?endpoint=http://127.0.0.1:1", "c=cache-dir"],
        2,
        1,
        locations=["b=cloud"],
        roles=["c=cache"],
        capacities=["c=1.5GB"],
    )
    by = {x.name: x for x in s.sites}
    assert by["a"].url == (tmp_path / "a").resolve().as_uri()
    assert by["b"].location == "cloud" and by["b"].url.startswith("s3://bucket/pacs?")
    assert by["c"].role == "cache" and by["c"].capacity == 1_500_000_000
    assert (s.replication.copies, s.replication.write_quorum) == (2, 1)


@pytest.mark.parametrize(
    ("sites", "more", "message"),
    [
        (["nourl"], {}, "--site: expected NAME=URL"),
        (["a=/x", "a=/y"], {}, "--site: site 'a' given twice"),
        (["a=/x"], {"roles": ["b=cache"]}, "--site-role: no --site named 'b'"),
        (["a=/x"], {"capacities": ["a=lots"]}, "--site-capacity: expected a size"),
        (["a=ftp://host/x"], {}, "sites[0].url: unsupported scheme"),
        (["a=/x"], {"roles": ["a=mirror"]}, "sites[0].role: must be one of archive, cache"),
    ],
)
def test_bad_site_options_name_the_key(
    tmp_path: Path, sites: list[str], more: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        settings(tmp_path, sites, 1, 1, **more)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"replication\.copies: asks for 3 copies"):
        settings(tmp_path, ["a=/x", "b=/y"], 3, 1)
    with pytest.raises(ConfigError, match=r"replication\.write_quorum: must not exceed"):
        settings(tmp_path, ["a=/x", "b=/y"], 1, 2)
    with pytest.raises(ConfigError, match="at least one site must have role 'archive'"):
        settings(tmp_path, ["a=/x"], 1, 1, roles=["a=cache"])


def test_cli_reports_a_bad_site_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pacsgrid", "sites", "--data-dir", str(tmp_path), "--site", "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pacsgrid: config error: --site: expected NAME=URL, got 'x'"


def test_sizes() -> None:
    assert parse_size("500", "k") == 500
    assert parse_size("20GB", "k") == 20 * 10**9
    assert parse_size("2 MiB", "k") == 2 * 1024**2
    with pytest.raises(ConfigError):
        parse_size("-1", "k")


def test_s3_url_parameters_are_checked_and_secrets_hidden() -> None:
    url = "s3://bkt/p?endpoint=http://127.0.0.1:9&access_key=AK&secret_key=SECRET&region=r1"
    site = open_site(SiteSettings(name="s3", url=url))
    assert "SECRET" not in site.url and "AK" not in site.url and "endpoint" in site.url
    with pytest.raises(ConfigError, match=r"sites\.s3\.url: unknown parameter 'colour'"):
        open_site(SiteSettings(name="s3", url="s3://bkt/p?colour=blue"))


# ---------------------------------------------------------------------------- outbox, repair
def test_copies_beyond_the_quorum_are_queued_with_the_index_row(tmp_path: Path) -> None:
    s = settings(tmp_path, [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], 2, 1)
    archive = Archive(s, probe_interval=0)
    try:
        for f in files(tmp_path):
            assert archive.ingest_file(f.read_bytes(), LOCAL).outcome == "stored"
        stats = {u.site: u.objects for u in index_of(archive).stats().sites}
        assert sum(stats.values()) == 6  # one copy each: the quorum
        assert index_of(archive).work_counts(KIND) == {"pending": 6}
        report = repairer(archive).drain(threading.Event())
        assert report.counts == {"copied": 6}
        assert {u.site: u.objects for u in index_of(archive).stats().sites} == {"a": 6, "b": 6}
        assert index_of(archive).work_counts(KIND) == {"done": 6}
    finally:
        archive.close()


def test_repair_waits_for_a_down_site_and_wakes_when_it_is_back(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    s = settings(tmp_path, [f"a={a}", f"b={b}"], 2, 1)
    archive = Archive(s, probe_interval=0)
    try:
        away = b.rename(tmp_path / "b-away")
        b.mkdir()
        placement_of(archive).probe()
        assert not placement_of(archive).is_up("b")
        for f in files(tmp_path, 1, 2):
            archive.ingest_file(f.read_bytes(), LOCAL)
        job = repairer(archive)
        report = job.drain(threading.Event())
        assert report.counts == {"waiting": 2}
        assert job.drain(threading.Event()).counts == {}  # not due yet: backing off
        b.rmdir()
        away.rename(b)
        placement_of(archive).probe()  # b is up: the waiting copies are due at once
        assert job.drain(threading.Event()).counts == {"copied": 2}
        assert index_of(archive).count_under_replicated(["a", "b"], 2) == 0
    finally:
        archive.close()


def test_repair_quarantines_a_foreign_object_in_its_way(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    s = settings(tmp_path, [f"a={a}", f"b={b}"], 2, 1)
    archive = Archive(s, probe_interval=0)
    try:
        (f,) = files(tmp_path, 1, 1)
        archive.ingest_file(f.read_bytes(), LOCAL)
        (record,) = index_of(archive).instances(Query(Level.IMAGE))
        key = record.copies[0].key
        (b / key).parent.mkdir(parents=True)
        (b / key).write_bytes(b"something else")
        assert repairer(archive).drain(threading.Event()).counts == {"copied": 1}
        assert hashlib.sha256((b / key).read_bytes()).hexdigest() == record.sha256
        evidence = [p for p in (b / ".quarantine").rglob("*.dcm")]
        assert [p.read_bytes() for p in evidence] == [b"something else"]
    finally:
        archive.close()


# ---------------------------------------------------------------------------- cache, audit
def test_cache_evicts_only_copies_with_a_verified_archive_copy(tmp_path: Path) -> None:
    data = files(tmp_path, 1, 2)
    size = max(p.stat().st_size for p in data) + 200  # Part 10 header written by the archive
    s = settings(
        tmp_path,
        [f"a={tmp_path / 'a'}", f"c={tmp_path / 'c'}"],
        1,
        1,
        roles=["c=cache"],
        capacities=[f"c={int(size * 1.5)}"],  # one object fits under the watermarks, not two
    )
    archive = Archive(s, probe_interval=0)
    try:
        for f in data:
            archive.ingest_file(f.read_bytes(), LOCAL)
        records = index_of(archive).instances(Query(Level.IMAGE))
        for r in records:  # cache fills whose archive copy nobody has verified
            cache_of(archive).fill(r, (tmp_path / "a" / r.copies[0].key).read_bytes(), None)
        assert len(list((tmp_path / "c").rglob("*.dcm"))) == 2  # above the high watermark...
        assert cache_of(archive).evict("c") == 0  # ...but the archive copies are unverified
        auditor(archive).run(threading.Event(), sites=["a"])  # now they are verified
        assert cache_of(archive).evict("c") == 1
        assert len(list((tmp_path / "c").rglob("*.dcm"))) == 1
        assert len(list((tmp_path / "a").rglob("*.dcm"))) == 2  # archives never evict
    finally:
        archive.close()


def test_audit_resumes_an_interrupted_pass(tmp_path: Path) -> None:
    s = settings(tmp_path, [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], 2, 2)
    archive = Archive(s, probe_interval=0)
    try:
        for f in files(tmp_path, 2, 3):
            archive.ingest_file(f.read_bytes(), LOCAL)
        first = auditor(archive).run(threading.Event(), limit=5)
        assert first.checked == 5 and not first.resumed
        rest = auditor(archive).run(threading.Event())
        assert rest.resumed and rest.checked == 12 - 5
        fresh = auditor(archive).run(threading.Event())
        assert not fresh.resumed and fresh.checked == 12  # a new pass checks everything
    finally:
        archive.close()


def test_a_scan_never_marks_the_copies_of_an_unmounted_site_missing(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    s = settings(tmp_path, [f"a={a}", f"b={b}"], 2, 2)
    archive = Archive(s, probe_interval=0)
    try:
        for f in files(tmp_path, 1, 2):
            archive.ingest_file(f.read_bytes(), LOCAL)
        b.rename(tmp_path / "b-away")
        b.mkdir()  # the empty mount point lists as empty
        repairer(archive).scan()
        assert not placement_of(archive).is_up("b")
        assert [(r.site, r.objects, r.missing) for r in index_of(archive).site_report()] == [
            ("a", 2, 0),
            ("b", 2, 0),
        ]
    finally:
        archive.close()


# ---------------------------------------------------------------------------- placement
site_specs = st.lists(
    st.tuples(st.sampled_from(["x", "y", "z"]), st.booleans()),  # (location, up)
    min_size=1,
    max_size=6,
)


@given(
    specs=site_specs,
    copies=st.integers(1, 4),
    states=st.lists(st.sampled_from(["none", "ok", "bad", "missing"]), min_size=6, max_size=6),
)
@settings_hyp(max_examples=200, deadline=None)
def test_repair_targets(specs: list[tuple[str, bool]], copies: int, states: list[str]) -> None:
    """Repair never targets a down site or one holding a good copy, asks for exactly the
    copies missing, and prefers a site that lost its copy, then a location not yet used."""
    from types import SimpleNamespace

    from pacsgrid.model import CopyRecord, InstanceRecord
    from pacsgrid.storage.filesystem import FilesystemSite
    from pacsgrid.storage.placement import Placement

    sites = [
        FilesystemSite(f"s{i}", Path(f"/nonexistent/s{i}"), location=loc)
        for i, (loc, _) in enumerate(specs)
    ]
    placement = Placement(sites, copies, 1)
    for site, (_, up) in zip(sites, specs, strict=True):
        if not up:
            placement.mark_down(site.name, "test")
    copies_held = tuple(
        CopyRecord(s.name, "k.dcm", 1, "h", 0.0, state)
        for s, state in zip(sites, states, strict=False)
        if state != "none"
    )
    record = InstanceRecord("1", "2", "3", "4", "5", 1, "h", {}, copies_held)
    fake = SimpleNamespace(
        settings=SimpleNamespace(
            repair=Settings().repair, replication=SimpleNamespace(copies=copies)
        ),
    )
    need, targets = Repairer(fake, None, placement).targets(record)  # type: ignore[arg-type]
    ok = {c.site for c in copies_held if c.state == "ok"}
    assert need == max(0, copies - len(ok))
    if need == 0:
        assert targets == []
        return
    names = [t.name for t in targets]
    assert len(set(names)) == len(names)
    assert all(placement.is_up(n) and n not in ok for n in names)
    assert set(names) == {s.name for s in sites if placement.is_up(s.name) and s.name not in ok}
    lost = {c.site for c in copies_held if c.state != "ok"}
    used = {placement.sites[n].location for n in ok}
    keys = [(t.name not in lost, t.location in used) for t in targets]
    assert keys == sorted(keys)
