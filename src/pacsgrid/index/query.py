"""DICOM attribute matching (PS3.4 C.2.2.2) turned into SQL.

`parse_match` reads one key of a C-FIND/QIDO request and decides its matching type: universal
(empty value or a lone `*`), single value, wildcard (`*`, `?`), range (dates and times), or a
list of values (UIDs; also CS such as Modality). `compile_where` renders the matches as SQL for
one engine, described by a `Dialect`; SQLite and PostgreSQL differ only in the placeholder, the
wildcard operator and the substring function.

Person names match case-insensitively, which PS3.4 allows and users expect: the index keeps an
upper-cased twin of each PN column (`*_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pacsgrid.model import BY_KEYWORD, COMPUTED, Level

MatchKind = Literal["single", "wildcard", "range", "list"]


@dataclass(frozen=True, slots=True)
class Match:
    keyword: str
    kind: MatchKind
    values: tuple[str, ...]  # range: (low, high), '' for an open end


@dataclass(frozen=True, slots=True)
class Query:
    level: Level
    matches: tuple[Match, ...] = ()
    limit: int | None = None
    offset: int = 0


def vr_of(keyword: str) -> str:
    if keyword in BY_KEYWORD:
        return BY_KEYWORD[keyword].vr
    if keyword in COMPUTED:
        return COMPUTED[keyword][1]
    return ""


def parse_match(keyword: str, value: str) -> Match | None:
    """The match a request key asks for; None means universal matching (no condition)."""
    vr = vr_of(keyword)
    value = value.strip() if vr != "PN" else value.strip().rstrip("^=")
    if value in ("", "*"):
        return None
    if vr == "UI":
        uids = tuple(u.strip().rstrip("\x00") for u in value.split("\\") if u.strip())
        return Match(keyword, "list" if len(uids) > 1 else "single", uids)
    if vr in ("DA", "TM", "DT") and "-" in value:
        low, _, high = value.partition("-")
        return Match(keyword, "range", (_clean_dt(vr, low), _clean_dt(vr, high)))
    if vr in ("DA", "TM", "DT", "CS", "IS", "SH", "LO") and "\\" in value:
        parts = tuple(v.strip() for v in value.split("\\") if v.strip())
        if vr in ("DA", "TM", "DT"):
            parts = tuple(_clean_dt(vr, v) for v in parts)
        return Match(keyword, "list", parts)
    if vr in ("DA", "TM", "DT"):
        return Match(keyword, "single", (_clean_dt(vr, value),))
    if "*" in value or "?" in value:
        return Match(keyword, "wildcard", (value,))
    return Match(keyword, "single", (value,))


def _clean_dt(vr: str, value: str) -> str:
    v = value.strip()
    if vr == "DA":
        return v.replace(".", "")  # ACR-NEMA style 2004.01.19
    if vr == "TM":
        return v.replace(":", "")
    return v


def normalize_stored(vr: str, value: str) -> str:
    """The form in which a value is kept for matching (same rules as the request side)."""
    if vr == "DA":
        return value.replace(".", "")
    if vr == "TM":
        return value.replace(":", "")
    return value


def pn_norm(value: str) -> str:
    """Case-folded person name for case-insensitive matching; empty trailing parts dropped."""
    return value.rstrip("^= ").upper()


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
            conds.append(f"{col} IN ({', '.join([ph] * len(values))})")
            params.extend(values)
        elif m.kind == "wildcard":
            pattern = wildcard_pattern(values[0], dialect)
            if dialect.wildcard_op == "GLOB":
                conds.append(f"{col} GLOB {ph}")
            else:
                conds.append(f"{col} LIKE {ph} ESCAPE '\\'")
            params.append(pattern)
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


def _time_upper(value: str) -> str:
    """The latest time a truncated upper bound covers: '10' -> '105959.999999'."""
    whole, _, frac = value.partition(".")
    if len(whole) in (2, 4):
        whole += "5959"[len(whole) - 2 :]
    return whole.ljust(6, "9") + "." + (frac + "999999")[:6]
