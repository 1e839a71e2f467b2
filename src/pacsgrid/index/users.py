"""Users and API tokens of the web face (a mixin of SqlIndex)."""

from __future__ import annotations

import time

from pacsgrid.index.records import WebUser
from pacsgrid.index.sql_base import SqlBase


class UserQueries(SqlBase):
    # ------------------------------------------------------------------ web users
    def save_user(self, user: WebUser) -> None:
        with self._tx() as db:
            self._x(
                db,
                "INSERT INTO web_user (name, role, password_hash, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET role = excluded.role, "
                "password_hash = excluded.password_hash",
                (user.name, user.role, user.password_hash, time.time()),
            )

    def user(self, name: str) -> WebUser | None:
        r = self._one("SELECT name, role, password_hash FROM web_user WHERE name = ?", (name,))
        return None if r is None else WebUser(r[0], r[1], r[2])

    def users(self) -> list[WebUser]:
        rows = self._all("SELECT name, role, password_hash FROM web_user ORDER BY name")
        return [WebUser(r[0], r[1], r[2]) for r in rows]

    def remove_user(self, name: str) -> bool:
        with self._tx() as db:
            self._x(db, "DELETE FROM web_token WHERE user_name = ?", (name,))
            cur = self._x(db, "DELETE FROM web_user WHERE name = ?", (name,))
            return int(cur.rowcount) > 0

    def save_token(self, token_hash: str, user: str, label: str) -> None:
        with self._tx() as db:
            self._x(
                db,
                "INSERT INTO web_token (token_hash, user_name, label, created_at) "
                "VALUES (?, ?, ?, ?)",
                (token_hash, user, label, time.time()),
            )

    def token_user(self, token_hash: str) -> WebUser | None:
        r = self._one(
            "SELECT u.name, u.role, u.password_hash FROM web_token t JOIN web_user u "
            "ON t.user_name = u.name WHERE t.token_hash = ?",
            (token_hash,),
        )
        return None if r is None else WebUser(r[0], r[1], r[2])
