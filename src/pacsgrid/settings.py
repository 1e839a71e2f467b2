"""Typed, frozen settings: one TOML file, `PACSGRID_*` environment overrides, command-line options.

Each setting is declared once, here, with its default and a help line (`setting()`); the loader,
the error messages and `docs/configuration.md` are all derived from those declarations, so the
documentation cannot drift from the code (a test regenerates it and compares).

Precedence, lowest first: built-in defaults, the TOML file, `PACSGRID_<SECTION>_<KEY>`
environment variables, command-line options. A wrong value stops start-up with one line that
names the key, e.g. ``dicom.port: must be an integer from 1 to 65535, got 'abc'``.

Relative paths in a config file are resolved against the folder of that file; relative paths on
the command line against the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pacsgrid.errors import ConfigError

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
    port: int = setting(11112, "DICOM listening port.", min=1, max=65535)
    bind: str = setting("0.0.0.0", "Address the DICOM listener binds to (0.0.0.0 = all).")
    workers: int = setting(
        0, "DICOM worker processes sharing the port (0 = one per CPU core).", min=0, max=64
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
    shutdown_grace: float = setting(
        10.0,
        "On SIGTERM, seconds in-flight associations get to finish before they are aborted.",
        min=0.0,
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
        1 << 30, "Largest request body accepted (bytes); larger STOW-RS requests get 413.", min=1
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
    http: HttpSettings = field(default_factory=HttpSettings)
    audit_log: AuditLogSettings = field(default_factory=AuditLogSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)
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
    "http": HttpSettings,
    "audit_log": AuditLogSettings,
    "index": IndexSettings,
    "backup": BackupSettings,
}
LISTS = {"peers": PeerSettings, "sites": SiteSettings, "forward": ForwardRule}
TOP_LEVEL = ("data_dir", "database")
# Command-line options whose name is not the key's own (for error messages).
_FLAGS = {"http.port": "--http-port", "http.bind": "--http-bind"}


# ---------------------------------------------------------------- validation of single values


def _type_name(tp: Any) -> str:
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        Path: "a path",
    }.get(tp, str(tp))


def _convert(key: str, f: dataclasses.Field[Any], raw: Any, from_text: bool) -> Any:
    """Turn a raw TOML/env/CLI value into the field's type, or raise ConfigError naming `key`."""
    tp = _field_type(f)
    meta = f.metadata
    value: Any
    if typing.get_origin(tp) is tuple:
        if from_text and isinstance(raw, str):
            raw = [x.strip() for x in raw.split(",") if x.strip()]
        if not isinstance(raw, list | tuple):
            raise ConfigError(key, f"must be a list, got {raw!r}")
        value = tuple(str(x) for x in raw)
        choices = meta.get("choices")
        for item in value:
            if choices and item not in choices:
                raise ConfigError(key, f"{item!r} is not one of: {', '.join(choices)}")
        return value
    if tp is bool:
        if from_text and isinstance(raw, str):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if not isinstance(raw, bool):
            raise ConfigError(key, f"must be true or false, got {raw!r}")
        return raw
    if tp in (int, float):
        lo, hi = meta.get("min"), meta.get("max")
        expect = _type_name(tp)
        if lo is not None:
            expect += f" from {lo} to {hi}" if hi is not None else f" of at least {lo}"
        value = None
        if not isinstance(raw, bool) and (from_text or isinstance(raw, int | float)):
            try:
                value = tp(raw)
            except (TypeError, ValueError):
                value = None
            if tp is int and isinstance(raw, float) and not raw.is_integer():
                value = None
        if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(key, f"must be {expect}, got {raw!r}")
        return value
    if tp is Path:
        if not isinstance(raw, str | Path) or not str(raw):
            raise ConfigError(key, f"must be a path, got {raw!r}")
        return Path(raw)
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(key, f"must be a string, got {raw!r}")
        if meta.get("ae") and not AE_TITLE_RE.match(raw.strip() or "x" * 17):
            raise ConfigError(
                key,
                f"must be an AE title of 1 to 16 printable characters "
                f"without backslash, got {raw!r}",
            )
        if meta.get("ae"):
            raw = raw.strip()
        choices = meta.get("choices")
        if choices:
            norm = raw.upper() if all(c.isupper() for c in choices) else raw.lower()
            if norm not in choices:
                raise ConfigError(key, f"must be one of {', '.join(choices)}, got {raw!r}")
            raw = norm
        pattern = meta.get("pattern")
        if pattern and not re.match(pattern, raw):
            raise ConfigError(key, f"invalid value {raw!r}")
        return raw
    raise AssertionError(f"unsupported setting type {tp!r}")  # a bug in this module


