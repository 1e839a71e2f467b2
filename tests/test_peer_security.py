"""Peers are more than AE titles: a configured peer may be bound to the addresses it calls
from and to the TLS client certificate it shows, and the plain DICOM port can be turned off.
Real peers: pynetdicom binding 127.0.0.2/127.0.0.3 as its source address (all of 127/8 is this
machine), DCMTK's echoscu with client certificates made by openssl."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification

from tests.conftest import Server, dcmtk, free_port


def echo_from(port: int, ae_title: str, source: str) -> str:
    """'accepted' or 'rejected', for a C-ECHO association from `source`.

    A rejection is what came over the wire (an A-ASSOCIATE-RJ PDU), not only
    `assoc.is_rejected`: when the answer comes back before pynetdicom's own thread has looked
    at its socket, pynetdicom finds the connection already closed and aborts without setting
    it (seen on a loaded machine, about one association in seventy)."""
    received: list[object] = []
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="PACSGRID",
        bind_address=(source, 0),
        evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))],
    )
    try:
        if assoc.is_established:
            assert assoc.send_c_echo().Status == 0
            return "accepted"
        if assoc.is_rejected or any(isinstance(p, A_ASSOCIATE_RJ) for p in received):
            return "rejected"
        return "failed"
    finally:
        if assoc.is_established:
            assoc.release()


def test_peers_bound_to_addresses(tmp_path: Path) -> None:
    cfg = tmp_path / "hosts.toml"
    cfg.write_text(
        "[dicom]\naccept_unknown = false\n\n"
        "[[peers]]\nae_title = 'LISTED'\nhost = 'modality.invalid'\nport = 104\n"
        "addresses = ['127.0.0.2', '127.0.4.0/24']\n\n"
        "[[peers]]\nae_title = 'RESOLVED'\nhost = 'localhost'\nport = 104\ncheck_host = true\n\n"
        "[[peers]]\nae_title = 'ANYWHERE'\nhost = '127.0.0.9'\nport = 104\n"
    )
    server = Server(tmp_path / "hosts", config=cfg).start()
    try:
        assert echo_from(server.port, "LISTED", "127.0.0.2") == "accepted"
        assert echo_from(server.port, "LISTED", "127.0.4.7") == "accepted"
        assert echo_from(server.port, "LISTED", "127.0.0.1") == "rejected"
        assert echo_from(server.port, "RESOLVED", "127.0.0.1") == "accepted"
        assert echo_from(server.port, "RESOLVED", "127.0.0.3") == "rejected"
        assert echo_from(server.port, "ANYWHERE", "127.0.0.3") == "accepted"  # no check set
        log = server.text()
        assert "'LISTED' is a configured peer, but it may call only from" in log
        assert "not from 127.0.0.1" in log
        assert "'RESOLVED' is a configured peer, but it may call only from localhost" in log
        audit = (tmp_path / "hosts" / "audit.jsonl").read_text()
        assert audit.count('"denied"') >= 2
    finally:
        server.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("peer-certs")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject in (
        ("server", "/CN=127.0.0.1"),
        ("ct1", "/O=Hospital/CN=ct1"),
        ("intruder", "/O=Hospital/CN=intruder"),
    ):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
        )
    return {p.name: p for p in d.iterdir()}


def fingerprint(pem: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(pem.read_text())
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


@pytest.mark.dcmtk
def test_peers_bound_to_certificates_and_tls_only(tmp_path: Path, certs: dict[str, Path]) -> None:
    tls_port = free_port()
    cfg = tmp_path / "tls.toml"
    cfg.write_text(
        f"[dicom]\nport = 0\ntls_port = {tls_port}\n"
        f"tls_cert = '{certs['server.pem']}'\ntls_key = '{certs['server.key']}'\n"
        f"tls_ca = '{certs['ca.pem']}'\n\n"
        "[[peers]]\nae_title = 'CT1'\nhost = '127.0.0.1'\ntls_subject = 'CN=ct1,O=Hospital'\n\n"
        "[[peers]]\nae_title = 'PINNED'\nhost = '127.0.0.1'\n"
        f"tls_fingerprint = '{fingerprint(certs['ct1.pem'])}'\n"
    )
    server = Server(tmp_path / "tls", config=cfg, port=tls_port, args=("--port", "0"))
    server.start()
    try:

        def echo(ae_title: str, who: str | None) -> bool:
            tls = ["+tls", str(certs[f"{who}.key"]), str(certs[f"{who}.pem"])] if who else ["+tla"]
            proc = dcmtk(
                "echoscu",
                "-aet",
                ae_title,
                *tls,
                "+cf",
                str(certs["ca.pem"]),
                "-aec",
                "PACSGRID",
                "127.0.0.1",
                tls_port,
            )
            return proc.returncode == 0

        assert echo("CT1", "ct1")
        assert echo("PINNED", "ct1")
        assert not echo("CT1", "intruder")  # right CA, wrong subject
        assert not echo("PINNED", "intruder")  # right CA, wrong certificate
        assert not echo("CT1", None)  # no client certificate
        assert echo("SOMEONE", None)  # not bound: anonymous TLS as before
        log = server.text()
        assert "its certificate's subject is CN=intruder,O=Hospital, not CN=ct1,O=Hospital" in log
        assert "it presented no (verified) client certificate" in log
        assert "TLS only" in log
        # no plain DICOM listener at all
        plain = dcmtk("echoscu", "-to", "5", "-aec", "PACSGRID", "127.0.0.1", tls_port)
        assert plain.returncode != 0
    finally:
        server.stop()


@pytest.mark.dcmtk
def test_a_bound_peer_is_refused_on_the_plain_port(tmp_path: Path, certs: dict[str, Path]) -> None:
    tls_port = free_port()
    server = Server(
        tmp_path / "both",
        args=(
            "--tls-port",
            str(tls_port),
            "--tls-cert",
            str(certs["server.pem"]),
            "--tls-key",
            str(certs["server.key"]),
            "--tls-ca",
            str(certs["ca.pem"]),
        ),
        config=_peer_config(tmp_path),
    ).start()
    try:
        server.wait_listening(tls_port, 60)
        plain = dcmtk("echoscu", "-aet", "CT1", "-aec", "PACSGRID", "127.0.0.1", server.port)
        assert plain.returncode != 0 and "Calling AE Title Not Recognized" in plain.stdout
        assert "it must call on the TLS port with its client certificate" in server.text()
    finally:
        server.stop()


def _peer_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "peer.toml"
    cfg.write_text("[[peers]]\nae_title = 'CT1'\nhost = '127.0.0.1'\ntls_subject = 'CN=ct1'\n")
    return cfg
