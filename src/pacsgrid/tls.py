"""TLS server contexts for the DICOM TLS port (PS3.15 B.1, "the basic TLS secure transport
connection profile") and HTTPS, built from `dicom.tls_*` settings.

Certificates are checked when the context is built, so a wrong path or a key that does not
match the certificate stops start-up with one line naming the setting.
"""

from __future__ import annotations

import ssl

from pacsgrid.errors import ConfigError
from pacsgrid.settings import DicomSettings


def server_context(d: DicomSettings, *, verify_clients: bool | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(d.tls_cert, d.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("dicom.tls_cert", f"cannot load certificate/key: {e}") from None
    verify = d.tls_verify_clients if verify_clients is None else verify_clients
    if d.tls_ca:
        try:
            ctx.load_verify_locations(d.tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("dicom.tls_ca", f"cannot load CA bundle: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
