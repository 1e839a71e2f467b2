"""The `StorageSite` contract (pacsgrid.storage.base), run against every kind of site.

Filesystem sites use a temporary folder: with the write-ahead log (objects copied into their
records, the default for small ones), with every object staged in its own file (as large
ones are), and without the log (every object flushed on its own); the "-named" kinds are the
same on a filesystem without O_TMPFILE (NFS, SMB: the files are written under a temp name in
.incoming), which the local disk is made to be by refusing O_TMPFILE with EOPNOTSUPP, as those
filesystems do. S3 sites use a real SeaweedFS server on loopback (tests/peers/seaweedfs.py),
one fresh bucket per test.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacsgrid.errors import ObjectMissing, SiteUnavailable, StorageError
from pacsgrid.settings import DurabilitySettings, SiteSettings
from pacsgrid.storage import StorageSite, object_key, open_site
from tests.peers.seaweedfs import SeaweedFS

KINDS = (
    "filesystem",
    "filesystem-staged",
    "filesystem-direct",
    "filesystem-named",
    "filesystem-named-direct",
    "s3",
)
_bucket_numbers = itertools.count()


@dataclass
class Kit:
    """A site of one kind plus what a test needs to reach behind its back."""

    kind: str
    make: Callable[..., StorageSite]  # make(role="archive", fresh=False) -> a site
    raw_read: Callable[[str], bytes]  # read a path relative to the site root/prefix
    raw_write: Callable[[str, bytes], None]
    break_site: Callable[[], None]  # make the site unreachable
    remove_sentinel: Callable[[], None]


def refuse_o_tmpfile(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make the filesystem one without O_TMPFILE (NFS, SMB): open() with O_TMPFILE fails with
    EOPNOTSUPP, as it does there. Returns the folders it was refused for."""
    real_open = os.open
    refused: list[object] = []

    def no_tmpfile(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            refused.append(path)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_tmpfile)
    return refused


@pytest.fixture(params=KINDS)
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kit]:
    if request.param.startswith("filesystem"):
        root = tmp_path / "site"
        durability = DurabilitySettings(
            log=not request.param.endswith("-direct"),
            inline_kb=0 if request.param == "filesystem-staged" else 128,
        )
        if "-named" in request.param:
            refuse_o_tmpfile(request.getfixturevalue("monkeypatch"))

        def make_fs(role: str = "archive", fresh: bool = False, name: str = "fs") -> StorageSite:
            path = tmp_path / f"site-{next(_bucket_numbers)}" if fresh else root
            return open_site(SiteSettings(name=name, url=path.as_uri(), role=role), durability)

        def fs_break() -> None:
            root.rename(tmp_path / "unmounted")
            root.mkdir()  # an empty mount point, as an unmounted NAS shows

        def fs_write(rel: str, data: bytes) -> None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)

        yield Kit(
            request.param,
            make_fs,
            lambda rel: (root / rel).read_bytes(),
            fs_write,
            fs_break,
            lambda: (root / ".pacsgrid-site").unlink(),
        )
        return

    weed: SeaweedFS = request.getfixturevalue("seaweedfs")
    client = weed.client()
    bucket = weed.bucket(f"contract-{next(_bucket_numbers)}-{id(request) % 10000}")
    state = {"url": weed.url(bucket, "archive")}

    def make_s3(role: str = "archive", fresh: bool = False, name: str = "s3") -> StorageSite:
        url = weed.url(bucket, f"fresh{next(_bucket_numbers)}") if fresh else state["url"]
        return open_site(SiteSettings(name=name, url=url, role=role))

    def s3_break() -> None:
        # Same bucket, an endpoint where nothing listens: connection refused.
        from tests.conftest import free_port

        state["url"] = state["url"].replace(weed.endpoint, f"http://127.0.0.1:{free_port()}")

    yield Kit(
        "s3",
        make_s3,
        lambda rel: client.get_object(Bucket=bucket, Key=f"archive/{rel}")["Body"].read(),
        lambda rel, data: client.put_object(Bucket=bucket, Key=f"archive/{rel}", Body=data),
        s3_break,
        lambda: client.delete_object(Bucket=bucket, Key="archive/.pacsgrid-site"),
    )


