"""Users and API tokens of the web face: password hashing and their administration.

A mixin of `Archive`, so that user administration goes through the same authorisation and
audit as everything else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from pacsgrid import metrics
from pacsgrid.archive.records import ROLES, Caller
from pacsgrid.errors import ConfigError, NotFound
from pacsgrid.index import UserStore, WebUser

_SCRYPT = (1 << 14, 8, 1)  # n, r, p: ~50 ms and 16 MB per check
# What a login for a user without a password is checked against, so that it costs exactly what
# a wrong password costs (one scrypt): the answer must not tell which user names exist. The
# password it was made from was random and is not kept anywhere.
_NOBODY = (
    "scrypt$16384$8$1$46fa9d37fbdbdf3030595eff191ea1c2$"
    "5f81a86d82fb1e24b249a3a2eebb58bf3ffb5f6c873e05b80c6d71903759bd73"
)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    metrics.SCRYPT.inc()
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)


def hash_password(password: str) -> str:
    """scrypt with a random salt, as `scrypt$n$r$p$salt$hash` (hex)."""
    n, r, p = _SCRYPT
    salt = os.urandom(16)
    digest = _scrypt(password, salt, n, r, p)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, want = stored.split("$")
        if kind != "scrypt":
            return False
        got = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), want)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class UserAdmin:
    """Relies on Archive's `_index`, `authorize` and `audit`."""

    _index: UserStore

    def authorize(self, caller: Caller, operation: str, study: str = "") -> None:
        raise NotImplementedError

    def audit(
        self, caller: Caller, operation: str, outcome: str, study: str = "", detail: str = ""
    ) -> None:
        raise NotImplementedError

    def add_user(self, caller: Caller, name: str, role: str, password: str = "") -> None:
        """Create a user or change their role (and password, when one is given)."""
        self.authorize(caller, "admin")
        if role not in ROLES:
            raise ConfigError("--role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if not name or not name.isprintable() or ":" in name or len(name) > 64:
            raise ConfigError("user", f"invalid user name {name!r} (no ':', at most 64)")
        existing = self._index.user(name)
        stored = (
            hash_password(password) if password else (existing.password_hash if existing else "")
        )
        self._index.save_user(WebUser(name, role, stored))
        self.audit(caller, "admin", "success", "", f"user {name} role {role}")

    def remove_user(self, caller: Caller, name: str) -> bool:
        self.authorize(caller, "admin")
        removed = self._index.remove_user(name)
        self.audit(caller, "admin", "success", "", f"removed user {name}: {removed}")
        return removed

    def users(self, caller: Caller) -> list[WebUser]:
        self.authorize(caller, "admin")
        return self._index.users()

    def create_token(self, caller: Caller, name: str, label: str = "") -> str:
        """A new API token for user `name`; only its hash is kept, so it is shown once."""
        self.authorize(caller, "admin")
        if self._index.user(name) is None:
            raise NotFound(f"no user {name!r}")
        token = "pgt_" + secrets.token_urlsafe(32)
        self._index.save_token(token_hash(token), name, label)
        self.audit(caller, "admin", "success", "", f"token for {name} ({label})")
        return token

    def authenticate(self, name: str, password: str) -> WebUser | None:
        """The user, if `password` is theirs. One scrypt whether or not the user exists."""
        user = self._index.user(name)
        if user is None or not user.password_hash:
            check_password(password, _NOBODY)  # the cost of a real check, never a match
            return None
        return user if check_password(password, user.password_hash) else None

    def authenticate_token(self, token: str) -> WebUser | None:
        return self._index.token_user(token_hash(token))
