"""S3 on a real SeaweedFS cluster (pacsgrid.drill.seaweed: one master, three volume servers, a filer
and its S3 gateway, replication 001): large objects go up as multipart uploads that are
all-or-nothing and no-clobber; a volume server that dies during ingest loses no acknowledged
instance, and retrieves keep working while it is gone."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import synth
from pacsgrid.settings import SiteSettings
from pacsgrid.storage.s3 import S3Site
from tests.conftest import Server, dcmtk
from tests.peers.seaweedfs import SeaweedCluster
from tests.senders import Sent, send_while, sop_uid, storescu
from tests.test_pg_cluster import check_retrievable

pytestmark = [pytest.mark.slow]

MB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    weed = SeaweedCluster(tmp_path_factory.mktemp("weed-cluster")).start()
    yield weed
    weed.stop()


def site(weed: SeaweedCluster, bucket: str, extra: str = "") -> S3Site:
    weed.bucket(bucket)
    s = S3Site.from_settings(SiteSettings(name="cluster", url=weed.url(bucket, "p") + extra))
    s.initialize()
    return s


def test_large_object_goes_up_in_parts_and_reads_back_in_one_buffer(
    cluster: SeaweedCluster,
) -> None:
    s3 = site(cluster, "multipart")
    data = os.urandom(20 * MB)
    assert s3.put("st/se/big.dcm", [data[: 3 * MB], data[3 * MB :]]).created
    head = cluster.client().head_object(Bucket="multipart", Key="p/st/se/big.dcm")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three 8 MB parts
    small = os.urandom(MB)
    assert s3.put("st/se/small.dcm", [small]).created
    head = cluster.client().head_object(Bucket="multipart", Key="p/st/se/small.dcm")
    assert "-" not in head["ETag"], head["ETag"]  # one PUT

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        got = s3.get("st/se/big.dcm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == data
    assert peak < 1.25 * len(data), f"reading 20 MB took {peak / MB:.1f} MB"

    # No-clobber holds for multipart uploads too, and the refused upload leaves no parts.
    other = os.urandom(17 * MB)
    assert not s3.put("st/se/big.dcm", [other]).created
    assert s3.get("st/se/big.dcm") == data
    uploads = cluster.client().list_multipart_uploads(Bucket="multipart")
    assert not uploads.get("Uploads"), uploads["Uploads"]
    assert s3.put("st/se/big.dcm", [other], replace=True).created
    assert s3.get("st/se/big.dcm") == other


def test_part_size_setting(cluster: SeaweedCluster) -> None:
    s3 = site(cluster, "parts", "&multipart_mb=5")
    data = os.urandom(11 * MB)
    assert s3.put("a/b/c.dcm", [data]).created
    head = cluster.client().head_object(Bucket="parts", Key="p/a/b/c.dcm")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
    assert s3.get("a/b/c.dcm") == data
    from pacsgrid.errors import ConfigError

    with pytest.raises(ConfigError, match="multipart_mb must be at least 5"):
        S3Site.from_settings(SiteSettings(name="x", url=cluster.url("parts") + "&multipart_mb=1"))


def volume_bytes(weed: SeaweedCluster, i: int) -> int:
    return sum(p.stat().st_size for p in (weed.workdir / f"volume{i}").glob("*.dat"))


def getscu_study(port: int, study: str, out: Path) -> int:
    """Instances a getscu C-GET of `study` brought back, each byte-compared by the caller."""
    out.mkdir(parents=True)
    proc = dcmtk(
        "getscu", "-S", "-aet", "GETSCU", "-aec", "PACSGRID", "-od", out,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "127.0.0.1", port,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    return len(list(out.iterdir()))


@pytest.mark.dcmtk
def test_volume_server_lost_during_ingest(tmp_path: Path) -> None:
    files = synth.write(synth.Spec(studies=8, series=2, instances=5, size=64), tmp_path / "in")
    weed = SeaweedCluster(tmp_path / "weed").start()
    server: Server | None = None
    try:
        bucket = weed.bucket("ingest")
        url = weed.url(bucket, "archive")
        cfg = tmp_path / "archive.toml"
        cfg.write_text(f'[[sites]]\nname = "cluster"\nurl = "{url}"\n')
        args = ("--peer", "GETSCU@127.0.0.1:9")
        server = Server(tmp_path / "archive", config=cfg, args=args).start()
        batches = [files[i : i + 8] for i in range(0, len(files), 8)]
        results: list[Sent] = [storescu(server.port, batches[0])]
        assert results[0].stored and not results[0].failed, results[0].failed
        # The volume server holding the most data dies while the next association stores.
        victim = max(range(3), key=lambda i: volume_bytes(weed, i))
        held = volume_bytes(weed, victim)
        assert held > 0, "no volume server holds data yet"
        client = weed.client()

        def stored_more() -> bool:
            listing = client.list_objects_v2(Bucket=bucket, Prefix="archive/")
            return int(listing.get("KeyCount", 0)) > len(batches[0]) + 2

        p = server.port
        results.append(
            send_while(
                lambda: storescu(p, batches[1]), stored_more, lambda: weed.kill_volume(victim)
            )
        )
        results += [storescu(p, b) for b in batches[2:]]
        # What was refused meanwhile is sent again, as a modality would.
        retry = [f for r in results for f in r.failed]
        final = storescu(p, retry) if retry else Sent()
        assert not final.failed, final.failed
        acked = [f for r in results for f in r.stored] + final.stored
        assert {sop_uid(f) for f in acked} == {sop_uid(f) for f in files}

        # Retrieves keep working with the volume server still gone: every study by C-GET,
        # every instance byte for byte.
        sent = {sop_uid(f): f.read_bytes() for f in files}
        got = 0
        for n, study in enumerate(sorted({str(_study(f)) for f in files})):
            out = tmp_path / f"get{n}"
            got += getscu_study(p, study, out)
            for path in out.iterdir():
                uid = sop_uid(path)
                assert _dataset(path.read_bytes()) == _dataset(sent[uid]), uid
        assert got == len(files)
        server.stop()
        server = None
        sops = {sop_uid(f) for f in acked}
        check_retrievable(tmp_path / "archive", None, sops, cfg)
        print(
            f"\nvolume server {victim} ({held / MB:.1f} MB of volumes) killed during ingest: "
            f"{len(retry)} stores refused and sent again, all {len(acked)} acknowledged "
            f"instances retrieved byte for byte with it gone"
        )
    finally:
        if server is not None:
            server.stop()
        weed.stop()


def _study(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _dataset(part10: bytes) -> bytes:
    """The dataset of a Part 10 file (what was sent and what came back, without the file
    meta header a receiver writes its own way)."""
    from pacsgrid.dicomfile.part10 import split_part10

    return part10[split_part10(part10).dataset_offset :]
