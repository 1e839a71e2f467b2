"""Security of the web face and DICOM TLS, with real clients.

- auth: every route refuses requests without credentials, with a wrong token, and (write and
  admin routes) a read-only user; the audit log records allowed and refused actions alike,
  with the user, the source address, the operation and the study;
- DICOM TLS: DCMTK echoscu/storescu with +tls reach the TLS port; a plain connection to it
  fails, and the plain port still works;
- HTTPS with the same certificate.
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import Server, StoreSCP, dcmtk, free_port
from tests.corpus import accepted, pixel_data
from tests.senders import c_get, c_move
from tests.waiting import wait_until
from tests.web_helpers import audit_records, multipart_body, start_web, users

PACSGRID = [sys.executable, "-m", "pacsgrid"]


@dataclass
class Secured:
    server: Server
    base: str
    reader: str  # Basic header value
    writer_token: str
    admin: str
    study: str
    instance_url: str


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    data = tmp_path_factory.mktemp("secured") / "archive"
    data.mkdir()
    users(data, "add", "reader", "--role", "read", "--password-stdin", stdin="r-secret\n")
    users(data, "add", "writer", "--role", "write", "--no-password")
    users(data, "add", "boss", "--role", "admin", "--password-stdin", stdin="b-secret\n")
    token = users(data, "token", "writer", "--label", "test")
    assert token.startswith("pgt_")
    # Every route is tried with a wrong password: more than http.login_failures from one
    # address (the back-off itself is tested in test_web_logins).
    server, base = start_web(
        data, extra=("--auth", "on"), env={"PACSGRID_HTTP_LOGIN_FAILURES": "10000"}
    )
    f = accepted()[0]
    body, ctype = multipart_body([f.path.read_bytes()])
    r = requests.post(
        base + "/dicom-web/studies",
        data=body,
        headers={"Content-Type": ctype, "Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    url = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    yield Secured(
        server,
        base,
        _basic("reader", "r-secret"),
        token,
        _basic("boss", "b-secret"),
        f.study_uid,
        url,
    )
    server.stop()


def _routes(s: Secured) -> list[tuple[str, str, str]]:
    """(method, url, role needed) of every route in the server's own OpenAPI document."""
    doc = requests.get(s.base + "/openapi.json", headers={"Authorization": s.admin}).json()
    sample = {
        "study": s.study,
        "series": s.instance_url.split("/series/")[1].split("/")[0],
        "instance": s.instance_url.rsplit("/", 1)[1],
        "frames": "1",
        "tag": "7FE00010",
        "name": "reader",
        "path": "index.html",
    }
    out = []
    for path, ops in doc["paths"].items():
        url = s.base + path.format(**sample)
        for method, op in ops.items():
            out.append((method.upper(), url, op["x-pacsgrid-role"]))
    return out


