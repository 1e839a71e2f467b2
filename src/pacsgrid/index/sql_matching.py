"""DICOM matching (pacsgrid.matching) turned into SQL.

`compile_where` renders a Query's matches as SQL for one engine, described by a `Dialect`;
SQLite and PostgreSQL differ only in the placeholder, the wildcard operator and the substring
function. Person names match case-insensitively: the index keeps an upper-cased twin of each PN
column (`*_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Re-exported: the matching model lives in pacsgrid.matching.
from pacsgrid.matching import Match, Query, normalize_stored, parse_match, pn_norm, vr_of
from pacsgrid.model import BY_KEYWORD, Level

__all__ = [
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "Match",
    "Query",
    "compile_where",
    "normalize_stored",
    "parse_match",
    "pn_norm",
    "vr_of",
    "wildcard_pattern",
]


@dataclass(frozen=True, slots=True)
class Dialect:
    placeholder: str  # "?" or "%s"
    wildcard_op: Literal["GLOB", "LIKE"]
    substring_fn: str  # instr(haystack, needle) / strpos(haystack, needle)


SQLITE = Dialect("?", "GLOB", "instr")
POSTGRES = Dialect("%s", "LIKE", "strpos")


def wildcard_pattern(value: str, dialect: Dialect) -> str:
    if dialect.wildcard_op == "GLOB":
        return value.replace("[", "[[]")
    out = []
    for ch in value:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


# Columns (as "alias.column") the query can refer to. Levels: p patient, st study,
# se series, i instance.
ALIAS = {Level.PATIENT: "p", Level.STUDY: "st", Level.SERIES: "se", Level.IMAGE: "i"}


def column_for(keyword: str) -> tuple[str, Level] | None:
    if keyword in BY_KEYWORD:
        a = BY_KEYWORD[keyword]
        col = a.column + ("_norm" if a.vr == "PN" else "")
        return f"{ALIAS[a.level]}.{col}", a.level
    if keyword == "ModalitiesInStudy":
        return "st.modalities", Level.STUDY
    if keyword == "SOPClassesInStudy":
        return "st.sop_classes", Level.STUDY
    return None


def compile_where(query: Query, dialect: Dialect) -> tuple[str, list[str]]:
    """SQL conditions (joined by AND) and their parameters for the matches of `query`.

    Keys below the query level are ignored, as PS3.4 C.4.1.2.1 describes.
    """
    ph = dialect.placeholder
    conds: list[str] = []
    params: list[str] = []
    for m in query.matches:
        target = column_for(m.keyword)
        if target is None:
            continue  # not an indexed attribute: it cannot restrict the match
        col, level = target
        if level.depth > query.level.depth:
            continue
        vr = vr_of(m.keyword)
        if m.keyword == "ModalitiesInStudy":
            # One row per (study, modality): an index lookup, not a scan of every study.
            conds.append(
                f"st.pk IN (SELECT study_pk FROM study_modality WHERE modality IN "
                f"({', '.join([ph] * len(m.values))}))"
            )
            params.extend(m.values)
            continue
        if m.keyword == "SOPClassesInStudy":
            # Stored as "\CT\MR\": the study matches if any requested value is among them.
            ors = []
            for v in m.values:
                ors.append(f"{dialect.substring_fn}({col}, {ph}) > 0")
                params.append("\\" + v + "\\")
            conds.append("(" + " OR ".join(ors) + ")")
            continue
        values = tuple(pn_norm(v) for v in m.values) if vr == "PN" else m.values
        if m.kind == "single":
            conds.append(f"{col} = {ph}")
            params.append(values[0])
        elif m.kind == "list":
            plain = [v for v in values if "*" not in v and "?" not in v]
            ors = []
            if plain:
                ors.append(f"{col} IN ({', '.join([ph] * len(plain))})")
                params.extend(plain)
            for v in values:
                if v not in plain:
                    ors.append(_wildcard_condition(col, dialect))
                    params.append(wildcard_pattern(v, dialect))
            conds.append("(" + " OR ".join(ors) + ")")
        elif m.kind == "wildcard":
            conds.append(_wildcard_condition(col, dialect))
            params.append(wildcard_pattern(values[0], dialect))
        elif m.kind == "range":
            low, high = values
            if low:
                conds.append(f"{col} >= {ph}")
                params.append(low)
            if high:
                if vr == "TM":
                    high = _time_upper(high)
                conds.append(f"{col} <= {ph}")
                params.append(high)
            conds.append(f"{col} <> ''")
    return " AND ".join(conds), params


def _wildcard_condition(col: str, dialect: Dialect) -> str:
    if dialect.wildcard_op == "GLOB":
        return f"{col} GLOB {dialect.placeholder}"
    return f"{col} LIKE {dialect.placeholder} ESCAPE '\\'"


def _time_upper(value: str) -> str:
    """The latest time a truncated upper bound covers: '10' -> '105959.999999'."""
    whole, _, frac = value.partition(".")
    if len(whole) in (2, 4):
        whole += "5959"[len(whole) - 2 :]
    return whole.ljust(6, "9") + "." + (frac + "999999")[:6]
