"""The `pacsgrid` command: parse, dispatch, and turn errors into one line each."""

from __future__ import annotations

import argparse
import sys

from pacsgrid import __version__
from pacsgrid.cli import (
    archive_cmds,
    commitment_cmds,
    correct_cmds,
    deploy_cmds,
    drill_cmds,
    index_cmds,
    migrate_cmds,
    serve,
    sites_cmds,
    users,
)
from pacsgrid.cli.common import Parser
from pacsgrid.errors import ConfigError, PacsgridError


def build_parser() -> Parser:
    parser = Parser(prog="pacsgrid", description="A fault-tolerant DICOM archive.")
    parser.add_argument("--version", action="version", version=f"pacsgrid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    serve.add_parser(sub)
    archive_cmds.add_parsers(sub)
    sites_cmds.add_parsers(sub)
    index_cmds.add_parsers(sub)
    migrate_cmds.add_parsers(sub)
    commitment_cmds.add_parsers(sub)
    correct_cmds.add_parsers(sub)
    users.add_parser(sub)
    deploy_cmds.add_parsers(sub)
    drill_cmds.add_parsers(sub)
    p = sub.add_parser("cli-reference", help="print the reference of every command")
    p.set_defaults(func=lambda args: print(cli_reference()) or 0)
    return parser


def cli_reference() -> str:
    """Markdown of `pacsgrid --help` and every subcommand's help (docs/cli.md)."""
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # help text wraps to the terminal; keep the docs stable
    try:
        parser = build_parser()
        out = [
            "# Command-line reference",
            "",
            "Generated from `--help` (`pacsgrid cli-reference`); a test checks it is current.",
            "",
            "```",
            parser.format_help().rstrip(),
            "```",
            "",
        ]
        for name, p in _subcommands(parser, "pacsgrid"):
            out += [f"## {name}", "", "```", p.format_help().rstrip(), "```", ""]
        return "\n".join(out)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _subcommands(
    parser: argparse.ArgumentParser, prefix: str
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand under `parser`, nested ones too (`pacsgrid migrate pull`), in order."""
    out: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                out.append((f"{prefix} {name}", p))
                out += _subcommands(p, f"{prefix} {name}")
    return out


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
