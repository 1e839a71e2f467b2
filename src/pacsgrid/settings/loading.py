"""Reading settings: TOML file, environment, command line; one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsgrid.errors import ConfigError
from pacsgrid.settings.masking import masked
from pacsgrid.settings.sections import (
    AE_TITLE_RE,
    LISTS,
    SECTIONS,
    TOP_LEVEL,
    DicomSettings,
    ForwardRule,
    PeerSettings,
    Settings,
    SiteSettings,
    parse_subject,
)

_FLAGS = {
    "http.port": "--http-port",
    "http.bind": "--http-bind",
    "hl7.port": "--hl7-port",
    "hl7.bind": "--hl7-bind",
}


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
for _cls in (*SECTIONS.values(), *LISTS.values(), Settings):
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
            raise ConfigError("--site", f"expected NAME=URL, got {masked(text)!r}")
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
        # The longest section name that fits: PACSGRID_AUDIT_LOG_TARGET is audit_log.target.
        for section in sorted(SECTIONS, key=len, reverse=True):
            if rest.startswith(section + "_") and len(rest) > len(section) + 1:
                env_text.setdefault(section, {})[rest[len(section) + 1 :]] = val
                break

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
    peers = [_peer_tls(p, built["dicom"], f"peers[{i}]") for i, p in enumerate(peers)]
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


def _peer_tls(p: PeerSettings, d: DicomSettings, key: str) -> PeerSettings:
    """A TLS peer's CA and client certificate, defaulting to the archive's own (dicom.tls_*),
    checked to exist: a wrong path stops start-up with one line naming the key."""
    if not p.tls:
        return p
    if p.tls_client_cert and not p.tls_client_key:
        raise ConfigError(f"{key}.tls_client_key", "tls_client_cert needs its private key")
    if p.tls_client_key and not p.tls_client_cert:
        raise ConfigError(f"{key}.tls_client_cert", "tls_client_key needs its certificate")
    cert, private = p.tls_client_cert, p.tls_client_key
    if not cert and d.tls_cert and d.tls_key:
        cert, private = d.tls_cert, d.tls_key
    p = dataclasses.replace(
        p, tls_ca=p.tls_ca or d.tls_ca, tls_client_cert=cert, tls_client_key=private
    )
    for name in ("tls_ca", "tls_client_cert", "tls_client_key"):
        value = getattr(p, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"{key}.{name}", f"file not found: {value}")
    return p


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
    raise ConfigError(key, f"unsupported scheme in {masked(url)!r} (use file:// or s3://)")


def _check_policy(s: Settings) -> None:
    for i, rule in enumerate(s.forward):
        if s.peer(rule.to) is None:
            raise ConfigError(
                f"forward[{i}].to", f"{rule.to!r} is not a configured peer (add it to [[peers]])"
            )
    d = s.dicom
    if not d.port and not d.tls_port:
        raise ConfigError("dicom.port", "is 0 (no plain DICOM) but dicom.tls_port is not set")
    for i, p in enumerate(s.peers):
        for j, text in enumerate(p.addresses):
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(
                    f"peers[{i}].addresses[{j}]",
                    f"expected an address or network such as 10.1.2.0/24, got {text!r}",
                ) from None
        if p.tls_subject:
            try:
                parse_subject(p.tls_subject)
            except ValueError as e:
                raise ConfigError(f"peers[{i}].tls_subject", str(e)) from None
        if (p.tls_subject or p.tls_fingerprint) and not (d.tls_port and d.tls_ca):
            raise ConfigError(
                f"peers[{i}].tls_subject" if p.tls_subject else f"peers[{i}].tls_fingerprint",
                "a certificate binding needs dicom.tls_port and dicom.tls_ca (client "
                "certificates are requested and checked against it)",
            )
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
