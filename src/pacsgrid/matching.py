"""DICOM attribute matching (PS3.4 C.2.2.2): what a C-FIND/QIDO key asks for.

`parse_match` reads one key of a request and decides its matching type: universal (empty value
or a lone `*`, returned as None), single value, wildcard (`*`, `?`), range (dates and times),
or a list of values (UIDs; also CS such as Modality). A `Query` is a level plus matches; the
index engines turn it into SQL (pacsgrid.index.sql_matching), front ends build it from requests.

Person names match case-insensitively, which PS3.4 allows and users expect.
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
        if not uids:
            return None
        return Match(keyword, "list" if len(uids) > 1 else "single", uids)
    if vr in ("DA", "TM", "DT") and "-" in value:
        low, _, high = value.partition("-")
        return Match(keyword, "range", (_clean_dt(vr, low), _clean_dt(vr, high)))
    if vr in ("DA", "TM", "DT", "CS", "IS", "SH", "LO") and "\\" in value:
        # Multiple values (PS3.4 C.2.2.2.8): an entity matches if any value matches.
        parts = tuple(v.strip() for v in value.split("\\") if v.strip())
        if vr in ("DA", "TM", "DT"):
            parts = tuple(_clean_dt(vr, v) for v in parts)
        if not parts or "*" in parts:
            return None
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