@pytest.mark.slow
def test_every_route_needs_credentials(secured: Secured) -> None:
    routes = _routes(secured)
    assert len(routes) >= 25
    for method, url, role in routes:
        if url.endswith("/health"):  # public for load balancers (http.public_health)
            assert requests.get(url).json()["status"] == "ok"
            continue
        assert role != "public", url
        r = requests.request(method, url)
        assert r.status_code == 401, (method, url, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        r = requests.request(method, url, headers={"Authorization": "Bearer pgt_wrong"})
        assert r.status_code == 401, (method, url)
        r = requests.request(method, url, headers={"Authorization": _basic("reader", "nope")})
        assert r.status_code == 401, (method, url)


def test_roles_on_every_route(secured: Secured) -> None:
    for method, url, role in _routes(secured):
        if role in ("store", "admin"):
            r = requests.request(method, url, headers={"Authorization": secured.reader})
            assert r.status_code == 403, (method, url, r.status_code)
        if role == "admin":
            bearer = {"Authorization": f"Bearer {secured.writer_token}"}
            assert requests.request(method, url, headers=bearer).status_code == 403
    ok = requests.get(
        secured.base + "/dicom-web/studies", headers={"Authorization": secured.reader}
    )
    assert ok.status_code == 200 and len(ok.json()) == 1
    users = requests.get(secured.base + "/api/users", headers={"Authorization": secured.admin})
    assert {u["name"] for u in users.json()} == {"reader", "writer", "boss"}


def test_read_only_user_cannot_store(secured: Secured) -> None:
    body, ctype = multipart_body([accepted()[1].path.read_bytes()])
    r = requests.post(
        secured.base + "/dicom-web/studies",
        data=body,
        headers={"Content-Type": ctype, "Authorization": secured.reader},
    )
    assert r.status_code == 403
    assert "may not store" in r.json()["detail"]


def test_audit_records_allowed_and_refused(secured: Secured) -> None:
    h = {"Authorization": secured.reader}
    requests.get(f"{secured.base}/dicom-web/studies?StudyInstanceUID={secured.study}", headers=h)
    requests.get(secured.instance_url, headers=h)
    requests.get(secured.base + "/dicom-web/studies", headers={"Authorization": "Bearer bad"})
    body, ctype = multipart_body([accepted()[1].path.read_bytes()])
    requests.post(
        secured.base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype, **h}
    )
    records = audit_records(secured.server.data_dir / "audit.jsonl")
    kinds = {(r["operation"], r["outcome"], r["user"]) for r in records}
    assert ("STOW", "success", "writer") in kinds
    assert ("QIDO", "success", "reader") in kinds
    assert ("WADO", "success", "reader") in kinds
    assert ("STOW", "denied", "reader") in kinds
    assert ("login", "denied", "") in kinds
    assert ("admin", "success", "") in kinds  # users created by the CLI
    wado = next(r for r in records if r["operation"] == "WADO")
    assert wado["study"] == secured.study and wado["address"] == "127.0.0.1"
    # No patient identifiers in the audit log or the ordinary log, also when the requests
    # searched by them.
    import pydicom

    stored = pydicom.dcmread(accepted()[0].path, stop_before_pixels=True)
    pid, name = str(stored.get("PatientID", "")), str(stored.get("PatientName", ""))
    assert len(pid) > 3 and len(name) > 3, (pid, name)
    found = requests.get(
        f"{secured.base}/dicom-web/studies",
        params={"PatientID": pid, "PatientName": name},
        headers=h,
    )
    assert found.status_code == 200 and len(found.json()) == 1
    audit = (secured.server.data_dir / "audit.jsonl").read_text()
    log = secured.server.text()
    for identifier in (pid, name, name.split("^")[0]):
        assert identifier not in audit, identifier
        assert identifier not in log, identifier


