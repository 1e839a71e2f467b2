"""/metrics, /health and robustness of the HTTP API.

- /metrics, with two DICOM worker processes: C-STORE counts made in the workers and STOW
  counts made in the supervisor both appear (prometheus multiprocess mode), with latency
  histograms, per-site operations, index size and the work queue;
- /health answers 200 while the write quorum is possible and 503 once the only site is gone;
- a bounded hypothesis fuzz of every route in the server's OpenAPI document: random path
  values, query parameters, headers and bodies never get a 5xx, and the server keeps serving.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server, dcmtk
from tests.corpus import accepted
from tests.waiting import wait_until
from tests.web_helpers import multipart_body, start_web


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
@pytest.mark.dcmtk
def test_metrics_from_workers_and_web(tmp_path: Path) -> None:
    server, base = start_web(tmp_path / "m", workers=2)
    try:
        plain = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
        ct_mr = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4")
        unique = {
            f.sop_uid: f
            for f in accepted()
            if f.transfer_syntax in plain and f.sop_class_uid in ct_mr
        }
        files = [f.path for f in list(unique.values())[:6]]
        stow = next(f for f in accepted() if f.sop_uid not in {u.sop_uid for u in unique.values()})
        proc = dcmtk("storescu", "-aec", "PACSGRID", "127.0.0.1", server.port, *files)
        assert proc.returncode == 0, proc.stdout
        body, ctype = multipart_body([stow.path.read_bytes()])
        r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
        assert r.status_code == 200
        text = requests.get(base + "/metrics").text
        assert _metric(text, "pacsgrid_ingest_total", service="dimse") == 6
        assert _metric(text, "pacsgrid_ingest_total", service="web") == 1
        assert _metric(text, "pacsgrid_ingest_seconds_count", service="dimse") == 6
        assert _metric(text, "pacsgrid_site_operations_total", site="local", op="put") == 7
        assert _metric(text, "pacsgrid_index_entities", level="instance") == 7
        assert _metric(text, "pacsgrid_site_up", site="local") == 1
        assert "pacsgrid_work_items" in text
        inst = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
        assert requests.get(inst).status_code == 200
        text = requests.get(base + "/metrics").text
        assert _metric(text, "pacsgrid_retrieve_total", service="web", outcome="success") == 1
    finally:
        server.stop()


@pytest.mark.slow
def test_health_follows_the_write_quorum(tmp_path: Path) -> None:
    server, base = start_web(tmp_path / "h")
    try:
        r = requests.get(base + "/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        (server.data_dir / "objects" / ".pacsgrid-site").rename(tmp_path / "sentinel")
        # /health re-probes the sites at most every 5 s: wait for the probe that sees it.
        wait_until(
            lambda: requests.get(base + "/health").status_code == 503,
            60,
            "/health answers 503 once the only site lost its sentinel",
        )
        r = requests.get(base + "/health")
        assert r.status_code == 503
        assert r.json()["writable_sites"] == 0
        (tmp_path / "sentinel").rename(server.data_dir / "objects" / ".pacsgrid-site")
    finally:
        server.stop()


# ---------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_target(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    server: Server
    server, base = start_web(tmp_path_factory.mktemp("fuzz") / "archive")
    f = accepted()[0]
    body, ctype = multipart_body([f.path.read_bytes()])
    requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
    doc = requests.get(base + "/openapi.json").json()
    routes = [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops]
    yield base, routes
    assert requests.get(base + "/health").status_code == 200, "the server stopped serving"
    server.stop()


_UID = st.one_of(
    st.sampled_from([accepted()[0].study_uid, accepted()[0].sop_uid, "1.2.3", "0"]),
    st.text(string.digits + ".", max_size=70),
    st.text(max_size=30),
)
_VALUE = st.one_of(st.text(max_size=40), st.sampled_from(["*", "-", "20200101-", "a\\b", "1,2"]))
_KEYS = st.sampled_from(
    [
        "PatientName",
        "StudyDate",
        "limit",
        "offset",
        "includefield",
        "fuzzymatching",
        "Modality",
        "00100010",
        "StudyInstanceUID",
        "viewport",
        "window",
        "quality",
        "requestType",
        "studyUID",
        "seriesUID",
        "objectUID",
        "contentType",
        "frameNumber",
        "x",
    ]
)
_ACCEPT = st.sampled_from(
    [
        "",
        "*/*",
        "application/dicom+json",
        'multipart/related; type="application/dicom"',
        "multipart/related; type=application/octet-stream; transfer-syntax=*",
        "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2",
        "image/png",
        "image/gif",
        "text/html",
        ";;;",
        'multipart/related; type="',
    ]
)
_CTYPE = st.sampled_from(
    [
        "",
        "application/dicom",
        "multipart/related; type=application/dicom; boundary=b",
        "multipart/related; boundary=",
        "application/json",
        'multipart/related; boundary="b',
    ]
)
_BODY = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"--b\r\n\r\nx\r\n--b--",
            b"--b\r\nContent-Type: application/dicom\r\n\r\n"
            + accepted()[0].path.read_bytes()[:500]
            + b"\r\n--b--\r\n",
            b"{}",
            b"",
        ]
    ),
)


@pytest.mark.slow
@settings(
    max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(data=st.data())
def test_fuzz_no_server_errors(
    fuzz_target: tuple[str, list[tuple[str, str]]], data: st.DataObject
) -> None:
    base, routes = fuzz_target
    method, template = data.draw(st.sampled_from(routes))
    path = re.sub(r"\{[^}]+\}", lambda _m: requests.utils.quote(data.draw(_UID), safe=""), template)
    params = data.draw(st.dictionaries(_KEYS, _VALUE, max_size=4))
    headers = {"Accept": data.draw(_ACCEPT)}
    body = b""
    if method in ("POST", "PUT"):
        headers["Content-Type"] = data.draw(_CTYPE)
        body = data.draw(_BODY)
    r = requests.request(method, base + path, params=params, headers=headers, data=body, timeout=30)
    assert r.status_code < 500, (method, path, params, headers, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["Content-Type"].startswith("application/problem+json"), r.text[:200]


def test_jobs_and_failures_pages_show_the_work_queue(tmp_path: Path) -> None:
    from pacsgrid.index.sqlite import SqliteIndex

    server, base = start_web(tmp_path / "jobs")
    try:
        index = SqliteIndex(server.data_dir / "index.sqlite")
        try:
            index.enqueue("repair", [(f"item{i}", "") for i in range(10)])
            claimed = index.claim("repair", "test", 4, 60)
            index.complete([w.pk for w in claimed[:3]])
            index.fail(claimed[3].pk, "copy on site-b does not match its SHA-256", None)
        finally:
            index.close()
        html = requests.get(base + "/ui/jobs").text
        row = re.search(r"<tr><td>repair</td>(.*?)</tr>", html)
        assert row is not None, html
        cells = re.findall(r"<td>(.*?)</td>", row.group(1))
        assert cells[:4] == ["6", "3", "1", "40.0%"]
        failures = requests.get(base + "/ui/failures").text
        assert "does not match its SHA-256" in failures
        metrics = requests.get(base + "/metrics").text
        assert _metric(metrics, "pacsgrid_work_items", kind="repair", state="pending") == 6
    finally:
        server.stop()


def test_a_costly_total_is_refreshed_in_proportion_to_its_cost() -> None:
    """On a large index the totals take seconds to compute: an expired value is not
    recomputed (in the background) until COST_FACTOR times that cost has passed, so that
    an open dashboard does not scan the index back to back."""
    import asyncio
    import time

    from pacsgrid.web.context import COST_FACTOR, WebContext

    calls: list[int] = []

    def total() -> int:
        calls.append(1)
        return len(calls)

    async def run() -> tuple[int, int, int]:
        ctx = WebContext(archive=None)  # type: ignore[arg-type]  # cached() needs none
        try:
            age = 6.0  # seconds since the value was computed: past the ttl of 5
            ctx._values["totals"] = (time.monotonic() - age, 0)
            ctx._cost["totals"] = age / COST_FACTOR * 2  # it cost more than age/COST_FACTOR
            kept = await ctx.cached("totals", 5.0, total)
            ctx._cost["totals"] = 0.001  # cheap: refreshed once expired
            stale = await ctx.cached("totals", 5.0, total)
            await asyncio.gather(*ctx._tasks)
            fresh = await ctx.cached("totals", 5.0, total)
            return kept, stale, fresh
        finally:
            ctx.executor.shutdown()

    assert asyncio.run(run()) == (0, 0, 1)
    assert len(calls) == 1
