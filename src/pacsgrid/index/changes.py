"""The writes of a filed batch, described once and run the way each engine does best.

A change is one kind of write for many rows: rows inserted into a table (with an optional
ON CONFLICT clause), columns of existing rows increased or set (by primary key), or rows
deleted. Each renders two ways:
- `statement()`: the SQL for one row, run once per row (executemany): SQLite, in-process,
  where a statement costs next to nothing;
- `json_part()`: the SQL for all rows at once, passed as one JSON parameter: PostgreSQL puts
  every change of a batch into one statement (`combined`), so that the writes of a batch are
  parsed, planned and sent once, and go out with the COMMIT in one round trip.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pacsgrid.index.sql_base import marks

Rows = list[Sequence[Any]]

# Types of the columns changes update (JSON carries numbers and strings; the update says
# what they are). Inserts take their types from the table itself.
_TYPES = {
    "pk": "bigint",
    "instance_pk": "bigint",
    "num_instances": "integer",
    "num_series": "integer",
    "num_studies": "integer",
    "size": "bigint",
    "modalities": "text",
    "sop_classes": "text",
    "updated_at": "double precision",
}


@dataclass(frozen=True)
class Insert:
    table: str
    columns: tuple[str, ...]
    rows: Rows
    conflict: str = ""  # e.g. "ON CONFLICT (instance_pk, site) DO NOTHING"

    def statement(self) -> str:
        return (
            f"INSERT INTO {self.table} ({', '.join(self.columns)}) "
            f"VALUES ({marks(len(self.columns))}){self._on_conflict()}"
        )

    def json_part(self) -> str:
        cols = ", ".join(self.columns)
        return (
            f"INSERT INTO {self.table} ({cols}) SELECT {cols} FROM "
            f"json_populate_recordset(NULL::{self.table}, ?::json){self._on_conflict()}"
        )

    def json_rows(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def _on_conflict(self) -> str:
        return f" {self.conflict}" if self.conflict else ""


@dataclass(frozen=True)
class Update:
    """Rows of (*add, *put, pk): `add` columns increased by the value, `put` columns set."""

    table: str
    add: tuple[str, ...]
    put: tuple[str, ...]
    rows: Rows

    def statement(self) -> str:
        sets = [f"{c} = {c} + ?" for c in self.add] + [f"{c} = ?" for c in self.put]
        return f"UPDATE {self.table} SET {', '.join(sets)} WHERE pk = ?"

    def json_part(self) -> str:
        sets = [f"{c} = t.{c} + v.{c}" for c in self.add] + [f"{c} = v.{c}" for c in self.put]
        cols = ", ".join(f"{c} {_TYPES[c]}" for c in self._columns())
        return (
            f"UPDATE {self.table} t SET {', '.join(sets)} FROM json_to_recordset(?::json) "
            f"AS v({cols}) WHERE t.pk = v.pk"
        )

    def json_rows(self) -> list[dict[str, Any]]:
        return [dict(zip(self._columns(), row, strict=True)) for row in self.rows]

    def _columns(self) -> tuple[str, ...]:
        return (*self.add, *self.put, "pk")


@dataclass(frozen=True)
class Delete:
    table: str
    column: str  # rows are (value,): delete where column = value
    rows: Rows

    def statement(self) -> str:
        return f"DELETE FROM {self.table} WHERE {self.column} = ?"


Change = Insert | Update | Delete


def combined(changes: Sequence[Insert | Update]) -> tuple[str, list[str]]:
    """One statement making every change (data-modifying WITH queries) and its parameters.

    The parts see the same snapshot and none sees another's rows, so each must touch rows
    no other part touches (the planner writes new rows and existing ones in separate
    changes); foreign keys are checked at the end of the statement, when all rows are in."""
    parts = [f"w{n} AS ({c.json_part()})" for n, c in enumerate(changes)]
    params = [json.dumps(c.json_rows(), separators=(",", ":")) for c in changes]
    return f"WITH {', '.join(parts)} SELECT 1", params
