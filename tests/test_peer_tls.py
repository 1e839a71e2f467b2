"""TLS to peers: the associations pacsgrid opens (C-MOVE destinations, forwarding, storage
commitment reports, `migrate pull`) use DICOM TLS when the peer's [[peers]] entry says so,
checking the peer's certificate and presenting the archive's own. Real TLS peers: DCMTK's
storescp with +tls (it requires a client certificate), pynetdicom with an SSL context, and a
TLS-only `pacsgrid serve` as the legacy PACS; certificates made by openssl."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commitment_peer import Modality
from tests.conftest import Server, StoreSCP, dcmtk, free_port, pacsgrid_cli
from tests.corpus import UNCOMPRESSED, CorpusFile, accepted
from tests.tls_certs import make_certificates, server_context
from tests.waiting import wait_until

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(
        tmp_path_factory.mktemp("peer-tls"), ("archive", "storescp", "modality", "legacy")
    )


def plain_files(n: int) -> list[CorpusFile]:
    out: dict[str, CorpusFile] = {}
    for f in accepted():
        if f.transfer_syntax in UNCOMPRESSED:
            out.setdefault(f.sop_uid, f)
    return list(out.values())[:n]


def tls_storescp(tmp_path: Path, certs: dict[str, Path], aet: str = "STORESCP") -> StoreSCP:
    """DCMTK storescp on TLS only, requiring a client certificate signed by the test CA."""
    return StoreSCP(
        tmp_path / f"{aet.lower()}-out",
        aet=aet,
        options=("+xa", "+tls", str(certs["storescp.key"]), str(certs["storescp.pem"]),
                 "+cf", str(certs["ca.pem"]), "+B", "-pm", "-v"),
    ).start()  # fmt: skip


def archive_tls(certs: dict[str, Path]) -> str:
    """The archive's certificate: its TLS port's, and presented to TLS peers by default."""
    return (
        f"[dicom]\ntls_cert = '{certs['archive.pem']}'\ntls_key = '{certs['archive.key']}'\n"
        f"tls_ca = '{certs['ca.pem']}'\n"
    )


def peer(ae: str, port: int, host: str = "127.0.0.1", **more: object) -> str:
    text = f"\n[[peers]]\nae_title = '{ae}'\nhost = '{host}'\nport = {port}\n"
    for key, value in more.items():
        text += f"{key} = {value!r}\n".replace("True", "true").replace("False", "false")
    return text


@pytest.fixture
def destination(tmp_path: Path, certs: dict[str, Path]) -> Iterator[StoreSCP]:
    scp = tls_storescp(tmp_path, certs)
    yield scp
    scp.stop()


@pytest.mark.slow
def test_c_move_to_a_tls_destination(
    tmp_path: Path, certs: dict[str, Path], destination: StoreSCP
) -> None:
    cfg = tmp_path / "move.toml"
    cfg.write_text(
        archive_tls(certs)
        + peer("VIEWER", 104)
        + peer("STORESCP", destination.port, tls=True)
        + peer("PLAINCP", destination.port)  # the same TLS port, without tls: must fail
        + peer("WRONGCA", destination.port, tls=True, tls_ca=str(certs["other-ca.pem"]))
        # its certificate names 127.0.0.1 only: reached as localhost it does not fit ...
        + peer("BYNAME", destination.port, host="localhost", tls=True)
        # ... unless the name is not checked (the CA still is)
        + peer("NOCHECK", destination.port, host="localhost", tls=True, tls_check_hostname=False)
    )
    server = Server(tmp_path / "a", config=cfg, workers=2).start()
    try:
        [f] = plain_files(1)
        stored = dcmtk("storescu", "-aec", "PACSGRID", "127.0.0.1", server.port, f.path)
        assert stored.returncode == 0, stored.stdout

        def move(to: str) -> subprocess.CompletedProcess[str]:
            return dcmtk("movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "PACSGRID", "-aem", to,
                         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={f.study_uid}",
                         "127.0.0.1", server.port)  # fmt: skip

        done = move("STORESCP")
        assert done.returncode == 0, done.stdout
        assert len(destination.files()) == 1, done.stdout
        for wrong in ("PLAINCP", "WRONGCA", "BYNAME"):
            failed = move(wrong)
            # A702: no sub-operation could be sent
            assert "Refused: OutOfResourcesSubOperations" in failed.stdout, (wrong, failed.stdout)
        assert len(destination.files()) == 1  # nothing arrived without TLS, a wrong CA or name
        log = server.text()
        assert re.search(r"to WRONGCA@\S+: \[SSL: CERTIFICATE_VERIFY_FAILED\]", log), log
        assert re.search(r"to BYNAME@localhost\S+: .*Hostname mismatch", log), log
        destination.clear()
        unchecked = move("NOCHECK")
        assert unchecked.returncode == 0 and len(destination.files()) == 1, unchecked.stdout
    finally:
        server.stop()


@pytest.mark.slow
def test_forwarding_to_a_tls_peer(
    tmp_path: Path, certs: dict[str, Path], destination: StoreSCP
) -> None:
    cfg = tmp_path / "forward.toml"
    cfg.write_text(
        archive_tls(certs)
        + peer("STORESCP", destination.port, tls=True)
        + "\n[[forward]]\nto = 'STORESCP'\n"
    )
    server = Server(tmp_path / "a", config=cfg).start()
    try:
        files = plain_files(2)
        store = dcmtk("storescu", "-aet", "CT1", "-aec", "PACSGRID", "127.0.0.1", server.port,
                      *[f.path for f in files])  # fmt: skip
        assert store.returncode == 0, store.stdout
        wait_until(lambda: len(destination.files()) == 2, 120, "both instances forwarded")
    finally:
        server.stop()


@pytest.mark.slow
def test_commitment_report_over_tls(tmp_path: Path, certs: dict[str, Path]) -> None:
    """The report on a new association goes over TLS to a listener that requires the
    archive's client certificate; here the certificate is the peer's own setting."""
    modality = Modality(server_tls=server_context(certs, "modality", require_client=True))
    modality.listen()
    cfg = tmp_path / "commit.toml"
    cfg.write_text(
        peer("MODALITY", modality.port, tls=True, tls_ca=str(certs["ca.pem"]),
             tls_client_cert=str(certs["archive.pem"]), tls_client_key=str(certs["archive.key"]))
    )  # fmt: skip
    server = Server(tmp_path / "a", config=cfg).start()
    try:
        [f] = plain_files(1)
        store = dcmtk("storescu", "-aet", "MODALITY", "-aec", "PACSGRID", "127.0.0.1",
                      server.port, f.path)  # fmt: skip
        assert store.returncode == 0, store.stdout
        result = modality.request(
            server.port, "1.2.826.0.1.3680043.8.498.20", [(f.sop_class_uid, f.sop_uid)],
            keep_open=False,
        )  # fmt: skip
        assert result.status == 0
        report = modality.next_report()
        assert report.event_type == 1 and report.calling_ae == "PACSGRID"
    finally:
        server.stop()
        modality.stop()


@pytest.mark.slow
def test_migrate_pull_from_a_tls_only_pacs(tmp_path: Path, certs: dict[str, Path]) -> None:
    """The legacy PACS is a `pacsgrid serve` with no plain port that requires client
    certificates; `migrate pull --get` reaches it with the peer's TLS settings."""
    tls_port = free_port()
    legacy_cfg = tmp_path / "legacy.toml"
    legacy_cfg.write_text(
        f"[dicom]\nport = 0\ntls_port = {tls_port}\nae_title = 'LEGACY'\n"
        f"tls_cert = '{certs['legacy.pem']}'\ntls_key = '{certs['legacy.key']}'\n"
        f"tls_ca = '{certs['ca.pem']}'\ntls_verify_clients = true\n"
        # the puller offers both roles on its storage contexts (C-GET sub-operations): store
        + peer("PACSGRID", 104, allow=["echo", "find", "get", "store"])
    )
    # A second --port 0 leaves the legacy PACS its TLS port only (as its configuration says).
    legacy = Server(tmp_path / "legacy", config=legacy_cfg, port=tls_port, args=("--port", "0"))
    legacy.start()
    try:
        files = plain_files(3)
        tls = ["+tls", str(certs["modality.key"]), str(certs["modality.pem"]),
               "+cf", str(certs["ca.pem"])]  # fmt: skip
        # -R: propose exactly the files' SOP classes (storescu's default list is shorter)
        store = dcmtk("storescu", "-R", *tls, "-aec", "LEGACY", "127.0.0.1", tls_port,
                      *[f.path for f in files])  # fmt: skip
        assert store.returncode == 0, store.stdout
        cfg = tmp_path / "puller.toml"
        cfg.write_text(
            peer("LEGACY", 104, tls=True, tls_ca=str(certs["ca.pem"]),
                 tls_client_cert=str(certs["archive.pem"]),
                 tls_client_key=str(certs["archive.key"]))
        )  # fmt: skip
        pulled = pacsgrid_cli(
            "migrate", "pull", "--config", cfg, "--data-dir", tmp_path / "archive",
            "--from", f"LEGACY@127.0.0.1:{tls_port}", "--get",
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        assert f"{len({f.study_uid for f in files})} retrieved now" in pulled.stdout
        status = pacsgrid_cli("status", "--data-dir", tmp_path / "archive", "--json")
        assert f'"instances": {len(files)}' in status.stdout
        # without tls the pull cannot even ask
        plain = tmp_path / "plain.toml"
        plain.write_text(peer("LEGACY", 104))
        refused = pacsgrid_cli(
            "migrate", "pull", "--config", plain, "--data-dir", tmp_path / "archive2",
            "--from", f"LEGACY@127.0.0.1:{tls_port}", "--get",
        )  # fmt: skip
        assert refused.returncode != 0
    finally:
        legacy.stop()


@pytest.mark.slow
def test_bad_peer_tls_settings_are_one_line_naming_the_key(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    cert, wrong_key = str(certs["archive.pem"]), str(certs["legacy.key"])
    cases = {
        peer("A", 104, tls=True, tls_ca=str(tmp_path / "missing.pem")): "peers[0].tls_ca",
        peer("A", 104, tls=True, tls_client_cert=cert): "peers[0].tls_client_key",
        peer("A", 104, tls=True, tls_client_cert=cert, tls_client_key=wrong_key): (
            "peers[0].tls_client_cert"
        ),
    }
    for text, key in cases.items():
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        out = pacsgrid_cli("serve", "--config", cfg, "--data-dir", tmp_path / "x", "--port",
                           str(free_port()), timeout=60)  # fmt: skip
        assert out.returncode == 2, out.stdout + out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], out.stderr