@pytest.mark.slow
def test_user_and_token_lifecycle(tmp_path: Path) -> None:
    """docs/web.md (Users, tokens and roles): users and tokens created (CLI and admin API), used,
    demoted, removed. Tokens follow a change at once; a verified password is remembered
    for 60 seconds, so password logins follow within a minute (not sooner is allowed)."""
    data = tmp_path / "archive"
    data.mkdir()
    users(data, "add", "boss", "--role", "admin", "--password-stdin", stdin="b-secret\n")
    # The old password is tried until it stops working: more wrong passwords from one address
    # than http.login_failures allows before its back-off (tested in test_web_logins).
    server, base = start_web(
        data, extra=("--auth", "on"), env={"PACSGRID_HTTP_LOGIN_FAILURES": "10000"}
    )
    admin = {"Authorization": _basic("boss", "b-secret")}
    try:
        # created over the admin API, with a token, while the server runs
        r = requests.post(
            base + "/api/users",
            json={"name": "tech", "role": "write", "password": "p1"},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        r = requests.post(base + "/api/users/tech/tokens?label=robot", headers=admin)
        assert r.status_code == 201, r.text
        token = {"Authorization": "Bearer " + r.json()["token"]}
        old_password = {"Authorization": _basic("tech", "p1")}

        def stow(headers: dict[str, str], n: int) -> int:
            body, ctype = multipart_body([accepted()[n].path.read_bytes()])
            return requests.post(
                base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype, **headers}
            ).status_code

        def qido(headers: dict[str, str]) -> int:
            return requests.get(base + "/dicom-web/studies", headers=headers).status_code

        assert stow(token, 0) == 200 and stow(old_password, 1) == 200  # used: write role
        # demoted to read, with a new password, by the CLI on the running archive
        users(data, "add", "tech", "--role", "read", "--password-stdin", stdin="p2\n")
        new_password = {"Authorization": _basic("tech", "p2")}
        assert stow(token, 2) == 403 and qido(token) == 200  # tokens: at once
        assert stow(new_password, 2) == 403 and qido(new_password) == 200
        wait_until(
            lambda: qido(old_password) == 401,
            120,
            "the old password refused once its login is no longer remembered (60 s)",
        )
        users(data, "remove", "tech")
        assert qido(token) == 401  # revoked with its user, at once
        wait_until(lambda: qido(new_password) == 401, 120, "a removed user's password refused")
        assert "tech" not in {
            u["name"] for u in requests.get(base + "/api/users", headers=admin).json()
        }
    finally:
        server.stop()
    records = audit_records(data / "audit.jsonl")
    assert [r["outcome"] for r in records if r["operation"] == "admin"].count("success") >= 4
    assert ("login", "denied") in {(r["operation"], r["outcome"]) for r in records}


def test_failures_page_shows_refusals(secured: Secured) -> None:
    r = requests.get(secured.base + "/ui/failures", headers={"Authorization": secured.admin})
    assert r.status_code == 200
    assert "denied" in r.text and "STOW" in r.text


