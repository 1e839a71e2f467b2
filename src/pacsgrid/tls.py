"""TLS contexts for DICOM TLS (PS3.15 B.1, "the basic TLS secure transport connection
profile") and HTTPS: the server side of the TLS port and the web face, built from
`dicom.tls_*`, and the client side of associations to peers whose [[peers]] entry sets `tls`.

Certificates are checked when the context is built, so a wrong path or a key that does not
match the certificate stops start-up with one line naming the setting (`check_peers` builds
every peer's context when `serve` starts).
"""

from __future__ import annotations

import functools
import ssl

from pacsgrid.errors import ConfigError
from pacsgrid.settings import DicomSettings, PeerSettings, Settings


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


@functools.lru_cache(maxsize=64)
def client_context(peer: PeerSettings, key: str = "") -> ssl.SSLContext | None:
    """The context to open associations to `peer` with; None when it does not use TLS.

    The peer's certificate must be signed by its `tls_ca` (or the system's CAs) and, unless
    `tls_check_hostname` is false, name its `host`; the archive presents `tls_client_cert`.
    (The settings loader fills these from dicom.tls_* where the peer sets none.) Built once
    per peer; `key` names the peer in errors (peers[i])."""
    if not peer.tls:
        return None
    where = key or f"peer {peer.ae_title}"
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if peer.tls_ca:
        try:
            ctx.load_verify_locations(peer.tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{where}.tls_ca", f"cannot load CA bundle: {e}") from None
    ctx.check_hostname = peer.tls_check_hostname
    if peer.tls_client_cert:
        try:
            ctx.load_cert_chain(peer.tls_client_cert, peer.tls_client_key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"{where}.tls_client_cert", f"cannot load certificate/key: {e}"
            ) from None
    return ctx


def check_peers(settings: Settings) -> None:
    """Build the context of every TLS peer now: a bad file fails start-up, not a C-MOVE."""
    for i, peer in enumerate(settings.peers):
        client_context(peer, f"peers[{i}]")