def _field_type(f: dataclasses.Field[Any]) -> Any:
    hints = _hints_cache.get(id(f))
    if hints is None:
        raise AssertionError(f"unknown field {f.name}")
    return hints


_hints_cache: dict[int, Any] = {}
for _cls in (
    PeerSettings,
    SiteSettings,
    DicomSettings,
    ReplicationSettings,
    RepairSettings,
    AuditSettings,
    LogSettings,
    ForwardRule,
    ForwardingSettings,
    HttpSettings,
    AuditLogSettings,
    IndexSettings,
    BackupSettings,
    Settings,
):
    _h = typing.get_type_hints(_cls)
    for _f in dataclasses.fields(_cls):
        _t = _h[_f.name]
        if isinstance(_t, types.UnionType):
            _t = next(a for a in typing.get_args(_t) if a is not type(None))
        _hints_cache[id(_f)] = _t


def _unknown(key: str, name: str, known: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(key, f"unknown setting{hint}")


def _build(
    cls: type[Any],
    prefix: str,
    raw: Mapping[str, Any],
    from_text: bool = False,
    base: Path | None = None,
) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, f"must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, val in raw.items():
        if name not in fields:
            raise _unknown(f"{prefix}.{name}", name, fields)
        values[name] = _convert(f"{prefix}.{name}", fields[name], val, from_text)
    for name, f in fields.items():
        if f.metadata.get("required") and not values.get(name):
            raise ConfigError(f"{prefix}.{name}", "is required")
    return cls(**values)


# ---------------------------------------------------------------- command-line shorthands

PEER_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")


def parse_peer(text: str, key: str = "--peer") -> PeerSettings:
    """Parse ``AET@HOST:PORT`` (as given to ``--peer`` and ``migrate pull --from``)."""
    m = PEER_RE.match(text.strip())
    if not m:
        raise ConfigError(key, f"expected AET@HOST:PORT, got {text!r}")
    raw = {"ae_title": m["ae"], "host": m["host"].strip("[]"), "port": int(m["port"])}
    return typing.cast(PeerSettings, _build(PeerSettings, key, raw))


SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str, key: str) -> int:
    """Bytes from ``500000``, ``500MB``, ``20GB``, ``1.5TB`` (KiB/MiB/GiB: powers of 1024)."""
    m = SIZE_RE.match(text)
    if not m:
        raise ConfigError(key, f"expected a size such as 500MB or 2TB, got {text!r}")
    unit = (m[2] or "").upper()
    factor = _UNITS.get(unit[:1], 1)
    if "I" in unit:
        factor = 1024 ** " KMGT".index(unit[0])
    return int(float(m[1]) * factor)


def parse_site_options(
    sites: Sequence[str],
    locations: Sequence[str] = (),
    roles: Sequence[str] = (),
    capacities: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """``--site NAME=URL`` (repeatable) plus ``--site-location/-role/-capacity NAME=VALUE``,
    as raw `[[sites]]` tables (validated like the config file's)."""
    out: dict[str, dict[str, Any]] = {}
    for text in sites:
        name, sep, url = text.partition("=")
        if not sep or not name.strip() or not url.strip():
            raise ConfigError("--site", f"expected NAME=URL, got {text!r}")
        if name.strip() in out:
            raise ConfigError("--site", f"site {name.strip()!r} given twice")
        out[name.strip()] = {"name": name.strip(), "url": url.strip()}
    for option, field_name, values in (
        ("--site-location", "location", locations),
        ("--site-role", "role", roles),
        ("--site-capacity", "capacity", capacities),
    ):
        for text in values:
            name, sep, value = text.partition("=")
            if not sep or not value.strip():
                raise ConfigError(option, f"expected NAME=VALUE, got {text!r}")
            if name.strip() not in out:
                raise ConfigError(option, f"no --site named {name.strip()!r}")
            raw: Any = value.strip()
            if field_name == "capacity":
                raw = parse_size(raw, option)
            out[name.strip()][field_name] = raw
    return list(out.values())


@dataclass
class Overrides:
    """What the command line says; None means 'not given'."""

    config: Path | None = None
    data_dir: Path | None = None
    database: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # "dicom.port" -> raw value
    peers: list[str] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)


