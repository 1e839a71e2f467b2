"""Objects whose every copy went bad, with the real server, storescu, and SeaweedFS.

- S3 Object Lock: a bad version written over a good one (Object Lock keeps the good one):
  `audit` quarantines the bad version and makes the good one current again; nothing is left
  without a good copy, and the next audit and repair find nothing to do;
- a site without versions (a folder): the only copy flipped; `audit` cannot recreate it, and
  `audit` (every pass, not only the first), `repair` (not "waiting for a site") and `sites`
  keep naming it with a non-zero exit, until a good copy is back; then `repair` takes it in
  again and every command is at 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.peers.seaweedfs import SeaweedFS
from tests.test_sites import Raw, cli, records, sha, site_args, storescu, synth

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _store(tmp_path: Path, opts: tuple[str, ...]) -> Path:
    data = tmp_path / "archive"
    files = synth(tmp_path / "src", studies=2, instances=3)
    server = Server(data, args=opts).start()
    try:
        assert storescu(server.port, files).returncode == 0
    finally:
        server.stop()
    return data


def test_object_lock_keeps_the_good_version_and_audit_restores_it(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    bucket = seaweedfs.bucket(f"locked-{os.getpid()}", object_lock=True)
    url = seaweedfs.url(bucket, "pacs") + "&retention_days=1"
    opts = site_args({"cloud": url}, 1, 1)
    data = _store(tmp_path, opts)
    raw = Raw(seaweedfs)
    victim = sorted(records(data).values(), key=lambda r: r.sop_uid)[0]
    (copy,) = victim.copies
    good = raw.get(url, copy.key)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    raw.put(url, copy.key, bytes(bad))  # a new version; Object Lock keeps the old one
    assert raw.get(url, copy.key) == bytes(bad)

    proc = cli(data, "audit", "--json", *opts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["counts"]["corrupt"] == 1
    (finding,) = report["findings"]
    assert finding["repaired"] and "older good version on cloud restored" in finding["action"]
    assert report["without_good_copy"] == []
    assert raw.get(url, copy.key) == good
    assert sha(raw.get(url, copy.key)) == victim.sha256
    (again,) = records(data)[victim.sop_uid].copies
    assert again.state == "ok"
    proc = cli(data, "audit", "--restart", "--json", *opts)
    assert proc.returncode == 0 and json.loads(proc.stdout)["counts"] == {"ok": 6}
    repair = cli(data, "repair", *opts)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "0 without a good copy" in repair.stdout


def test_an_object_without_a_good_copy_is_reported_until_it_has_one(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    opts = site_args({"only": folder.as_uri()}, 1, 1)
    data = _store(tmp_path, opts)
    victim = sorted(records(data).values(), key=lambda r: r.sop_uid)[0]
    (copy,) = victim.copies
    path = folder / copy.key
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    path.write_bytes(bytes(bad))
    line = f"NO GOOD COPY on any site: {victim.sop_uid}"

    first = cli(data, "audit", *opts)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "NOT recreated, no good copy on any site" in first.stdout
    assert line in first.stdout
    for args in (("audit",), ("audit", "--restart"), ("audit", "--limit", "1")):
        later = cli(data, *args, *opts)
        assert later.returncode == 1 and line in later.stdout, (args, later.stdout)
    audit_json = json.loads(cli(data, "audit", "--json", *opts).stdout)
    assert audit_json["without_good_copy"] == [victim.sop_uid]
    repair = cli(data, "repair", *opts)
    assert repair.returncode == 1 and line in repair.stdout, repair.stdout
    assert "0 waiting for a site" in repair.stdout and "1 without a good copy" in repair.stdout
    sites = cli(data, "sites", *opts)
    assert sites.returncode == 1, sites.stdout
    assert "NO GOOD COPY on any site: 1 object(s)" in sites.stdout
    assert json.loads(cli(data, "sites", "--json", *opts).stdout)["without_good_copy"] == 1

    evidence = [p for p in (folder / ".quarantine").rglob("*.dcm")]
    assert [p.read_bytes() for p in evidence] == [bytes(bad)]  # the damage is kept
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(good)  # the operator brings a good copy back (from a backup tape)
    repair = cli(data, "repair", *opts)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    for args in (("audit", "--restart"), ("sites",)):
        done = cli(data, *args, *opts)
        assert done.returncode == 0 and "NO GOOD COPY" not in done.stdout, (args, done.stdout)
