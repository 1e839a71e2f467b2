"""Certificates for DICOM TLS tests, made by openssl: one CA, and certificates it signs for
127.0.0.1 (subjectAltName IP:127.0.0.1, so hostname checks pass on the loopback address)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path


def make_certificates(folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """`ca.pem`/`ca.key`, and `<name>.pem`/`<name>.key` for each name (CN=<name>), plus a
    second CA (`other-ca.pem`) that signed nothing here: trusting it alone must fail."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, timeout=60)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=test-{ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in names:
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
            "-out", f"{name}.pem")  # fmt: skip
    return {p.name: p for p in folder.iterdir()}


def server_context(certs: dict[str, Path], name: str, *, require_client: bool) -> ssl.SSLContext:
    """What a TLS peer of the archive listens with (pynetdicom's `ssl_context`)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs["ca.pem"]))
    ctx.load_cert_chain(str(certs[f"{name}.pem"]), str(certs[f"{name}.key"]))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    return ctx


def client_context(certs: dict[str, Path], name: str) -> ssl.SSLContext:
    """What a TLS client of the archive connects with."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca.pem"]))
    ctx.load_cert_chain(str(certs[f"{name}.pem"]), str(certs[f"{name}.key"]))
    return ctx