def load_settings(
    overrides: Overrides | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the config file (if any), apply environment and command-line overrides, validate."""
    ov = overrides or Overrides()
    env = os.environ if environ is None else environ
    doc: dict[str, Any] = {}
    base = Path.cwd()
    config_path = ov.config or (
        Path(env["PACSGRID_CONFIG"]) if env.get("PACSGRID_CONFIG") else None
    )
    if config_path is not None:
        try:
            with open(config_path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {config_path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(config_path), f"not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(str(config_path), f"cannot read: {e.strerror}") from None
        base = config_path.resolve().parent

    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    top: dict[str, Any] = {}
    lists: dict[str, list[Any]] = {name: [] for name in LISTS}
    for name, val in doc.items():
        if name in SECTIONS:
            if not isinstance(val, dict):
                raise ConfigError(name, "must be a table, e.g. [" + name + "]")
            sections[name].update(val)
        elif name in LISTS:
            if not isinstance(val, list):
                raise ConfigError(name, f"must be an array of tables, e.g. [[{name}]]")
            lists[name] = list(val)
        elif name in TOP_LEVEL:
            top[name] = val
        else:
            raise _unknown(name, name, [*SECTIONS, *LISTS, *TOP_LEVEL])

    # Environment: PACSGRID_DICOM_PORT=104, PACSGRID_DATABASE=..., PACSGRID_DATA_DIR=...
    env_text: dict[str, dict[str, str]] = {}
    for var, val in env.items():
        if not var.startswith("PACSGRID_") or var == "PACSGRID_CONFIG":
            continue
        rest = var[len("PACSGRID_") :].lower()
        if rest in TOP_LEVEL:
            top[rest] = val
            continue
        section, _, key = rest.partition("_")
        if section in SECTIONS and key:
            env_text.setdefault(section, {})[key] = val

    if ov.data_dir is not None:
        top["data_dir"] = str(ov.data_dir)
    if ov.database is not None:
        top["database"] = ov.database

    data_dir = Path(str(top.get("data_dir", "pacsgrid-data")))
    if not data_dir.is_absolute():
        data_dir = (base if "data_dir" in doc and ov.data_dir is None else Path.cwd()) / data_dir
    database = top.get("database", "")
    if not isinstance(database, str):
        raise ConfigError("database", f"must be a string, got {database!r}")
    if database.startswith("sqlite:///") and not database.startswith("sqlite:////"):
        rel = database[len("sqlite:///") :]
        if rel and not Path(rel).is_absolute():
            database = "sqlite:///" + str(
                ((base if ov.database is None else Path.cwd()) / rel).resolve()
            )
    elif database and not database.startswith(
        ("sqlite:", "postgres", "host=", "dbname=", "user=", "port=")
    ):
        raise ConfigError(
            "database", f"expected sqlite:///path or a PostgreSQL conninfo/URL, got {database!r}"
        )

    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        obj = _build(cls, name, sections[name])
        if name in env_text:
            merged = {**{k: getattr(obj, k) for k in sections[name]}, **env_text[name]}
            fields = {f.name: f for f in dataclasses.fields(cls)}
            vals = {}
            for k, v in merged.items():
                if k not in fields:
                    raise _unknown(f"PACSGRID_{name.upper()}_{k.upper()}", k, fields)
                vals[k] = _convert(f"{name}.{k}", fields[k], v, isinstance(v, str))
            obj = cls(**vals)
        built[name] = obj
    for dotted, raw in ov.values.items():
        name, _, key = dotted.partition(".")
        cls = SECTIONS[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        flag = _FLAGS.get(dotted, f"--{key.replace('_', '-')}")
        built[name] = dataclasses.replace(
            built[name], **{key: _convert(flag, fields[key], raw, True)}
        )

    peers = [_build(PeerSettings, f"peers[{i}]", p) for i, p in enumerate(lists["peers"])]
    peers += [parse_peer(text) for text in ov.peers]
    seen: set[str] = set()
    for i, p in enumerate(peers):
        if p.ae_title in seen:
            raise ConfigError(f"peers[{i}].ae_title", f"duplicate AE title {p.ae_title!r}")
        seen.add(p.ae_title)

    site_docs = list(lists["sites"])
    if ov.sites:
        site_docs = list(ov.sites)  # sites on the command line replace those of the file
    sites = [_build(SiteSettings, f"sites[{i}]", s) for i, s in enumerate(site_docs)]
    sites = [
        _resolve_site_url(
            s, f"sites[{i}].url", base if i < len(lists["sites"]) and not ov.sites else Path.cwd()
        )
        for i, s in enumerate(sites)
    ]
    if not sites:
        sites = [SiteSettings(name="local", url=(data_dir / "objects").resolve().as_uri())]
    names: set[str] = set()
    for i, s in enumerate(sites):
        if s.name in names:
            raise ConfigError(f"sites[{i}].name", f"duplicate site name {s.name!r}")
        names.add(s.name)
        if s.role == "cache" and s.low_watermark > s.high_watermark:
            raise ConfigError(f"sites[{i}].low_watermark", "must not exceed high_watermark")

    forward = [_build(ForwardRule, f"forward[{i}]", r) for i, r in enumerate(lists["forward"])]

    settings = Settings(
        data_dir=data_dir,
        database=database,
        peers=tuple(peers),
        sites=tuple(sites),
        forward=tuple(forward),
        **built,
    )
    _check_policy(settings)
    return settings


def _resolve_site_url(site: SiteSettings, key: str, base: Path) -> SiteSettings:
    url = site.url
    if url.startswith("file://"):
        path = url[len("file://") :]
        if not path.startswith("/"):
            path = str((base / path).resolve())
        return dataclasses.replace(site, url="file://" + path)
    if url.startswith("s3://"):
        return site
    if "://" not in url:  # a bare path is a filesystem site
        return dataclasses.replace(site, url=(base / url).resolve().as_uri())
    raise ConfigError(key, f"unsupported scheme in {url!r} (use file:// or s3://)")


def _check_policy(s: Settings) -> None:
    for i, rule in enumerate(s.forward):
        if s.peer(rule.to) is None:
            raise ConfigError(
                f"forward[{i}].to", f"{rule.to!r} is not a configured peer (add it to [[peers]])"
            )
    d = s.dicom
    if (d.tls_port or s.http.tls) and not (d.tls_cert and d.tls_key):
        raise ConfigError("dicom.tls_cert", "TLS needs dicom.tls_cert and dicom.tls_key")
    if d.tls_verify_clients and not d.tls_ca:
        raise ConfigError("dicom.tls_ca", "tls_verify_clients needs a CA bundle")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(d, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"dicom.{key}", f"file not found: {value}")
    if s.http.viewer and not (Path(s.http.viewer) / "index.html").is_file():
        raise ConfigError("http.viewer", f"no index.html in {s.http.viewer} (OHIF's dist/ folder)")
    archives = [x for x in s.sites if x.role == "archive"]
    if not archives:
        raise ConfigError("sites", "at least one site must have role 'archive'")
    r = s.replication
    if r.write_quorum > r.copies:
        raise ConfigError(
            "replication.write_quorum",
            f"must not exceed replication.copies ({r.copies}), got {r.write_quorum}",
        )
    if r.copies > len(archives):
        raise ConfigError(
            "replication.copies",
            f"asks for {r.copies} copies but only {len(archives)} archive site(s) are configured",
        )


def describe_settings() -> str:
    """Markdown reference of every setting, generated from the declarations above."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `src/pacsgrid/settings.py` (`pacsgrid config-reference`); "
        "a test checks it is current.",
        "",
        "Precedence: built-in default < TOML file (`--config`) < environment "
        "(`PACSGRID_<SECTION>_<KEY>`, e.g. `PACSGRID_DICOM_PORT=104`) < command line.",
        "",
    ]

    def table(cls: type[Any], title: str, prefix: str) -> None:
        out.extend([f"## {title}", "", "| key | default | meaning |", "|---|---|---|"])
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            )
            if isinstance(default, tuple):
                default = ", ".join(default)
            shown = "" if default == "" else f"`{default}`"
            out.append(f"| `{prefix}{f.name}` | {shown} | {f.metadata['help']} |")
        out.append("")

    table(Settings, "Top level", "")
    for name, cls in SECTIONS.items():
        table(cls, f"[{name}]", f"{name}.")
    for name, cls in LISTS.items():
        table(cls, f"[[{name}]] (repeatable)", "")
    return "\n".join(out)