KEY = object_key("1.2.3", "1.2.3.4", "1.2.3.4.5")


def _site(kit: Kit, role: str = "archive") -> StorageSite:
    site = kit.make(role=role)
    site.initialize()
    return site


def test_put_get_stat_list(kit: Kit) -> None:
    site = _site(kit)
    assert site.put(KEY, [b"DICM", b"-body"]).created
    assert site.get(KEY) == b"DICM-body"
    info = site.stat(KEY)
    assert info is not None and info.size == 9
    keys = [o.key for o in site.list()]
    assert keys == [KEY]  # never the sentinel, temp files or quarantine
    assert [o.key for o in site.list("1.2.3/")] == [KEY]
    assert list(site.list("9.9/")) == []
    assert site.check().ok


def test_large_object_from_views(kit: Kit) -> None:
    """A large object given as views (a spilled dataset's map): stored byte for byte, S3
    streaming it from the chunks rather than joining them."""
    blob = bytes(range(256)) * (40 << 10)  # 10 MB
    site = _site(kit)
    assert site.put(KEY, [b"DICM", memoryview(blob)[5:], b"tail"]).created  # type: ignore[list-item]
    assert site.get(KEY) == b"DICM" + blob[5:] + b"tail"


def test_put_never_clobbers_unless_replace(kit: Kit) -> None:
    site = _site(kit)
    assert site.put(KEY, [b"first"]).created is True
    assert site.put(KEY, [b"second"]).created is False
    assert site.get(KEY) == b"first"
    assert site.put(KEY, [b"third"], replace=True).created is True
    assert site.get(KEY) == b"third"


