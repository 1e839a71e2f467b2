"""`pacsgrid users`: the web face's users, their roles and API tokens.

    pacsgrid users add alice --role write          # asks for a password (or --password-stdin)
    pacsgrid users token alice --label scanner-7   # prints a new API token, once
    pacsgrid users list
    pacsgrid users remove alice

Users live in the index, so every node of a cluster sees the same ones. These commands act as
the local administrator and are recorded in the audit log like admin actions over HTTP.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from pacsgrid.archive import LOCAL, ROLES, Archive
from pacsgrid.cli.common import add_archive_options, settings_from, setup_logging
from pacsgrid.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("users", help="web users, roles and API tokens")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    a = verbs.add_parser("add", help="create a user or change their role/password")
    add_archive_options(a)
    a.add_argument("name")
    a.add_argument("--role", choices=ROLES, default="read", help="read, write or admin")
    a.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    a.add_argument("--no-password", action="store_true", help="token-only user (no password login)")
    a.set_defaults(func=run_add)

    t = verbs.add_parser("token", help="create an API token for a user (printed once)")
    add_archive_options(t)
    t.add_argument("name")
    t.add_argument("--label", default="", help="what the token is for")
    t.set_defaults(func=run_token)

    ls = verbs.add_parser("list", help="list users and roles")
    add_archive_options(ls)
    ls.set_defaults(func=run_list)

    rm = verbs.add_parser("remove", help="delete a user and their tokens")
    add_archive_options(rm)
    rm.add_argument("name")
    rm.set_defaults(func=run_remove)


def _archive(args: argparse.Namespace) -> Archive:
    settings = settings_from(args)
    setup_logging(settings, quiet=True)
    return Archive(settings, probe_interval=0)


def run_add(args: argparse.Namespace) -> int:
    password = ""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif not args.no_password:
        password = getpass.getpass(f"password for {args.name}: ")
        if password != getpass.getpass("again: "):
            raise ConfigError("password", "the two passwords differ")
    if not password and not args.no_password:
        raise ConfigError("password", "empty (use --no-password for a token-only user)")
    archive = _archive(args)
    try:
        archive.add_user(LOCAL, args.name, args.role, password)
    finally:
        archive.close()
    print(f"user {args.name}: role {args.role}")
    return 0


def run_token(args: argparse.Namespace) -> int:
    archive = _archive(args)
    try:
        token = archive.create_token(LOCAL, args.name, args.label)
    finally:
        archive.close()
    print(token)
    return 0


def run_list(args: argparse.Namespace) -> int:
    archive = _archive(args)
    try:
        for u in archive.users(LOCAL):
            print(f"{u.name}\t{u.role}\t{'password' if u.password_hash else 'token only'}")
    finally:
        archive.close()
    return 0


def run_remove(args: argparse.Namespace) -> int:
    archive = _archive(args)
    try:
        removed = archive.remove_user(LOCAL, args.name)
    finally:
        archive.close()
    print(f"user {args.name}: {'removed' if removed else 'no such user'}")
    return 0 if removed else 1
