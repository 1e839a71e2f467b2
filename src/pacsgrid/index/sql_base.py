"""What every part of the shared SQL index builds on: connections, transactions, placeholders.

`SqlIndex` (index/sql.py) is assembled from mixins, one per concern (work queue, sites,
migration ledgers, web users); each inherits the engine hooks from `SqlBase`, and the
engines (SQLite, PostgreSQL) implement `_conn` and `_tx`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from pacsgrid.errors import IndexUnavailable
from pacsgrid.index.query import SQLITE, Dialect


def marks(n: int) -> str:
    """`?, ?, ...` for an IN list of n values."""
    return ", ".join("?" * n)


class SqlBase:
    url: str
    dialect: Dialect = SQLITE
    db_errors: tuple[type[Exception], ...] = ()  # the driver's errors, mapped to IndexUnavailable

    # ------------------------------------------------------------------ engine hooks
    def _conn(self) -> Any:
        """A connection for reads in the calling thread."""
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[Any]:
        """A write transaction; yields a connection (cursor-like `execute`)."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.dialect.placeholder == "?" else sql.replace("?", "%s")

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return list(self._conn().execute(self._sql(sql), params).fetchall())
        except self.db_errors as e:
            raise IndexUnavailable(f"index query failed: {e}") from e

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self._conn().execute(self._sql(sql), params).fetchone()
        except self.db_errors as e:
            raise IndexUnavailable(f"index query failed: {e}") from e

    def _x(self, db: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return db.execute(self._sql(sql), params)
