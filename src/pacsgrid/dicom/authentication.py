"""Binding a configured peer's AE title to where it calls from (PS3.15 annex B, node
authentication): the addresses it may call from, and the TLS client certificate it must show.

An AE title alone is a name anyone can type. A peer whose configuration sets `check_host` or
`addresses` is accepted only from those addresses; one that names `tls_subject` or
`tls_fingerprint` only on the TLS port, with that certificate (already verified against
`dicom.tls_ca` by the handshake). A call that does not fit is rejected as "calling AE title
not recognized", the same answer an unknown title gets, so the reply tells a prober nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pacsgrid.settings import PeerSettings
from pacsgrid.settings.sections import parse_subject

_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


@dataclass(frozen=True)
class PeerCertificate:
    """The client certificate a TLS connection presented (verified by the handshake)."""

    subject: frozenset[tuple[str, str]]
    sha256: str  # hex, lower case, no colons

    @classmethod
    def from_ssl(cls, ssl_object: Any) -> PeerCertificate | None:
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        info = ssl_object.getpeercert()
        if not der or not info:
            return None
        pairs = frozenset(
            (_SHORT_NAMES.get(name, name), value)
            for rdn in info.get("subject", ())
            for name, value in rdn
        )
        return cls(pairs, hashlib.sha256(der).hexdigest())

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.subject))


class HostResolver:
    """Addresses of peers' host names, looked up when needed and kept for `ttl` seconds
    (shared by the associations of one server, each on its own thread)."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    def addresses(self, host: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(host)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            found = frozenset(_normal(str(info[4][0])) for info in infos)
        except OSError:
            found = frozenset()
        with self._lock:
            self._cache[host] = (now + self.ttl, found)
        return found


def _normal(address: str) -> str:
    """IPv4-mapped IPv6 addresses (a dual-stack listener) as plain IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def mismatch(
    peer: PeerSettings,
    address: str,
    certificate: PeerCertificate | None,
    *,
    on_tls: bool,
    resolver: HostResolver,
) -> str:
    """Why a call from `address` (with `certificate`, on the TLS port or not) does not fit
    the peer's configuration; '' when it does."""
    if peer.check_host or peer.addresses:
        caller = _normal(address)
        allowed = any(_in_network(caller, text) for text in peer.addresses) or (
            peer.check_host and caller in resolver.addresses(peer.host)
        )
        if not allowed:
            where = [*peer.addresses, *([peer.host] if peer.check_host else [])]
            return f"it may call only from {', '.join(where)}, not from {caller}"
    if peer.tls_subject or peer.tls_fingerprint:
        if not on_tls:
            return "it must call on the TLS port with its client certificate"
        if certificate is None:
            return "it presented no (verified) client certificate"
        if peer.tls_subject and certificate.subject != parse_subject(peer.tls_subject):
            return f"its certificate's subject is {certificate.describe()}, not {peer.tls_subject}"
        fingerprint = peer.tls_fingerprint.replace(":", "").lower()
        if fingerprint and certificate.sha256 != fingerprint:
            return f"its certificate's SHA-256 fingerprint is {certificate.sha256}"
    return ""


def _in_network(address: str, network: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False
