"""What every command shares: the options that locate the archive, settings, logging."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from pacsgrid.settings import Overrides, Settings, load_settings, parse_site_options


class Parser(argparse.ArgumentParser):
    """argparse, but a wrong option is one line naming it (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def add_archive_options(p: argparse.ArgumentParser) -> None:
    """--config, --data-dir and --database: every command takes them, so that
    `pacsgrid import --data-dir D` works on the archive `pacsgrid serve --data-dir D` serves."""
    g = p.add_argument_group("archive location")
    g.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file (see docs/configuration.md)",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="folder of the default index and storage site (default ./pacsgrid-data)",
    )
    g.add_argument(
        "--database",
        metavar="URL",
        help="index database: sqlite:///path or a PostgreSQL conninfo/URL, e.g. "
        "'host=db1,db2 dbname=pacs target_session_attrs=read-write' (default: SQLite "
        "under the data dir)",
    )
    g.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (default INFO)",
    )
    g = p.add_argument_group(
        "storage sites (replace the config file's [[sites]] when given)",
        "e.g. --site a=file:///srv/a --site b=s3://bucket/pacs?endpoint=http://10.0.0.9:8333 "
        "--site-location b=cloud --copies 2 --write-quorum 1",
    )
    g.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a storage site: file:///path, a bare path, or s3://bucket/prefix?endpoint=URL "
        "(repeatable)",
    )
    g.add_argument(
        "--site-location",
        action="append",
        default=[],
        metavar="NAME=LABEL",
        help="location label of a site; copies go to distinct locations first",
    )
    g.add_argument(
        "--site-role",
        action="append",
        default=[],
        metavar="NAME=ROLE",
        help="archive (default; never deletes) or cache (bounded, evicts)",
    )
    g.add_argument(
        "--site-capacity",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="capacity of a cache site, e.g. 50GB",
    )
    g.add_argument("--copies", metavar="N", help="archive copies of every object")
    g.add_argument(
        "--write-quorum", metavar="W", help="copies durable before a store is acknowledged"
    )


def overrides_from(args: argparse.Namespace) -> Overrides:
    ov = Overrides(config=args.config, data_dir=args.data_dir, database=args.database)
    if getattr(args, "log_level", None):
        ov.values["log.level"] = args.log_level
    ov.sites = parse_site_options(
        getattr(args, "site", []),
        getattr(args, "site_location", []),
        getattr(args, "site_role", []),
        getattr(args, "site_capacity", []),
    )
    if getattr(args, "copies", None) is not None:
        ov.values["replication.copies"] = args.copies
    if getattr(args, "write_quorum", None) is not None:
        ov.values["replication.write_quorum"] = args.write_quorum
    return ov


def settings_from(args: argparse.Namespace, ov: Overrides | None = None) -> Settings:
    return load_settings(ov or overrides_from(args))


def setup_logging(settings: Settings, *, quiet: bool = False) -> None:
    level = getattr(logging, settings.log.level)
    if quiet and level < logging.WARNING:
        level = logging.WARNING
    fmt = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"
    handler: logging.Handler
    if settings.log.file:
        handler = logging.FileHandler(settings.log.file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pacsgrid").setLevel(level)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
