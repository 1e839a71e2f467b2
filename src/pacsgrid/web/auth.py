"""Who is asking: HTTP Basic (user and password) or a Bearer API token, and a role per route.

Auth is on whenever the web server listens on anything but loopback (`http.auth = "auto"`), or
when `http.auth = "on"`. With auth off every request acts as an anonymous admin (a single-user
workstation). Every route declares the archive operation it performs (`ROUTE_OPERATION`):
the middleware refuses a request whose caller's role does not allow it (403) before the
handler runs; the archive checks again where it acts, and audits both outcomes.

Passwords are checked with scrypt (slow on purpose), so a verified Basic credential is cached
for a minute, keyed by its SHA-256: a viewer loading hundreds of frames pays the check once.
The checks themselves run behind `LoginGate` (pacsgrid.web.logins): their own threads, a bound
on how many wait, and back-off for an address that keeps sending wrong passwords.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from pacsgrid.archive import Caller, WebUser
from pacsgrid.errors import AccessDenied
from pacsgrid.settings import HttpSettings
from pacsgrid.web.context import CALLER, ctx_of
from pacsgrid.web.logins import LoginGate
from pacsgrid.web.problems import Handler, problem_response

CHALLENGE = {"WWW-Authenticate": 'Basic realm="pacsgrid", charset="UTF-8"'}
ROUTE_OPERATION = "pacsgrid.operation"  # key in a route's handler attributes
PUBLIC = "public"
_TTL = 60.0


F = TypeVar("F", bound=Callable[..., Awaitable[web.StreamResponse]])


def requires(operation: str) -> Callable[[F], F]:
    """Mark a handler with the archive operation it performs (find, get, store, admin, public)."""

    def mark(handler: F) -> F:
        setattr(handler, "pacsgrid_operation", operation)  # noqa: B010
        return handler

    return mark


def operation_of(request: web.Request) -> str:
    handler = request.match_info.handler
    op = getattr(handler, "pacsgrid_operation", None)
    return op if isinstance(op, str) else "admin"  # undeclared routes: admins only


class Authenticator:
    def __init__(self, http: HttpSettings) -> None:
        self._basic: dict[str, tuple[float, WebUser]] = {}
        self.gate = LoginGate(http)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = ctx_of(request)
        archive = ctx.archive
        address = request.remote or ""
        operation = operation_of(request)
        if operation == PUBLIC or (request.path == "/health" and ctx.settings.http.public_health):
            request[CALLER] = Caller(address=address, via="web", role="read")
            return await handler(request)
        if not ctx.settings.web_auth_required:
            request[CALLER] = Caller(address=address, via="web", role="admin")
        else:
            user, why = await self._authenticate(request)
            if user is None:
                anonymous = Caller(address=address, via="web")
                archive.audit(
                    anonymous, "login", "denied", "", f"{request.method} {request.path}: {why}"
                )
                return problem_response(401, why, CHALLENGE)
            request[CALLER] = Caller(address=address, user=user.name, via="web", role=user.role)
        caller: Caller = request[CALLER]
        if operation not in ("admin-self",):
            try:
                archive.authorize(caller, operation, request.match_info.get("study", ""))
            except AccessDenied:
                return problem_response(
                    403, f"user {caller.user or 'anonymous'!r} ({caller.role}) may not {operation}"
                )
        return await handler(request)

    async def _authenticate(self, request: web.Request) -> tuple[WebUser | None, str]:
        ctx = ctx_of(request)
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if not header:
            return None, "credentials required (HTTP Basic or a Bearer API token)"
        if scheme == "bearer":
            user = await ctx.call(ctx.archive.authenticate_token, value.strip())
            return (user, "") if user else (None, "unknown or revoked API token")
        if scheme == "basic":
            key = hashlib.sha256(value.strip().encode()).hexdigest()
            hit = self._basic.get(key)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1], ""
            try:
                name, colon, password = (
                    base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                return None, "malformed Basic credentials"
            if not colon:
                return None, "malformed Basic credentials"
            address = request.remote or ""
            self.gate.admit(address)  # 429 while the address waits, or checks pile up
            user = await self.gate.check(ctx.archive.authenticate, name, password)
            if user is None:
                wait = self.gate.failed(address)
                if wait:
                    ctx.archive.audit(
                        Caller(address=address, via="web"),
                        "login",
                        "denied",
                        "",
                        f"wrong passwords from {address}: no password checked for {wait:g}s",
                    )
                return None, "wrong user name or password"
            if len(self._basic) > 10_000:
                self._basic.clear()
            self._basic[key] = (time.monotonic() + _TTL, user)
            return user, ""
        return None, f"unsupported authorization scheme {scheme!r}"
