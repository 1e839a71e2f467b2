"""Every image on several sites, with real parts: `pacsgrid serve` as a subprocess, DCMTK
storescu/movescu as clients, filesystem sites in temporary folders and S3 sites on a real
SeaweedFS server on loopback.

What is checked is what the archive promises: no acknowledged instance is lost when a site
fails, retrieves work from the surviving copies, a wiped site is rebuilt, a flipped byte is
found and healed with the evidence kept, a cache stays within its watermarks and refills, and
a store that cannot reach its quorum is refused with nothing acknowledged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.synth import Spec, write
from pacsgrid.index.sql_matching import Query
from pacsgrid.index.sqlite import SqliteIndex
from pacsgrid.model import InstanceRecord, Level
from tests import oracle
from tests.conftest import Server, StoreSCP, dcmtk, pacsgrid_cli
from tests.corpus import accepted
from tests.dcmtk_store import store_with_storescu
from tests.peers.seaweedfs import SeaweedFS
from tests.waiting import wait_until

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

_buckets = iter(range(10_000))


# ---------------------------------------------------------------------------- helpers
def site_args(sites: dict[str, str], copies: int, quorum: int, *extra: str) -> tuple[str, ...]:
    out: list[str] = []
    for name, url in sites.items():
        out += ["--site", f"{name}={url}"]
    return (*out, "--copies", str(copies), "--write-quorum", str(quorum), *extra)


def cli(data_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a `pacsgrid` command on the archive in `data_dir`."""
    return pacsgrid_cli(*args, "--data-dir", data_dir, timeout=timeout)


def records(data_dir: Path) -> dict[str, InstanceRecord]:
    index = SqliteIndex(data_dir / "index.sqlite")
    try:
        return {r.sop_uid: r for r in index.instances(Query(Level.IMAGE))}
    finally:
        index.close()


def count(data_dir: Path) -> int:
    if not (data_dir / "index.sqlite").exists():
        return 0
    index = SqliteIndex(data_dir / "index.sqlite")
    try:
        return index.stats().instances
    finally:
        index.close()


class Raw:
    """Reads and writes site contents behind pacsgrid's back (the test's own eyes)."""

    def __init__(self, weed: SeaweedFS | None = None) -> None:
        self.weed = weed

    def _s3(self, url: str) -> tuple[str, str]:
        rest = url[len("s3://") :].split("?")[0]
        bucket, _, prefix = rest.partition("/")
        return bucket, prefix.strip("/")

    def get(self, url: str, key: str) -> bytes:
        if url.startswith("s3://"):
            assert self.weed is not None
            bucket, prefix = self._s3(url)
            body = self.weed.client().get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"]
            return bytes(body.read())
        return (Path(url[len("file://") :]) / key).read_bytes()

    def put(self, url: str, key: str, data: bytes) -> None:
        if url.startswith("s3://"):
            assert self.weed is not None
            bucket, prefix = self._s3(url)
            self.weed.client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
        else:
            (Path(url[len("file://") :]) / key).write_bytes(data)

    def wipe_objects(self, url: str) -> int:
        """Delete every object of a site, keeping its sentinel; returns how many."""
        if url.startswith("s3://"):
            assert self.weed is not None
            bucket, prefix = self._s3(url)
            client = self.weed.client()
            n = 0
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/"
            ):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(".dcm"):
                        client.delete_object(Bucket=bucket, Key=obj["Key"])
                        n += 1
            return n
        root = Path(url[len("file://") :])
        n = len(list(root.rglob("*.dcm")))
        for child in root.iterdir():
            if child.is_dir() and not child.name.startswith("."):
                shutil.rmtree(child)
        return n


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unmount(root: Path) -> Path:
    """Make a filesystem site unreachable the way an unmounted NAS is: an empty mount point."""
    away = root.with_name(root.name + "-unmounted")
    root.rename(away)
    root.mkdir()
    return away


def remount(root: Path, away: Path) -> None:
    root.rmdir()
    away.rename(root)


def synth(out: Path, studies: int, instances: int = 5) -> list[Path]:
    return write(Spec(studies=studies, series=1, instances=instances, size=64, seed=out.name), out)


def storescu(
    port: int, files: list[Path], aet: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    return dcmtk(
        "storescu",
        "-v",
        "-nh",
        "-aet",
        aet,
        "-aec",
        "PACSGRID",
        "127.0.0.1",
        port,
        *files,
        timeout=300,
    )


def move_studies(
    port: int, studies: list[str], dest: str = "STORESCP"
) -> subprocess.CompletedProcess[str]:
    return dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        "PACSGRID",
        "-aem",
        dest,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID=" + "\\".join(studies),
        "127.0.0.1",
        port,
        timeout=300,
    )


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    s = StoreSCP(tmp_path / "move-destination").start()
    yield s
    s.stop()


