"""The `pacsgrid` command: parse, dispatch, and turn errors into one line each."""

from __future__ import annotations

import sys

from pacsgrid import __version__
from pacsgrid.cli import archive_cmds, deploy_cmds, index_cmds, serve
from pacsgrid.cli.common import Parser
from pacsgrid.errors import ConfigError, PacsgridError


def build_parser() -> Parser:
    parser = Parser(prog="pacsgrid", description="A fault-tolerant DICOM archive.")
    parser.add_argument("--version", action="version", version=f"pacsgrid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    serve.add_parser(sub)
    archive_cmds.add_parsers(sub)
    index_cmds.add_parsers(sub)
    deploy_cmds.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"pacsgrid: config error: {e}", file=sys.stderr)
        return 2
    except PacsgridError as e:
        print(f"pacsgrid: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pacsgrid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
