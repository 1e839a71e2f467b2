"""What every part of the shared SQL index builds on: connections, transactions, placeholders.

`SqlIndex` (index/sql.py) is assembled from mixins, one per concern (work queue, sites,
migration ledgers, web users); each inherits the engine hooks from `SqlBase`, and the
engines (SQLite, PostgreSQL) implement the reads `_all` and `_one` and the writes `_tx`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from pacsgrid.index.sql_matching import SQLITE, Dialect


def marks(n: int) -> str:
    """`?, ?, ...` for an IN list of n values."""
    return ", ".join("?" * n)


class SqlBase:
    url: str
    dialect: Dialect = SQLITE

    # ------------------------------------------------------------------ engine hooks
    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of a read (raises IndexUnavailable)."""
        raise NotImplementedError

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a read, or None (raises IndexUnavailable)."""
        raise NotImplementedError

    def _tx(self, durable: bool = True) -> AbstractContextManager[Any]:
        """A write transaction; yields a connection (cursor-like `execute`). `durable=False`:
        the commit may return before it is on disk (see Index.add_batch)."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.dialect.placeholder == "?" else sql.replace("?", "%s")

    def _x(self, db: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return db.execute(self._sql(sql), params)