def s3_url(weed: SeaweedFS, prefix: str = "pacs") -> str:
    return weed.url(weed.bucket(f"sites-{os.getpid()}-{next(_buckets)}"), prefix)


# ---------------------------------------------------------------------------- the tests
def test_site_lost_while_storing_the_corpus(
    tmp_path: Path, seaweedfs: SeaweedFS, scp: StoreSCP
) -> None:
    """Three sites (two folders, one S3 bucket), 3 copies, write quorum 2. Site b is
    unmounted while storescu sends the corpus: every instance storescu saw acknowledged is
    indexed with at least two good copies, a C-MOVE of every study works from the survivors,
    and once b is back the running server rebuilds it on its own."""
    a, b = tmp_path / "site-a", tmp_path / "site-b"
    sites = {"a": a.as_uri(), "b": b.as_uri(), "c": s3_url(seaweedfs)}
    server = Server(
        tmp_path / "archive",
        args=(
            *site_args(
                sites,
                3,
                2,
                *("--site-location", "a=campus-a", "--site-location", "b=campus-b"),
                *("--site-location", "c=cloud"),
            ),
            "--peer",
            "MOVESCU@127.0.0.1:9",
            "--peer",
            f"STORESCP@127.0.0.1:{scp.port}",
        ),
        env={"PACSGRID_REPLICATION_PROBE_INTERVAL": "1", "PACSGRID_REPAIR_INTERVAL": "5"},
    ).start()
    raw = Raw(seaweedfs)
    try:
        files = accepted()
        result: dict[str, object] = {}
        sender = threading.Thread(
            target=lambda: result.setdefault(
                "run", store_with_storescu(server.port, files, tmp_path)
            )
        )
        sender.start()
        wait_until(lambda: count(server.data_dir) >= 20, 120, "20 instances stored", every=0.05)
        away = unmount(b)
        sender.join(300)
        run = result["run"]
        assert not run.failed, f"stores refused while the quorum could be met: {run.failed}"  # type: ignore[attr-defined]
        model = oracle.build(run.stored)  # type: ignore[attr-defined]
        stored = records(server.data_dir)
        assert set(stored) == set(model.instances)  # every acknowledged instance is indexed
        on_b_before = sum(1 for r in stored.values() if any(c.site == "b" for c in r.copies))
        after_b = [r for r in stored.values() if all(c.site != "b" for c in r.copies)]
        assert all({c.site for c in r.copies} == {"a", "c"} for r in after_b)
        assert on_b_before < len(stored), "b was unmounted too late to matter"
        for r in stored.values():
            assert sum(1 for c in r.copies if c.state == "ok") >= 2, r.sop_uid  # the quorum
            surviving = [c for c in r.copies if c.site != "b"]
            assert surviving, r.sop_uid
            for c in surviving:
                assert sha(raw.get(sites[c.site], c.key)) == r.sha256
        # The write order is a, b (distinct locations, by name), so b was in every quorum
        # until it failed; after that the stores went to a and c.
        assert "site b is down" in server.text()

        proc = move_studies(server.port, sorted(model.studies))
        assert "Received Final Move Response (Success)" in proc.stdout, proc.stdout[-3000:]
        assert len(scp.files()) == len(model.instances)

        remount(b, away)  # b is back, missing what was stored while it was away

        def rebuilt() -> bool:
            rs = records(server.data_dir)
            return all(sum(1 for c in r.copies if c.state == "ok") == 3 for r in rs.values())

        wait_until(rebuilt, 120, "the running server rebuilt site b", every=0.5)
        for r in records(server.data_dir).values():
            (copy_b,) = [c for c in r.copies if c.site == "b"]
            assert sha(raw.get(sites["b"], copy_b.key)) == r.sha256
    finally:
        server.stop()
    print(
        f"\n{len(model.instances)} instances acknowledged; {len(model.instances) - on_b_before}"
        f" stored while site b was unmounted; b rebuilt by serve"
    )