def test_auth_is_on_by_default_off_loopback(tmp_path: Path) -> None:
    from pacsgrid.settings import Overrides, load_settings

    ov = Overrides(data_dir=tmp_path)
    ov.values["http.bind"] = "0.0.0.0"
    assert load_settings(ov, environ={}).web_auth_required
    ov.values["http.bind"] = "127.0.0.1"
    assert not load_settings(ov, environ={}).web_auth_required


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA with a server and a client certificate, and a client certificate from another
    CA (a stranger with a certificate of its own), all made by openssl."""
    d = tmp_path_factory.mktemp("certs")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    def authority(name: str) -> None:
        run(
            *f"req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={name} "
            f"-keyout {name}.key -out {name}.pem".split()
        )

    def issue(name: str, ca: str) -> None:
        run(
            *f"req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout {name}.key "
            f"-out {name}.csr".split()
        )
        run(
            *f"x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 2 "
            f"-extfile san.ext -out {name}.pem".split()
        )

    authority("ca")
    issue("server", "ca")
    issue("client", "ca")
    authority("rogue-ca")
    issue("rogue", "rogue-ca")
    return {p.stem + p.suffix: p for p in d.iterdir()}


@pytest.mark.slow
@pytest.mark.dcmtk
def test_dicom_tls(tmp_path: Path, certs: dict[str, Path]) -> None:
    server = _tls_server(tmp_path, certs, False, workers=2)
    tls_port = server.tls_port  # type: ignore[attr-defined]
    try:
        tls = _tls(certs, "client")
        echo = dcmtk("echoscu", "-v", *tls, "-aec", "PACSGRID", "127.0.0.1", tls_port)
        assert echo.returncode == 0, echo.stdout
        f = accepted()[0]
        store = dcmtk("storescu", "-v", *tls, "-aec", "PACSGRID", "127.0.0.1", tls_port, f.path)
        assert store.returncode == 0 and "Success" in store.stdout, store.stdout
        plain = dcmtk("echoscu", "-to", "5", "-ta", "5", "-aec", "PACSGRID", "127.0.0.1", tls_port)
        assert plain.returncode != 0
        # the plain port still answers plain DICOM
        assert dcmtk("echoscu", "-aec", "PACSGRID", "127.0.0.1", server.port).returncode == 0
        # anonymous TLS (no client certificate) is fine unless tls_verify_clients is set
        anon = dcmtk("echoscu", *_tls(certs, None), "-aec", "PACSGRID", "127.0.0.1", tls_port)
        assert anon.returncode == 0, anon.stdout
    finally:
        server.stop()


def _tls_server(
    tmp_path: Path, certs: dict[str, Path], verify: bool, *peers: str, workers: int = 1
) -> Server:
    cfg = tmp_path / f"tls-{verify}.toml"
    cfg.write_text(f"[dicom]\ntls_verify_clients = {'true' if verify else 'false'}\n")
    tls_port = free_port()
    server = Server(
        tmp_path / f"tls-{verify}",
        config=cfg,
        workers=workers,
        args=(
            "--tls-port",
            str(tls_port),
            "--tls-cert",
            str(certs["server.pem"]),
            "--tls-key",
            str(certs["server.key"]),
            "--tls-ca",
            str(certs["ca.pem"]),
            *(a for p in peers for a in ("--peer", p)),
        ),
    ).start()
    server.wait_listening(tls_port, 60)
    server.tls_port = tls_port  # type: ignore[attr-defined]
    return server


def _tls(certs: dict[str, Path], client: str | None) -> list[str]:
    """DCMTK TLS options: with the named client key and certificate, or anonymous."""
    if client is None:
        return ["+tla", "+cf", str(certs["ca.pem"])]
    return [
        "+tls",
        str(certs[f"{client}.key"]),
        str(certs[f"{client}.pem"]),
        "+cf",
        str(certs["ca.pem"]),
    ]


@pytest.mark.slow
@pytest.mark.dcmtk
def test_dicom_tls_client_certificates(tmp_path: Path, certs: dict[str, Path]) -> None:
    """docs/web.md (TLS): dicom.tls_ca checks the client certificates that are presented;
    dicom.tls_verify_clients requires one."""

    def echo(server: Server, client: str | None) -> int:
        port = server.tls_port  # type: ignore[attr-defined]
        return dcmtk(
            "echoscu", "-to", "10", *_tls(certs, client), "-aec", "PACSGRID", "127.0.0.1", port
        ).returncode

    checking = _tls_server(tmp_path, certs, False)
    try:
        assert echo(checking, "client") == 0
        assert echo(checking, None) == 0  # none presented: fine without tls_verify_clients
        assert echo(checking, "rogue") != 0  # presented, but not signed by tls_ca
    finally:
        checking.stop()
    requiring = _tls_server(tmp_path, certs, True)
    try:
        assert echo(requiring, "client") == 0
        assert echo(requiring, None) != 0  # tls_verify_clients: a certificate is required
        assert echo(requiring, "rogue") != 0
        # Refused and logged: the server logs once its side of the handshake has failed,
        # which can be after echoscu has read the alert and exited.
        wait_until(
            lambda: "connection could not be set up" in requiring.text(),
            60,
            "the refused handshakes logged",
            seen=lambda: requiring.text()[-2000:],
        )
        assert dcmtk("echoscu", "-aec", "PACSGRID", "127.0.0.1", requiring.port).returncode == 0
    finally:
        requiring.stop()


@pytest.mark.dcmtk
def test_query_retrieve_over_tls(
    tmp_path: Path, certs: dict[str, Path], storescp: StoreSCP
) -> None:
    """C-STORE, C-FIND, C-GET and C-MOVE on TLS associations that verify the client."""
    server = _tls_server(
        tmp_path, certs, True, "QRSCU@127.0.0.1:9", f"STORESCP@127.0.0.1:{storescp.port}"
    )
    port = str(server.tls_port)  # type: ignore[attr-defined]
    tls = _tls(certs, "client")
    f = next(f for f in accepted() if f.path.name == "CT_small.dcm")
    try:
        store = dcmtk("storescu", "-v", *tls, "-aec", "PACSGRID", "127.0.0.1", port, f.path)
        assert store.returncode == 0 and "Success" in store.stdout, store.stdout
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={f.study_uid}"]
        find = dcmtk(
            "findscu",
            "-v",
            "-S",
            *tls,
            "-aet",
            "QRSCU",
            "-aec",
            "PACSGRID",
            *keys,
            "-k",
            "PatientID",
            "127.0.0.1",
            port,
        )
        assert find.returncode == 0, find.stdout
        assert find.stdout.count("Find Response") >= 2 and f.study_uid in find.stdout, find.stdout
        # DCMTK's getscu has no TLS: the C-GET comes from pynetdicom over an SSL context.
        ctx = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        ctx.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))
        responses, received = c_get(
            int(port), f.study_uid, [f.sop_class_uid], "QRSCU", (ctx, "127.0.0.1")
        )
        assert responses[-1][0].Status == 0, responses[-1][0]
        assert pixel_data_of(received) == pixel_data(f.path)
        # movescu has no TLS either: the C-MOVE request goes over TLS from pynetdicom, the
        # sub-operations to storescp over its plain port.
        final = c_move(int(port), f.study_uid, "STORESCP", "QRSCU", (ctx, "127.0.0.1"))[-1]
        assert final[0].Status == 0, final[0]
        assert len(storescp.files()) == 1
        assert pixel_data(storescp.files()[0]) == pixel_data(f.path)
    finally:
        server.stop()


def pixel_data_of(received: dict[str, bytes]) -> bytes:
    import io

    import pydicom

    (one,) = received.values()
    return bytes(pydicom.dcmread(io.BytesIO(one)).PixelData)


def test_https(tmp_path: Path, certs: dict[str, Path]) -> None:
    cfg = tmp_path / "https.toml"
    cfg.write_text(
        f'[dicom]\ntls_cert = "{certs["server.pem"]}"\ntls_key = "{certs["server.key"]}"\n'
        "[http]\ntls = true\n"
    )
    port = free_port()
    server = Server(tmp_path / "https", config=cfg, args=("--http-port", str(port))).start()
    try:
        server.wait_listening(port, 60)
        ctx = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx) as resp:
            assert resp.status == 200
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        server.stop()


@pytest.mark.dcmtk
def test_dimse_actions_share_the_audit_log(tmp_path: Path) -> None:
    server = Server(tmp_path / "dimse", args=("--peer", "FINDSCU@127.0.0.1:9")).start()
    try:
        f = next(f for f in accepted() if f.path.name == "CT_small.dcm")
        assert (
            dcmtk("storescu", "-aec", "PACSGRID", "127.0.0.1", server.port, f.path).returncode == 0
        )
        query = ("-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={f.study_uid}")
        ok = dcmtk(
            "findscu", "-aet", "FINDSCU", "-aec", "PACSGRID", *query, "127.0.0.1", server.port
        )
        assert ok.returncode == 0, ok.stdout
        dcmtk("findscu", "-aet", "STRANGER", "-aec", "PACSGRID", *query, "127.0.0.1", server.port)
    finally:
        server.stop()
    records = audit_records(server.data_dir / "audit.jsonl")
    seen = {(r["operation"], r["outcome"], r["ae"]) for r in records}
    assert ("C-STORE", "success", "STORESCU") in seen
    assert ("C-FIND", "success", "FINDSCU") in seen
    assert ("C-FIND", "denied", "STRANGER") in seen
    store = next(r for r in records if r["operation"] == "C-STORE")
    assert store["study"] == f.study_uid and store["address"] == "127.0.0.1"


@pytest.mark.slow
def test_health_can_require_credentials(tmp_path: Path) -> None:
    cfg = tmp_path / "private-health.toml"
    cfg.write_text('[http]\nauth = "on"\npublic_health = false\n')
    server, base = start_web(tmp_path / "ph", extra=("--config", str(cfg)))
    try:
        assert requests.get(base + "/health").status_code == 401
    finally:
        server.stop()
