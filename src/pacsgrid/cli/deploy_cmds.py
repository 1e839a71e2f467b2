"""`pacsgrid haproxy-config`: HAProxy in front of several nodes, with a DICOM health check."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pacsgrid.cli.common import add_archive_options, settings_from
from pacsgrid.deploy import haproxy_config
from pacsgrid.errors import ConfigError

NODE_RE = re.compile(r"^(?:(?P<name>[A-Za-z0-9_-]+)=)?(?P<host>[^:=\s]+):(?P<port>\d{1,5})$")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "haproxy-config",
        help="print an haproxy.cfg for several nodes (DICOM-level health check)",
        description="Print a complete HAProxy configuration (TCP mode) that spreads "
        "associations over the given archive nodes and takes a node out of rotation when it "
        "stops answering a DICOM association + C-ECHO (a hung node, not only a dead one).",
    )
    add_archive_options(p)
    p.add_argument(
        "--node",
        action="append",
        default=[],
        required=True,
        metavar="[NAME=]HOST:PORT",
        help="an archive node (repeatable)",
    )
    p.add_argument("--listen", default=":104", help="address HAProxy accepts DICOM on")
    p.add_argument("--inter", default="2s", help="time between health checks (default 2s)")
    p.add_argument("--check-timeout", default="2s", help="a check slower than this fails")
    p.add_argument("--stats-socket", default="/run/haproxy/pacsgrid.sock")
    p.add_argument("--out", type=Path, help="write to FILE instead of standard output")
    p.set_defaults(func=run)


def parse_node(text: str, n: int) -> tuple[str, str, int]:
    m = NODE_RE.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ConfigError("--node", f"expected [NAME=]HOST:PORT, got {text!r}")
    return m["name"] or f"node{n}", m["host"], int(m["port"])


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    nodes = [parse_node(t, i + 1) for i, t in enumerate(args.node)]
    text = haproxy_config(
        nodes,
        listen=args.listen,
        called_ae=settings.dicom.ae_title,
        inter=args.inter,
        check_timeout=args.check_timeout,
        stats_socket=args.stats_socket,
    )
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0
