"""Find every study a legacy PACS holds: C-FIND at STUDY level, sliced by date when it caps.

Many PACS answer at most N matches per C-FIND (Orthanc's LimitFindResults, dcm4chee's
QueryMaxNumberOfResults ...) and say so by a non-success final status, or silently. A query
whose answer looks capped (a final status other than Success, or `find_limit` answers or more)
is split: a date range in two halves, down to single days, then a day by StudyTime, down to one
minute. Studies whose StudyDate is empty match no date range; so when the first, unsliced query
(no --since/--until) is capped, a second sweep queries by PatientID prefix (`0*` ... `z*`,
longer prefixes where still capped), which finds them when they have a PatientID. A study with
neither, or with a PatientID that starts with a character outside [0-9A-Za-z.-^], can still be
missed behind a capping source ('_' is left out: some PACS match it as a wildcard); the summary
says when that can have happened.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pacsgrid.migrate.legacy import LegacySession
from pacsgrid.model import Level

log = logging.getLogger(__name__)

STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "PatientID",
    "NumberOfStudyRelatedInstances",
)
EARLIEST = dt.date(1900, 1, 1)
PREFIX_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.-^"


@dataclass(frozen=True)
class FoundStudy:
    study_uid: str
    study_date: str
    patient_id: str
    count: int  # NumberOfStudyRelatedInstances, -1 when the source did not say


@dataclass
class Discovery:
    studies: dict[str, FoundStudy] = field(default_factory=dict)
    queries: int = 0
    sliced: bool = False
    warnings: list[str] = field(default_factory=list)


def _da(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return -1


async def discover(
    session: LegacySession,
    since: dt.date | None = None,
    until: dt.date | None = None,
    find_limit: int = 0,
) -> Discovery:
    out = Discovery()

    async def query(date_value: str, time_value: str = "", patient_id: str = "") -> bool:
        """Run one query, keep its answers; True if the answer looks capped."""
        keys = {k: "" for k in STUDY_KEYS}
        keys["StudyDate"] = date_value
        keys["StudyTime"] = time_value
        keys["PatientID"] = patient_id
        result = await session.find(Level.STUDY, keys)
        out.queries += 1
        for row in result.rows:
            uid = row.get("StudyInstanceUID", "")
            if uid:
                out.studies[uid] = FoundStudy(
                    uid,
                    row.get("StudyDate", ""),
                    row.get("PatientID", ""),
                    _int(row.get("NumberOfStudyRelatedInstances", "")),
                )
        capped = not result.complete or (find_limit > 0 and len(result.rows) >= find_limit)
        if not result.complete:
            log.info(
                "C-FIND StudyDate=%r StudyTime=%r: %d answers, final status 0x%04X %s",
                date_value,
                time_value,
                len(result.rows),
                result.status,
                result.error,
            )
        return capped

    if since is None and until is None:
        if not await query(""):
            return out
        await _sweep_patient_ids(query, out)
    out.sliced = since is not None or until is not None
    lo = since or EARLIEST
    hi = until or dt.date.today() + dt.timedelta(days=1)
    stack: list[tuple[dt.date, dt.date]] = [(lo, hi)]
    while stack:
        a, b = stack.pop()
        value = _da(a) if a == b else f"{_da(a)}-{_da(b)}"
        if not await query(value):
            continue
        out.sliced = True
        if a < b:
            mid = a + (b - a) // 2
            stack += [(mid + dt.timedelta(days=1), b), (a, mid)]
        else:
            await _split_day(query, a, out)
    return out


async def _split_day(
    query: Callable[[str, str, str], Awaitable[bool]], day: dt.date, out: Discovery
) -> None:
    stack = [(0, 24 * 3600 - 1)]
    while stack:
        a, b = stack.pop()
        value = f"{_tm(a)}-{_tm(b)}"
        if not await query(_da(day), value, ""):
            continue
        if b - a >= 120:
            mid = (a + b) // 2
            stack += [(mid + 1, b), (a, mid)]
        else:
            out.warnings.append(
                f"{_da(day)} {value}: still capped at one minute; some studies may be missed"
            )


async def _sweep_patient_ids(
    query: Callable[[str, str, str], Awaitable[bool]], out: Discovery
) -> None:
    """Find undated studies behind a capping source: STUDY queries by PatientID prefix."""
    stack = list(reversed(PREFIX_CHARS))
    while stack:
        prefix = stack.pop()
        if await query("", "", prefix + "*"):
            if len(prefix) < 16:
                stack += [prefix + c for c in reversed(PREFIX_CHARS)]
            else:
                out.warnings.append(f"PatientID {prefix}*: still capped; studies may be missed")
    out.warnings.append(
        "the source caps its answers: studies with neither a StudyDate nor a PatientID "
        "starting with a letter, digit or .-^ cannot be found"
    )


def _tm(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