def test_concurrent_puts_agree_on_one_object(kit: Kit) -> None:
    site = _site(kit)
    results: list[bool] = []
    lock = threading.Lock()

    def put(n: int) -> None:
        r = site.put(KEY, [f"writer-{n}".encode() * 100])
        with lock:
            results.append(r.created)

    threads = [threading.Thread(target=put, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    data = site.get(KEY)
    assert data in {f"writer-{n}".encode() * 100 for n in range(8)}


def test_missing_objects(kit: Kit) -> None:
    site = _site(kit)
    with pytest.raises(ObjectMissing):
        site.get(KEY)
    assert site.stat(KEY) is None


def test_unsafe_keys_are_refused(kit: Kit) -> None:
    site = _site(kit)
    for key in ("../escape.dcm", "/abs.dcm", ".pacsgrid-site", "a/../../b.dcm"):
        with pytest.raises(StorageError):
            site.put(key, [b"x"])


def test_archive_sites_never_delete(kit: Kit) -> None:
    site = _site(kit)
    site.put(KEY, [b"keep me"])
    with pytest.raises(StorageError, match="never delete"):
        site.delete(KEY)
    assert site.get(KEY) == b"keep me"


def test_documents_are_listed_only_when_asked_and_purge_removes(kit: Kit) -> None:
    """The archive's own documents (corrections, .json) never appear among the objects; the
    one deletion an archive site takes is `purge` (the retention policy)."""
    site = _site(kit)
    site.put(KEY, [b"object"])
    site.put("_corrections/000000000001.json", [b"{}"])
    assert [o.key for o in site.list()] == [KEY]
    docs = [o.key for o in site.list("_corrections/", suffix=".json")]
    assert docs == ["_corrections/000000000001.json"]
    site.purge(KEY)
    assert site.stat(KEY) is None
    site.purge(KEY)  # purging what is gone is not an error
    assert site.get("_corrections/000000000001.json") == b"{}"


def test_cache_sites_delete(kit: Kit) -> None:
    cache = kit.make(role="cache", fresh=True, name="cache")
    cache.initialize()
    cache.put(KEY, [b"cached"])
    cache.delete(KEY)
    assert cache.stat(KEY) is None
    cache.delete(KEY)  # deleting what is gone is not an error


def test_quarantine_keeps_evidence_and_frees_the_key(kit: Kit) -> None:
    site = _site(kit)
    site.put(KEY, [b"damaged bytes"])
    first = site.quarantine(KEY, "sha256 mismatch")
    with pytest.raises(ObjectMissing):
        site.get(KEY)
    assert kit.raw_read(first) == b"damaged bytes"
    assert b"sha256 mismatch" in kit.raw_read(first + ".reason.txt")
    assert [o.key for o in site.list()] == []  # evidence is not an object of the site
    # The key is free again; a second quarantine never overwrites the first evidence.
    assert site.put(KEY, [b"damaged again"]).created
    second = site.quarantine(KEY, "again")
    assert second != first
    assert kit.raw_read(first) == b"damaged bytes"
    assert kit.raw_read(second) == b"damaged again"
    with pytest.raises(ObjectMissing):
        site.quarantine(KEY, "nothing there")


def test_initialize_is_idempotent_and_refuses_foreign_data(kit: Kit) -> None:
    site = _site(kit)
    site.put(KEY, [b"x"])
    site.initialize()  # again: fine, nothing lost
    assert site.get(KEY) == b"x"
    kit.remove_sentinel()
    health = site.check()
    assert not health.ok and "sites init" in health.reason
    with pytest.raises(SiteUnavailable, match=r"no \.pacsgrid-site"):
        kit.make().initialize()


def test_unreachable_site_is_unavailable(kit: Kit, tmp_path: Path) -> None:
    site = _site(kit)
    site.put(KEY, [b"x"])
    kit.break_site()
    broken = kit.make()
    assert not broken.check().ok
    with pytest.raises(SiteUnavailable):
        broken.put(object_key("9.8", "9.8.7", "9.8.7.6"), [b"y"])
    with pytest.raises(SiteUnavailable):
        broken.get(KEY)
    if kit.kind.startswith("filesystem"):
        # Nothing was created on the empty mount point.
        assert list((tmp_path / "site").iterdir()) == []


def test_writes_after_a_wipe_recreate_folders(kit: Kit) -> None:
    """A site whose objects were deleted behind its back takes writes again (repair)."""
    site = _site(kit)
    site.put(KEY, [b"x"])
    if kit.kind.startswith("filesystem"):
        import shutil

        root = Path(site.url[len("file://") :])
        shutil.rmtree(root / "1.2.3")
    else:
        kit.raw_write(KEY, b"")  # S3 has no folders; overwrite then remove via quarantine
        site.quarantine(KEY, "wipe")
    assert site.put(KEY, [b"again"]).created is True
    assert site.get(KEY) == b"again"


def test_s3_object_lock_keeps_every_version(seaweedfs: SeaweedFS) -> None:
    bucket = seaweedfs.bucket("locked-contract", object_lock=True)
    url = seaweedfs.url(bucket, "a") + "&retention_days=1"
    site = open_site(SiteSettings(name="locked", url=url))
    site.initialize()
    assert "secret" not in site.url
    site.put(KEY, [b"version one"])
    where = site.quarantine(KEY, "test")
    client = seaweedfs.client()
    versions = client.list_object_versions(Bucket=bucket, Prefix=f"a/{KEY}").get("Versions", [])
    assert any(v["Key"] == f"a/{KEY}" for v in versions)  # the bad version is still there
    with pytest.raises(Exception, match=r"AccessDenied|Access Denied"):
        client.delete_object(Bucket=bucket, Key=f"a/{KEY}", VersionId=versions[0]["VersionId"])
    assert client.get_object(Bucket=bucket, Key=f"a/{where}")["Body"].read() == b"version one"
    assert site.put(KEY, [b"version two"]).created  # a delete marker does not block no-clobber
    assert site.get(KEY) == b"version two"


def test_filesystem_without_o_tmpfile_writes_named_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem refuses O_TMPFILE (NFS, SMB), the site falls back to a named temp
    file in .incoming, once and for good, and leaves nothing behind there."""
    from pacsgrid.storage.filesystem import FilesystemSite

    site = FilesystemSite("nfs", tmp_path / "site")
    site.initialize()
    refused = refuse_o_tmpfile(monkeypatch)
    for n in range(3):
        key = object_key("1.2", "1.2.3", f"1.2.3.{n}")
        assert site.put(key, [b"DICM", bytes([n])]).created
        assert site.get(key) == b"DICM" + bytes([n])
    assert len(refused) == 1  # asked once, then named temp files
    assert list((tmp_path / "site" / ".incoming").iterdir()) == []
