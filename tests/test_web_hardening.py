"""The web face against hostile or broken clients, with a real `pacsgrid serve` and raw sockets.

- a NUL anywhere in a path is a 400, never a 500 (the viewer's file lookup used to raise);
- a client that stops sending its request head, or its body, is cut off after
  `http.idle_timeout` / `http.body_timeout` (408 for a body), and the server keeps serving;
- a Content-Length above `http.max_upload` is answered 413 before any of the body is sent;
- QIDO-RS refuses what cannot match (a date that is not a date, a malformed UID in the path or
  the query, a computed count as a filter) with a 400 naming the key;
- a request aiohttp cannot parse gets a problem document that repeats none of it;
- a STOW-RS of several parts holds about one copy of the request in memory (peak RSS).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench.synth import Spec, write
from tests.conftest import Server
from tests.corpus import accepted
from tests.web_helpers import multipart_body, start_web

MAX_UPLOAD = 50 << 20


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    root = tmp_path_factory.mktemp("hardening")
    viewer = root / "viewer"
    viewer.mkdir()
    (viewer / "index.html").write_text('<html><script src="/app.js"></script></html>')
    (viewer / "app.js").write_text("// the viewer")
    server, base = start_web(
        root / "archive",
        extra=("--viewer", str(viewer)),
        env={
            "PACSGRID_HTTP_IDLE_TIMEOUT": "2",
            "PACSGRID_HTTP_BODY_TIMEOUT": "2",
            "PACSGRID_HTTP_MAX_UPLOAD": str(MAX_UPLOAD),
        },
    )
    f = accepted()[0]
    body, ctype = multipart_body([f.path.read_bytes()])
    r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    yield server, base
    server.stop()


def _raw(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (30 s bound per read)."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def _stow_head(content_length: int) -> bytes:
    return (
        b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
        b'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
        + f"Content-Length: {content_length}\r\n\r\n".encode()
    )


def _problem(r: requests.Response) -> dict[str, object]:
    assert r.headers["Content-Type"].startswith("application/problem+json"), r.text[:200]
    body: dict[str, object] = r.json()
    return body


@pytest.mark.parametrize(
    "path",
    [
        "/viewer/%00",
        "/viewer/a%00b.js",
        "/%00",
        "/app.js%00",
        "/dicom-web/studies/%00",
        "/dicom-web/studies/1.2%00/series",
        "/dicom-web/studies/1.2/series/%00/instances",
    ],
)
def test_a_nul_in_the_path_is_a_400(web: tuple[Server, str], path: str) -> None:
    _, base = web
    r = requests.get(base + path, timeout=30)
    assert r.status_code == 400, (path, r.status_code, r.text[:200])
    assert "NUL" in str(_problem(r)["detail"])
    assert requests.get(base + "/viewer/app.js", timeout=30).status_code == 200


@pytest.mark.slow
def test_stalled_request_head_is_closed(web: tuple[Server, str]) -> None:
    _, base = web
    with _raw(base) as sock:
        sock.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n")
        assert _until_closed(sock) == b""  # closed, after http.idle_timeout, with no answer
    with _raw(base) as sock:  # a connection that never says anything is closed too
        assert _until_closed(sock) == b""
    assert requests.get(base + "/health", timeout=30).status_code == 200


@pytest.mark.slow
def test_stalled_body_gets_408(web: tuple[Server, str]) -> None:
    _, base = web
    with _raw(base) as sock:
        sock.sendall(_stow_head(100_000) + b"--b\r\nContent-Type: application/dicom\r\n\r\n")
        answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"http.body_timeout" in answer
    assert requests.get(base + "/health", timeout=30).status_code == 200


def test_oversized_body_is_refused_before_it_is_sent(web: tuple[Server, str]) -> None:
    _, base = web
    with _raw(base) as sock:
        sock.sendall(_stow_head(MAX_UPLOAD + 1))
        head = sock.recv(65536)  # no byte of the body was sent: the answer comes at once
    assert head.startswith(b"HTTP/1.1 413 "), head[:200]
    assert b"http.max_upload" in head


def test_chunked_body_beyond_the_limit_is_413(web: tuple[Server, str]) -> None:
    _, base = web

    def chunks() -> Iterator[bytes]:
        yield b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(MAX_UPLOAD // (1 << 20) + 2):
            yield b"\0" * (1 << 20)

    ctype = 'multipart/related; type="application/dicom"; boundary=b'
    try:
        r = requests.post(
            base + "/dicom-web/studies", data=chunks(), headers={"Content-Type": ctype}, timeout=60
        )
    except requests.ConnectionError:
        pass  # the server may close before the client has sent everything
    else:
        assert r.status_code == 413, r.text[:200]
    assert requests.get(base + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/dicom-web/studies?StudyDate=abc", "StudyDate"),
        ("/dicom-web/studies?StudyDate=2020-abc", "StudyDate"),
        ("/dicom-web/studies?StudyTime=25h", "StudyTime"),
        ("/dicom-web/studies?StudyInstanceUID=1.2.abc", "StudyInstanceUID"),
        ("/dicom-web/studies?NumberOfStudyRelatedInstances=3", "NumberOfStudyRelatedInstances"),
        ("/dicom-web/instances?InstanceNumber=one", "InstanceNumber"),
        ("/dicom-web/studies/1.2.abc/series", "StudyInstanceUID"),
        ("/dicom-web/studies/1.2.3/series/x.y/instances", "SeriesInstanceUID"),
        ("/dicom-web/studies/1.2.x/series/1.2.3/instances/1.2.3", "study"),
    ],
)
def test_qido_and_wado_refuse_values_that_cannot_match(
    web: tuple[Server, str], path: str, key: str
) -> None:
    _, base = web
    r = requests.get(base + path, timeout=30)
    assert r.status_code == 400, (path, r.status_code, r.text[:300])
    problem = _problem(r)
    assert str(problem["detail"]).startswith(key), problem
    assert problem["invalid-params"] == [
        {"name": key, "reason": problem["invalid-params"][0]["reason"]}
    ]  # type: ignore[index]


def test_qido_still_answers_valid_keys(web: tuple[Server, str]) -> None:
    _, base = web
    f = accepted()[0]
    for query in (
        "StudyDate=19000101-",
        "StudyDate=-20991231",
        "StudyDate=",
        "StudyTime=0000-2359",
        f"StudyInstanceUID={f.study_uid}",
        f"StudyInstanceUID=1.2.3,{f.study_uid}",
        "NumberOfStudyRelatedInstances=",
        "PatientName=*",
    ):
        r = requests.get(f"{base}/dicom-web/studies?{query}", timeout=30)
        assert r.status_code == 200, (query, r.text[:300])
        assert any(s["0020000D"]["Value"] == [f.study_uid] for s in r.json()), (
            f"{query} lost the study"
        )


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /<script>alert(1)</script> HTTP/1.1\x01\r\n",
        b"<script>alert(1)</script> / HTTP/1.1\r\n",
        b"GET /x HTTP/1.1\r\nBad\x00Header<script>: 1\r\n",
    ],
)
def test_unparseable_requests_are_not_reflected(
    web: tuple[Server, str], request_line: bytes
) -> None:
    _, base = web
    with _raw(base) as sock:
        sock.sendall(request_line + b"Host: x\r\n\r\n")
        answer = _until_closed(sock)
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), answer[:300]
    assert b"application/problem+json" in answer
    assert b"script" not in answer and b"alert" not in answer, answer
    assert requests.get(base + "/health", timeout=30).status_code == 200


def _rss(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


@pytest.mark.slow
def test_stow_holds_about_one_copy_of_the_request(tmp_path: Path) -> None:
    """Ten 5 MB instances in one request: the server's peak memory grows by about the
    request's size (it grew by 2.9 times the size when the body was read whole and then cut
    into parts)."""
    files = write(Spec(studies=1, series=1, instances=10, size=1581, seed="stow-rss"), tmp_path)
    body, ctype = multipart_body([p.read_bytes() for p in files])
    server, base = start_web(tmp_path / "archive")
    try:
        small, small_type = multipart_body([accepted()[0].path.read_bytes()])
        requests.post(base + "/dicom-web/studies", data=small, headers={"Content-Type": small_type})
        assert server.proc is not None
        resting, _ = _rss(server.proc.pid)
        r = requests.post(
            base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype}, timeout=300
        )
        assert r.status_code == 200, r.text[:300]
        assert len(r.json()["00081199"]["Value"]) == len(files)
        _, peak = _rss(server.proc.pid)
    finally:
        server.stop()
    growth = peak - resting
    print(f"\nSTOW of {len(body) / 1e6:.0f} MB: peak RSS grew {growth / 1e6:.0f} MB")
    assert growth < 1.6 * len(body), f"{growth / len(body):.2f} times the request"
