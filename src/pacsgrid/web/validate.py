"""Checks of what a request names: UIDs in paths and query values by VR (PS3.5 6.2).

A value that cannot be what its attribute holds is a 400 naming the key (a problem document
with an `invalid-params` member, RFC 9457), never a search that silently matches nothing: a
client that sends `StudyDate=abc` learns that its query is wrong, not that no study exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pacsgrid.web.problems import Problem

# PS3.5 9.1 forbids leading zeros in a component, but old modalities wrote them and the
# archive stores what it receives: such UIDs must stay reachable.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^[0-9]{8}$")
_TIME = re.compile(r"^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$")
_INTEGER = re.compile(r"^[+-]?[0-9]{1,12}$")
_MAX_TEXT = 256  # no indexed text VR holds more than 64 characters per value; be generous

FORMS = {
    "DA": "a date YYYYMMDD, a range DATE-DATE (either side may be empty) or a list",
    "TM": "a time HHMMSS[.FFFFFF] (or a prefix of it), a range TIME-TIME or a list",
    "UI": "UIDs (digits and dots, at most 64 characters), separated by commas or backslashes",
    "IS": "an integer, or a list of integers",
    "US": "an integer, or a list of integers",
}


def invalid(name: str, value: str, reason: str) -> Problem:
    """The 400 of a request key: `detail` names it, `invalid-params` too (RFC 9457)."""
    return Problem(
        400,
        f"{name}: {value[:60]!r} is not {reason}",
        extra={"invalid-params": [{"name": name, "reason": f"must be {reason}"}]},
    )


def uid(name: str, value: str) -> str:
    """A UID named in a request path; Problem(400) if it cannot be one."""
    if not value or len(value) > 64 or not _UID.match(value):
        raise invalid(name, value, "a UID (digits and dots, at most 64 characters)")
    return value


def query_value(keyword: str, vr: str, value: str) -> None:
    """Raise Problem(400) when `value` cannot match attribute `keyword` of VR `vr` under the
    PS3.4 C.2.2.2 matching rules the archive implements."""
    if "\x00" in value or len(value) > 16 * _MAX_TEXT:
        raise invalid(keyword, value, "text without NUL characters, at most 4096 long")
    text = value.strip()
    if text in ("", "*"):
        return  # universal matching
    check = _CHECKS.get(vr)
    if check is None:
        if any(len(v) > _MAX_TEXT for v in text.split("\\")):
            raise invalid(keyword, value, f"at most {_MAX_TEXT} characters per value")
        return
    for item in text.replace(",", "\\").split("\\") if vr == "UI" else text.split("\\"):
        if not check(item.strip()):
            raise invalid(keyword, value, FORMS[vr])


def _range_of(single: re.Pattern[str], clean: str) -> Callable[[str], bool]:
    def ok(item: str) -> bool:
        item = item.replace(clean, "") if clean else item
        if "-" in item:
            low, _, high = item.partition("-")
            return all(not side or single.match(side) for side in (low, high))
        return bool(single.match(item))

    return ok


_CHECKS: dict[str, Callable[[str], bool]] = {
    "DA": _range_of(_DATE, "."),
    "TM": _range_of(_TIME, ":"),
    "UI": lambda item: len(item) <= 64 and bool(_UID.match(item)),
    "IS": lambda item: bool(_INTEGER.match(item)),
    "US": lambda item: bool(_INTEGER.match(item)) and not item.startswith("-"),
}
