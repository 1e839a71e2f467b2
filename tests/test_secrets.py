"""An S3 site's credentials never show: one run of the real archive on a real SeaweedFS, with
every output of it searched for the secret key and the access key.

The run: `pacsgrid serve` (two workers, web face) with a folder site and an S3 site given on
the command line with their keys; storescu and STOW-RS store instances; the dashboard pages,
/metrics, /health and the OpenAPI document are fetched; `status`, `sites` (text and JSON),
`audit`, `repair`, `backup`, `reindex --reconcile` run; then configurations that are wrong
on purpose (an S3 URL without a bucket, a `--site` without a name, an unknown scheme) fail
with their one line. Searched: every stdout and stderr, every HTTP body, the server's log, the
audit log and every other file under the data folder (the index and its backups included).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from bench.synth import Spec, write
from tests.conftest import dcmtk, pacsgrid_cli
from tests.corpus import accepted
from tests.peers.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.web_helpers import multipart_body, start_web

SECRETS = (SECRET_KEY.encode(), ACCESS_KEY.encode() + b"&", b"access_key=" + ACCESS_KEY.encode())


def _clean(what: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in SECRETS:
        assert secret not in data, f"{what} shows {secret!r}:\n{data[:3000]!r}"


@pytest.mark.slow
def test_s3_credentials_never_show(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    bucket = seaweedfs.bucket(f"secrets-{os.getpid()}")
    url = seaweedfs.url(bucket, "pacs")
    assert SECRET_KEY in url
    data = tmp_path / "archive"
    site_args = ("--site", f"local={tmp_path / 'local'}", "--site", f"cloud={url}")
    opts = (*site_args, "--copies", "2", "--write-quorum", "2")
    outputs: list[tuple[str, str | bytes]] = []
    server, base = start_web(data, workers=2, extra=opts)
    try:
        files = write(Spec(studies=1, series=1, instances=4, size=16, seed="keys"), tmp_path / "s")
        stored = dcmtk("storescu", "-aec", "PACSGRID", "127.0.0.1", server.port, *files)
        assert stored.returncode == 0, stored.stdout
        outputs.append(("storescu", stored.stdout))
        body, ctype = multipart_body([accepted()[0].path.read_bytes()])
        r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        for path in ("/", "/ui/sites", "/ui/jobs", "/ui/failures", "/metrics", "/health"):
            page = requests.get(base + path, timeout=60)
            assert page.status_code == 200, (path, page.text[:300])
            outputs.append((path, page.content))
        assert "cloud" in requests.get(base + "/ui/sites", timeout=60).text
        outputs.append(("openapi", requests.get(base + "/openapi.json", timeout=60).content))
        for args in (
            ("status",),
            ("status", "--json"),
            ("sites",),
            ("sites", "--json"),
            ("audit",),
            ("repair",),
            ("backup",),
            ("reindex", "--reconcile"),
        ):
            done = pacsgrid_cli(*args, "--data-dir", data, *opts)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
            outputs += [(f"{args} stdout", done.stdout), (f"{args} stderr", done.stderr)]
        assert bucket in pacsgrid_cli("sites", "--data-dir", data, *opts).stdout
    finally:
        server.stop()
    for wrong, key in (
        (("--site", f"cloud=s3://?secret_key={SECRET_KEY}"), "sites.cloud.url"),
        (("--site", f"s3://{bucket}/x?secret_key={SECRET_KEY}"), "sites[0].name"),
        (("--site", f"cloud=ftp://{bucket}/x?secret_key={SECRET_KEY}"), "sites[0].url"),
    ):
        failed = pacsgrid_cli("status", "--data-dir", tmp_path / "wrong", *wrong)
        assert failed.returncode == 2 and f"config error: {key}" in failed.stderr, failed.stderr
        outputs.append((f"config error {key}", failed.stderr))
    outputs.append(("serve log", server.text()))
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        outputs.append((str(path.relative_to(data)), path.read_bytes()))
    assert any(name == "audit.jsonl" for name, _ in outputs)
    assert "cloud=s3://" in server.text()  # the site is named in the log, without its keys
    for what, text in outputs:
        _clean(what, text)
