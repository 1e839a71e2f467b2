"""Every setting, declared once: its section, type, default, checks and help line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


def setting(default: Any, help: str, **checks: Any) -> Any:
    """Declare a setting: its default, the help line for the docs, and value checks.

    checks: ``min``/``max`` for numbers, ``choices`` for strings, ``ae`` for AE titles.
    """
    meta = {"help": help, **checks}
    if isinstance(default, list | dict | tuple):
        frozen = tuple(default) if not isinstance(default, dict) else default
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


def parse_subject(text: str) -> frozenset[tuple[str, str]]:
    """A certificate subject written as 'CN=ct1,O=Hospital' (or OpenSSL's '/CN=ct1/O=...'):
    its attribute-value pairs. Raises ValueError naming what is wrong."""
    parts = text.strip().strip("/").split("/") if text.strip().startswith("/") else None
    pairs = []
    for part in parts if parts is not None else re.split(r"(?<!\\),", text):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"expected attributes such as CN=ct1,O=Hospital, got {text!r}")
        pairs.append((key.strip(), value.strip().replace("\\,", ",")))
    return frozenset(pairs)


Operation = Literal["echo", "store", "find", "move", "get"]
ALL_OPERATIONS: tuple[Operation, ...] = ("echo", "store", "find", "move", "get")


@dataclass(frozen=True)
class PeerSettings:
    """A DICOM application entity the archive knows: it may query/retrieve and be a C-MOVE
    destination."""

    ae_title: str = setting("", "AE title of the peer (1-16 characters).", ae=True, required=True)
    host: str = setting("", "Host name or address the peer listens on.", required=True)
    port: int = setting(104, "Port the peer listens on.", min=1, max=65535)
    allow: tuple[str, ...] = setting(
        list(ALL_OPERATIONS),
        "Operations this peer may perform: echo, store, find, move, get.",
        choices=ALL_OPERATIONS,
    )
    check_host: bool = setting(
        False,
        "Accept this AE title only from the address(es) `host` resolves to (or from "
        "`addresses`); a call from elsewhere is rejected.",
    )
    addresses: tuple[str, ...] = setting(
        [],
        "Addresses or networks (e.g. 10.1.2.3, 10.1.2.0/24) this AE title may call from; "
        "a non-empty list turns the address check on.",
    )
    tls_subject: str = setting(
        "",
        "Subject its TLS client certificate must have, e.g. 'CN=ct1,O=Hospital' (the "
        "attributes as openssl x509 -subject -nameopt RFC2253 prints them, any order); the "
        "peer may then call only on the TLS port.",
    )
    tls_fingerprint: str = setting(
        "",
        "SHA-256 fingerprint (hex, colons allowed) its TLS client certificate must have; the "
        "peer may then call only on the TLS port.",
        pattern=r"^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$|^$",
    )
    tls: bool = setting(
        False,
        "The archive's own associations to this peer (C-MOVE, forwarding, storage "
        "commitment reports, migrate pull) use DICOM TLS; `port` is then its TLS port.",
    )
    tls_ca: str = setting(
        "",
        "With tls: PEM CA bundle the peer's certificate must be signed by (default: "
        "dicom.tls_ca; neither set: the system's CAs).",
    )
    tls_client_cert: str = setting(
        "",
        "With tls: PEM certificate the archive presents to this peer (default: "
        "dicom.tls_cert, if set).",
    )
    tls_client_key: str = setting(
        "", "PEM private key of tls_client_cert (default: dicom.tls_key with dicom.tls_cert)."
    )
    tls_check_hostname: bool = setting(
        True,
        "With tls: the peer's certificate must name `host` (a DNS name or IP address in its "
        "subjectAltName); false checks only that the CA signed it.",
    )


@dataclass(frozen=True)
class SiteSettings:
    """One storage site. The URL scheme selects the kind: file:// or s3://."""

    name: str = setting(
        "",
        "Short unique name of the site (letters, digits, - and _).",
        required=True,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
    )
    url: str = setting(
        "", "Where the site is: file:///path or s3://bucket/prefix?endpoint=URL.", required=True
    )
    location: str = setting(
        "default",
        "Location label (building, campus, cloud): copies are "
        "spread over distinct locations where possible.",
    )
    role: str = setting(
        "archive",
        "archive (never deletes) or cache (bounded, evicts verified copies).",
        choices=("archive", "cache"),
    )
    capacity: int = setting(0, "Cache capacity in bytes (role cache only; 0 = unbounded).", min=0)
    high_watermark: float = setting(
        0.90, "Cache: start evicting above this fraction of capacity.", min=0.0, max=1.0
    )
    low_watermark: float = setting(
        0.80, "Cache: evict down to this fraction of capacity.", min=0.0, max=1.0
    )


@dataclass(frozen=True)
class DicomSettings:
    ae_title: str = setting("PACSGRID", "AE title of the archive.", ae=True)
    port: int = setting(
        11112,
        "DICOM listening port (0 = no plain DICOM: TLS only, see tls_port).",
        min=0,
        max=65535,
    )
    bind: str = setting("0.0.0.0", "Address the DICOM listener binds to (0.0.0.0 = all).")
    workers: int = setting(
        0,
        "DICOM worker processes sharing the port (0 = one per CPU core, at least two).",
        min=0,
        max=64,
    )
    accept_unknown: bool = setting(
        True,
        "Accept associations from AE titles that are not "
        "configured peers (they may only C-ECHO and C-STORE).",
    )
    on_duplicate: str = setting(
        "keep",
        "A SOP Instance UID received again: keep the stored "
        "object and answer success, or replace it.",
        choices=("keep", "replace"),
    )
    max_pdu: int = setting(262144, "Largest PDU the archive accepts (bytes, 0 = unlimited).", min=0)
    timeout: float = setting(60.0, "Seconds a peer may stay silent during an association.", min=1.0)
    artim_timeout: float = setting(
        10.0,
        "PS3.8 ARTIM timer: seconds a new connection has to send its A-ASSOCIATE-RQ, and "
        "that a connection whose association ended waits for the peer to close it.",
        min=0.5,
        max=600.0,
    )
    max_associations: int = setting(
        128,
        "Connections one DICOM worker process holds at once (each has a thread). When full, "
        "the oldest connection that has not sent its A-ASSOCIATE-RQ makes room; if there is "
        "none, the new one is rejected (A-ASSOCIATE-RJ, local limit exceeded).",
        min=1,
        max=10000,
    )
    max_associations_per_host: int = setting(
        32,
        "Connections one worker process holds at once from one address (0 = no limit; set "
        "0 behind a TCP proxy, where every peer has the proxy's address).",
        min=0,
        max=10000,
    )
    shutdown_grace: float = setting(
        10.0,
        "On SIGTERM, seconds in-flight associations get to finish before they are aborted.",
        min=0.0,
    )
    spill_mb: int = setting(
        4,
        "A dataset arriving (C-STORE, STOW-RS part) is held in memory up to this many MB; a "
        "larger one is written to a spill file under data_dir/spill as it arrives and read "
        "from there, so that memory stays bounded whatever the object's size.",
        min=1,
    )
    spill_max_mb: int = setting(
        16384,
        "Disk space all spill files together may use (MB); a large dataset that would pass "
        "it fails with out of resources (A700) instead of filling the disk.",
        min=1,
    )
    tls_port: int = setting(
        0,
        "DICOM TLS listening port (0 = no TLS listener); needs tls_cert and tls_key.",
        min=0,
        max=65535,
    )
    tls_cert: str = setting("", "PEM certificate (chain) the TLS listeners present.")
    tls_key: str = setting("", "PEM private key of tls_cert.")
    tls_ca: str = setting(
        "", "PEM CA bundle that client certificates are checked against (tls_verify_clients)."
    )
    tls_verify_clients: bool = setting(
        False, "DICOM TLS: require a client certificate signed by tls_ca."
    )


@dataclass(frozen=True)
class ReplicationSettings:
    copies: int = setting(
        1,
        "Archive copies every object should have (on distinct locations where possible).",
        min=1,
        max=16,
    )
    write_quorum: int = setting(
        1, "Copies that must be durable before a store is acknowledged.", min=1, max=16
    )
    probe_interval: float = setting(
        30.0,
        "Seconds between health probes of every site (a failing operation marks a site "
        "down at once; a probe brings it back up).",
        min=0.5,
    )


@dataclass(frozen=True)
class RepairSettings:
    interval: float = setting(
        3600.0,
        "Seconds between full repair scans in `serve` (every site's listing and every "
        "object's copies against the policy); the outbox of copies is drained continuously.",
        min=5.0,
    )
    rate_mb: float = setting(0.0, "Repair bandwidth limit in MB/s (0 = unlimited).", min=0.0)
    jobs: int = setting(4, "Copies the repair job makes in parallel.", min=1, max=64)
    retry_max: float = setting(
        300.0,
        "Longest pause (seconds) before a copy that could not be made is tried again; a site "
        "coming back up wakes every waiting copy at once.",
        min=1.0,
    )


@dataclass(frozen=True)
class AuditSettings:
    interval: float = setting(
        3600.0,
        "Seconds between scheduled fixity audit passes in `serve` (0 = only on demand).",
        min=0.0,
    )
    max_age_days: float = setting(
        30.0,
        "A copy is re-read and checked when its last verification is older than this.",
        min=0.0,
    )
    rate_mb: float = setting(
        20.0, "Bandwidth limit of the scheduled audit in MB/s (0 = unlimited).", min=0.0
    )
    verify_reads: bool = setting(
        True,
        "Check every object read (C-MOVE, C-GET, WADO) against its SHA-256 and serve another "
        "copy if it does not match. false: trust the storage (ZFS, Ceph or an object store "
        "that checksums); the scheduled audit still checks every copy.",
    )


@dataclass(frozen=True)
class ForwardRule:
    """Forward each newly received instance to a peer (a parallel run with a legacy PACS).

    An instance is never forwarded to the AE title that sent it, so two systems forwarding to
    each other do not loop. Only instances received over the network are forwarded, not
    those brought in by `import` or `migrate`.
    """

    to: str = setting(
        "", "AE title of the peer to forward to (a configured peer).", ae=True, required=True
    )
    calling_ae: tuple[str, ...] = setting(
        [], "Forward only instances received from these calling AE titles (empty: from any)."
    )
    modality: tuple[str, ...] = setting(
        [], "Forward only instances of these modalities, e.g. CT, MR (empty: any)."
    )

    def matches(self, calling_ae: str, modality: str) -> bool:
        if self.calling_ae and calling_ae not in self.calling_ae:
            return False
        return not self.modality or modality.strip().upper() in {m.upper() for m in self.modality}


@dataclass(frozen=True)
class ForwardingSettings:
    retry_initial: float = setting(
        10.0, "Seconds before the first retry of a failed forward; doubles per attempt.", min=0.1
    )
    retry_max: float = setting(3600.0, "Longest wait between two retries (seconds).", min=0.1)
    max_attempts: int = setting(
        50,
        "Attempts before an instance is given up and listed by 'pacsgrid forward status' "
        "(0 = retry forever).",
        min=0,
    )
    batch: int = setting(64, "Instances sent per association.", min=1, max=10000)
    poll: float = setting(
        2.0, "Seconds between two looks at the forwarding queue when it is empty.", min=0.05
    )


@dataclass(frozen=True)
class CommitmentSettings:
    """Storage Commitment (docs/storage-commitment.md): delivering the reports that did not
    go back on the requester's own association."""

    retry_initial: float = setting(
        10.0,
        "Seconds before a report that could not be delivered is tried again; doubles per attempt.",
        min=0.1,
    )
    retry_max: float = setting(600.0, "Longest wait between two attempts (seconds).", min=0.1)
    max_attempts: int = setting(
        30,
        "Attempts before a report is given up and listed by 'pacsgrid commitment status' "
        "(0 = retry forever).",
        min=0,
    )
    poll: float = setting(
        1.0, "Seconds between two looks for reports to deliver when there are none.", min=0.05
    )


@dataclass(frozen=True)
class HttpSettings:
    """The web face: DICOMweb, the dashboard, the viewer, /metrics and /health."""

    port: int = setting(0, "HTTP listening port (0 = no web server).", min=0, max=65535)
    bind: str = setting("127.0.0.1", "Address the web server binds to.")
    auth: str = setting(
        "auto",
        "Require users or API tokens: on, off, or auto (on whenever bind is not a loopback "
        "address).",
        choices=("auto", "on", "off"),
    )
    tls: bool = setting(
        False, "Serve HTTPS with dicom.tls_cert and dicom.tls_key (or use a reverse proxy)."
    )
    max_upload: int = setting(
        1 << 30,
        "Largest request body accepted (bytes): 413 as soon as a request announces or sends more.",
        min=1,
    )
    max_results: int = setting(
        10000, "Most QIDO-RS results one request returns (a larger limit is capped).", min=1
    )
    viewer: str = setting(
        "", "Folder of a prebuilt OHIF viewer (npm @ohif/app, its dist/) served at /viewer/."
    )
    public_health: bool = setting(
        True, "Answer /health without credentials (for load balancers; it shows no patient data)."
    )
    idle_timeout: float = setting(
        30.0,
        "Seconds a connection may go without sending a complete request head (idle between "
        "requests, or headers trickling in) before it is closed.",
        min=1.0,
    )
    body_timeout: float = setting(
        60.0,
        "Seconds a request body may stall (no byte received) before the request is answered "
        "408 and the connection closed.",
        min=1.0,
    )
    password_checks: int = setting(
        2,
        "Password checks (scrypt, ~50 ms and 16 MB each) run at once, on their own threads; "
        "four times as many may wait, more are answered 429 at once.",
        min=1,
        max=64,
    )
    login_failures: int = setting(
        5,
        "Wrong passwords from one address before it must wait: 429 with Retry-After, no "
        "password checked, for login_backoff seconds, doubled at each further failure.",
        min=1,
    )
    login_backoff: float = setting(
        2.0, "First wait (seconds) of an address after login_failures wrong passwords.", min=0.1
    )
    login_backoff_max: float = setting(
        900.0,
        "Longest wait of an address (seconds); an address without a wrong password for this "
        "long starts afresh.",
        min=1.0,
    )


@dataclass(frozen=True)
class Hl7Settings:
    """Patient updates from the hospital's patient registry: HL7 v2 ADT over MLLP."""

    port: int = setting(
        0,
        "MLLP listening port for ADT^A08, ADT^A40 and ADT^A47 (0 = no HL7 listener).",
        min=0,
        max=65535,
    )
    bind: str = setting(
        "127.0.0.1",
        "Address the HL7 listener binds to (an interface engine on another machine: 0.0.0.0 "
        "with hl7.senders set).",
    )
    senders: tuple[str, ...] = setting(
        [],
        "Sending applications accepted (MSH-3, or MSH-3|MSH-4); messages from others are "
        "rejected (AR). Empty: any sender.",
    )
    issuer: str = setting(
        "message",
        "IssuerOfPatientID of the patients a message names: message (the assigning authority "
        "of PID-3 and MRG-1) or ignore (always empty, for modalities that send none).",
        choices=("message", "ignore"),
    )
    idle_timeout: float = setting(
        600.0, "Seconds an HL7 connection may stay silent before it is closed.", min=1.0
    )
    max_message: int = setting(
        1 << 20, "Largest HL7 message accepted (bytes); the connection is closed past it.", min=1024
    )


@dataclass(frozen=True)
class RetentionSettings:
    """The one way objects leave an archive site: `pacsgrid reject purge` (see
    docs/corrections.md). Off by default: nothing is ever deleted."""

    purge_rejected: bool = setting(
        False,
        "Allow 'pacsgrid reject purge' to delete the objects a rejection note titled 113039 "
        "(Data Retention Policy Expired) hides. Off: no object is ever deleted.",
    )
    purge_after_days: float = setting(
        30.0,
        "Days a 113039 rejection must have stood (the time to undo a mistaken one) before its "
        "objects may be purged.",
        min=0.0,
    )


@dataclass(frozen=True)
class AuditLogSettings:
    target: str = setting(
        "file",
        "Where audit records (JSON lines) go: file, syslog, or off.",
        choices=("file", "syslog", "off"),
    )
    file: str = setting("", "Audit log file (default: audit.jsonl under data_dir).")


@dataclass(frozen=True)
class IndexSettings:
    """How the archive talks to its index database (PostgreSQL; SQLite ignores most)."""

    read_database: str = setting(
        "",
        "Optional read-only PostgreSQL conninfo (a standby) for C-FIND/C-MOVE/C-GET lookups; "
        "the primary answers when it cannot.",
    )
    connect_timeout: float = setting(
        5.0,
        "Seconds to wait for each PostgreSQL host when connecting; bounds how long a C-STORE "
        "waits while no primary is reachable.",
        min=1.0,
        max=300.0,
    )
    statement_timeout: float = setting(
        30.0,
        "Seconds one index statement may run (and wait for locks) before it is cancelled "
        "(0 = no limit).",
        min=0.0,
    )
    pool_size: int = setting(
        8,
        "PostgreSQL read connections per process (plus one for writes, and as many again for "
        "read_database); size max_connections for nodes x workers x this.",
        min=1,
        max=256,
    )


@dataclass(frozen=True)
class BackupSettings:
    """Index backups (`pacsgrid backup`, and the schedule in `pacsgrid serve`)."""

    dir: Path = setting(
        Path(""), "Folder for index backups (relative: under data_dir; default <data_dir>/backups)."
    )
    keep: int = setting(7, "Backups kept; older ones are deleted after a verified backup.", min=1)
    interval: float = setting(
        0.0,
        "Hours between scheduled backups taken by `serve` (0 = no schedule). With several "
        "nodes, one of them takes each backup.",
        min=0.0,
    )
    verify: bool = setting(
        True, "Restore every new backup into a scratch database and compare row counts."
    )
    source: str = setting(
        "",
        "PostgreSQL conninfo pg_dump reads from (e.g. a standby, so the primary is not "
        "loaded); default: index.read_database, else the database.",
    )
    scratch: str = setting(
        "",
        "PostgreSQL conninfo of a server where verification may create and drop a scratch "
        "database; default: the primary of the database setting.",
    )


@dataclass(frozen=True)
class DurabilitySettings:
    """How folder sites make writes durable (docs/durability.md)."""

    log: bool = setting(
        True,
        "Folder sites make writes durable through their write-ahead log: one flush for a "
        "group of objects (false: every object flushed on its own, three flushes per store).",
    )
    inline_kb: int = setting(
        128,
        "Objects up to this size are copied into the log record (written twice: log, then "
        "file); larger ones are written once, into a staged file the record points to.",
        min=0,
        max=16384,
    )
    log_segment_mb: int = setting(
        64, "Size of one log segment file (MB); each writing process keeps about two.", min=4
    )
    group_wait_ms: float = setting(
        0.0,
        "How long a group's flush waits for more writers to join it (ms; 0 = flush at once, "
        "writers arriving meanwhile form the next group).",
        min=0.0,
        max=50.0,
    )
    checkpoint_seconds: float = setting(
        30.0,
        "Longest time an object stays in the log before its file is flushed and the log "
        "space reused (a full segment is checkpointed at once).",
        min=0.5,
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = setting(
        "INFO",
        "Log level: DEBUG, INFO, WARNING, ERROR.",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    )
    file: str = setting("", "Log to this file instead of standard error.")


@dataclass(frozen=True)
class Settings:
    """Everything the archive is configured with. Built by `load_settings`, never mutated."""

    data_dir: Path = setting(Path("pacsgrid-data"), "Folder for the default index and site.")
    database: str = setting(
        "",
        "Index database: sqlite:///path or a PostgreSQL conninfo/URL. "
        "Default: sqlite under data_dir.",
    )
    dicom: DicomSettings = field(default_factory=DicomSettings)
    replication: ReplicationSettings = field(default_factory=ReplicationSettings)
    repair: RepairSettings = field(default_factory=RepairSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    log: LogSettings = field(default_factory=LogSettings)
    forwarding: ForwardingSettings = field(default_factory=ForwardingSettings)
    commitment: CommitmentSettings = field(default_factory=CommitmentSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    hl7: Hl7Settings = field(default_factory=Hl7Settings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    audit_log: AuditLogSettings = field(default_factory=AuditLogSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)
    durability: DurabilitySettings = field(default_factory=DurabilitySettings)
    peers: tuple[PeerSettings, ...] = ()
    sites: tuple[SiteSettings, ...] = ()
    forward: tuple[ForwardRule, ...] = ()

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    @property
    def audit_path(self) -> Path:
        return Path(self.audit_log.file) if self.audit_log.file else self.data_dir / "audit.jsonl"

    @property
    def web_auth_required(self) -> bool:
        """Auth is on whenever the web server is reachable from other machines."""
        if self.http.auth != "auto":
            return self.http.auth == "on"
        return self.http.bind not in ("127.0.0.1", "localhost", "::1") and not (
            self.http.bind.startswith("127.")
        )

    @property
    def backup_dir(self) -> Path:
        d = self.backup.dir
        if str(d) in ("", "."):
            return self.data_dir / "backups"
        return d if d.is_absolute() else self.data_dir / d

    def peer(self, ae_title: str) -> PeerSettings | None:
        for p in self.peers:
            if p.ae_title == ae_title:
                return p
        return None


SECTIONS = {
    "dicom": DicomSettings,
    "replication": ReplicationSettings,
    "repair": RepairSettings,
    "audit": AuditSettings,
    "log": LogSettings,
    "forwarding": ForwardingSettings,
    "commitment": CommitmentSettings,
    "http": HttpSettings,
    "hl7": Hl7Settings,
    "retention": RetentionSettings,
    "audit_log": AuditLogSettings,
    "index": IndexSettings,
    "backup": BackupSettings,
    "durability": DurabilitySettings,
}
LISTS = {"peers": PeerSettings, "sites": SiteSettings, "forward": ForwardRule}
TOP_LEVEL = ("data_dir", "database")
# Command-line options whose name is not the key's own (for error messages).