def test_wiped_sites_are_rebuilt_by_repair(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """Every object of the S3 site deleted behind the archive's back: `pacsgrid repair`
    restores all of them. The folder site wiped whole (sentinel too) is down until
    `pacsgrid sites init` adopts it; then repair rebuilds it completely."""
    a = tmp_path / "site-a"
    sites = {"a": a.as_uri(), "b": s3_url(seaweedfs)}
    opts = site_args(sites, 2, 2)
    data = tmp_path / "archive"
    files = synth(tmp_path / "wipe-data", studies=6)
    server = Server(data, args=opts).start()
    try:
        proc = storescu(server.port, files)
        assert proc.returncode == 0, proc.stdout[-2000:]
    finally:
        server.stop()
    before = records(data)
    assert len(before) == len(files)
    raw = Raw(seaweedfs)

    assert raw.wipe_objects(sites["b"]) == len(files)
    proc = cli(data, "repair", *opts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"site b: {len(files)} recorded copies were gone" in proc.stdout
    assert f"repair: {len(files)} objects copied" in proc.stdout
    for r in records(data).values():
        for c in r.copies:
            assert c.state == "ok"
            assert sha(raw.get(sites[c.site], c.key)) == r.sha256

    shutil.rmtree(a)
    a.mkdir()  # a replaced, empty disk
    proc = cli(data, "sites", *opts)
    assert "a [archive, default]" in proc.stdout and "DOWN" in proc.stdout, proc.stdout
    assert "sites init a" in proc.stdout
    proc = cli(data, "repair", *opts)
    assert proc.returncode == 1 and "site a is DOWN" in proc.stdout, proc.stdout
    proc = cli(data, "sites", "init", "a", *opts)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(files)} object(s) queued" in proc.stdout
    proc = cli(data, "repair", *opts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = records(data)
    assert set(after) == set(before)
    for r in after.values():
        assert {c.site for c in r.copies if c.state == "ok"} == {"a", "b"}
        for c in r.copies:
            assert sha(raw.get(sites[c.site], c.key)) == r.sha256
    report = json.loads(cli(data, "sites", "--json", *opts).stdout)
    assert report["under_replicated"] == 0
    assert all(s["up"] and s["objects"] == len(files) for s in report["sites"])


def test_flipped_byte_is_found_quarantined_and_repaired(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    a = tmp_path / "site-a"
    sites = {"a": a.as_uri(), "b": s3_url(seaweedfs)}
    opts = site_args(sites, 2, 2)
    data = tmp_path / "archive"
    files = synth(tmp_path / "flip-data", studies=3)
    server = Server(data, args=opts).start()
    try:
        assert storescu(server.port, files).returncode == 0
    finally:
        server.stop()
    raw = Raw(seaweedfs)
    victims = sorted(records(data).values(), key=lambda r: r.sop_uid)[:2]
    originals = {}
    for victim, site in zip(victims, ("a", "b"), strict=True):
        (copy,) = [c for c in victim.copies if c.site == site]
        good = raw.get(sites[site], copy.key)
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x01
        raw.put(sites[site], copy.key, bytes(bad))
        originals[(site, copy.key)] = (good, bytes(bad))

    proc = cli(data, "audit", "--json", *opts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["counts"] == {"ok": 2 * len(files) - 2, "corrupt": 2}
    assert {(f["site"], f["key"]) for f in report["findings"]} == set(originals)
    assert all(f["repaired"] for f in report["findings"])
    for f in report["findings"]:
        good, bad = originals[(f["site"], f["key"])]
        assert raw.get(sites[f["site"]], f["key"]) == good  # recreated from the other site
        where = f["action"].split("quarantined as ")[1].split(";")[0]
        assert _evidence(raw, sites[f["site"]], where) == bad  # the damage is kept as evidence
    again = json.loads(cli(data, "audit", "--json", *opts).stdout)
    assert again["counts"] == {"ok": 2 * len(files)}


def _evidence(raw: Raw, url: str, where: str) -> bytes:
    if url.startswith("s3://"):
        assert raw.weed is not None
        bucket, prefix = raw._s3(url)
        return bytes(
            raw.weed.client().get_object(Bucket=bucket, Key=f"{prefix}/{where}")["Body"].read()
        )
    return (Path(url[len("file://") :]) / where).read_bytes()


def test_cache_stays_within_watermarks_and_refills(tmp_path: Path, scp: StoreSCP) -> None:
    files = synth(tmp_path / "cache-data", studies=6)
    study_size = sum(p.stat().st_size for p in files[:5])
    capacity = 3 * study_size
    a, cache = tmp_path / "site-a", tmp_path / "cache"
    config = tmp_path / "pacsgrid.toml"
    config.write_text(
        f"""
[[sites]]
name = "a"
url = "{a.as_uri()}"

[[sites]]
name = "cache"
url = "{cache.as_uri()}"
role = "cache"
capacity = {capacity}
high_watermark = 0.9
low_watermark = 0.5
"""
    )
    server = Server(
        tmp_path / "archive",
        config=config,
        args=("--peer", "MOVESCU@127.0.0.1:9", "--peer", f"STORESCP@127.0.0.1:{scp.port}"),
    ).start()
    try:
        assert storescu(server.port, files).returncode == 0
        by_study: dict[str, list[str]] = {}
        for r in records(server.data_dir).values():
            by_study.setdefault(r.study_uid, []).append(r.sop_uid)
        studies = sorted(by_study)
        assert not list(cache.rglob("*.dcm"))  # nothing is cached before it is read

        def cached_bytes() -> int:
            return sum(
                p.stat().st_size for p in cache.rglob("*.dcm") if ".quarantine" not in p.parts
            )

        peak = 0
        for study in studies:
            proc = move_studies(server.port, [study])
            assert "Received Final Move Response (Success)" in proc.stdout, proc.stdout[-2000:]
            peak = max(peak, cached_bytes())
            assert cached_bytes() <= 0.9 * capacity
        assert peak > 0.5 * capacity  # the cache was really used up to its watermarks
        first = set(by_study[studies[0]])
        in_cache = {
            r.sop_uid
            for r in records(server.data_dir).values()
            if any(c.site == "cache" for c in r.copies)
        }
        assert not first & in_cache, "the least recently used study should have been evicted"

        scp.clear()
        proc = move_studies(server.port, [studies[0]])
        assert "Received Final Move Response (Success)" in proc.stdout, proc.stdout[-2000:]
        assert len(scp.files()) == len(first)
        in_cache = {
            r.sop_uid
            for r in records(server.data_dir).values()
            if any(c.site == "cache" for c in r.copies)
        }
        assert first <= in_cache  # refilled
        assert cached_bytes() <= 0.9 * capacity
        # Every archive object is still there: a cache evicts, an archive site never does.
        assert len(list(a.rglob("*.dcm"))) == len(files)
    finally:
        server.stop()


def test_store_refused_when_quorum_cannot_be_met(tmp_path: Path) -> None:
    a, b = tmp_path / "site-a", tmp_path / "site-b"
    sites = {"a": a.as_uri(), "b": b.as_uri()}
    files = synth(tmp_path / "quorum-data", studies=2, instances=2)
    server = Server(
        tmp_path / "archive",
        args=site_args(sites, 2, 2),
        env={"PACSGRID_REPLICATION_PROBE_INTERVAL": "1"},
    ).start()
    try:
        away = unmount(b)
        proc = storescu(server.port, files[:2])
        responses = [line for line in proc.stdout.splitlines() if "Store Response" in line]
        assert len(responses) == 2 and all("Success" not in r for r in responses), proc.stdout
        assert all("Refused: OutOfResources" in r for r in responses), proc.stdout  # A700
        assert records(server.data_dir) == {}
        assert "1 healthy archive site(s), write quorum is 2" in server.text()  # the reason

        away_a = unmount(a)  # now every site is down
        wait_until(lambda: "site a is down" in server.text(), 60, "site a probed down")
        proc = storescu(server.port, files[2:])
        responses = [line for line in proc.stdout.splitlines() if "Store Response" in line]
        assert responses and all("Success" not in r for r in responses), proc.stdout
        assert records(server.data_dir) == {}

        remount(a, away_a)
        remount(b, away)
        wait_until(
            lambda: all(f"site {n} is up again" in server.text() for n in "ab"),
            60,
            "sites a and b probed up",
            seen=lambda: server.text()[-2000:],
        )
        proc = storescu(server.port, files)
        assert proc.returncode == 0 and proc.stdout.count("(Success)") == len(files), proc.stdout
        assert len(records(server.data_dir)) == len(files)
    finally:
        server.stop()


def test_s3_outage_refuses_then_recovers(tmp_path: Path) -> None:
    """An S3 site whose server stops: stores are refused while the quorum needs it, and
    accepted again once it is back."""
    weed = SeaweedFS(tmp_path / "weed").start()
    try:
        sites = {"a": (tmp_path / "site-a").as_uri(), "s3": s3_url(weed)}
        files = synth(tmp_path / "s3-data", studies=2, instances=2)
        server = Server(
            tmp_path / "archive",
            args=site_args(sites, 2, 2),
            env={"PACSGRID_REPLICATION_PROBE_INTERVAL": "1"},
        ).start()
        try:
            weed.stop()
            proc = storescu(server.port, files[:2])
            assert "(Success)" not in proc.stdout, proc.stdout
            assert records(server.data_dir) == {}
            weed.start()
            wait_until(lambda: "site s3 is up again" in server.text(), 60, "S3 probed up")
            proc = storescu(server.port, files)
            assert proc.stdout.count("(Success)") == len(files), proc.stdout
            for r in records(server.data_dir).values():
                assert {c.site for c in r.copies} == {"a", "s3"}
        finally:
            server.stop()
    finally:
        weed.stop()
