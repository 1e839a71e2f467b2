"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

Matching is the archive's C-FIND matching (single value, `*`/`?` wildcards, date/time ranges,
UID lists), reached through `Archive.find`. Query keys are keywords or tags (`PatientName`,
`00100010`); `includefield` adds attributes (or `all`); `limit`/`offset` page; fuzzy matching
is not offered (`fuzzymatching=true` is answered with a Warning header). A key the archive does
not index, one it cannot match on (the computed counts), one below the level searched, and a
value its VR cannot hold (`StudyDate=abc`, a malformed UID in the path or the query) are a 400
naming the key, rather than a filter silently ignored or a search that matches nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from pacsgrid.archive import Match, Query, parse_match
from pacsgrid.model import ATTRIBUTES, BY_KEYWORD, BY_TAG, COMPUTED, Level
from pacsgrid.web import validate
from pacsgrid.web.auth import requires
from pacsgrid.web.context import caller_of, ctx_of
from pacsgrid.web.dicomjson import attributes_json
from pacsgrid.web.problems import Problem

_COMPUTED_BY_TAG = {tag: kw for kw, (tag, _, _) in COMPUTED.items()}

DEFAULTS = {
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "StudyInstanceUID",
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDate",
        "SeriesTime",
        "NumberOfSeriesRelatedInstances",
    ),
    Level.IMAGE: (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "TransferSyntaxUID",  # returned as AvailableTransferSyntaxUID (0008,3002)
    ),
}
CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
# Keys a search can match on: every indexed attribute and two computed ones. The computed
# counts (NumberOfStudyRelatedInstances, ...) can be returned but not matched.
MATCHABLE = set(BY_KEYWORD) | {"ModalitiesInStudy", "SOPClassesInStudy"}


def keyword_of(key: str) -> str | None:
    """A QIDO attribute ID (keyword or 8 hex digits) as an archive keyword, or None."""
    if key in BY_KEYWORD or key in COMPUTED:
        return key
    if len(key) == 8:
        try:
            tag = int(key, 16)
        except ValueError:
            return None
        if tag in BY_TAG:
            return BY_TAG[tag].keyword
        return _COMPUTED_BY_TAG.get(tag)
    return None


def _level_of(keyword: str) -> Level:
    if keyword in BY_KEYWORD:
        return BY_KEYWORD[keyword].level
    return COMPUTED[keyword][2]


def _int(params: Any, name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 9:
        raise Problem(400, f"{name} must be a non-negative integer, got {raw[:40]!r}")
    return int(raw)


def build_query(
    level: Level, params: Any, path_uids: dict[str, str], max_results: int
) -> tuple[Query, set[str], list[str]]:
    """(query, return keywords, warnings) for a QIDO request; Problem(400) for bad input."""
    matches: list[Match] = []
    warnings: list[str] = []
    include: set[str] = set(DEFAULTS[level])
    for keyword, uid in path_uids.items():
        m = parse_match(keyword, validate.uid(keyword, uid))
        assert m is not None  # a valid UID is a single value
        matches.append(m)
        include.add(keyword)
    for name, value in params.items():
        if name in CONTROL:
            if name == "includefield":
                for field in value.replace(",", " ").split():
                    if field == "all":
                        include |= _all_fields(level)
                        continue
                    kw = keyword_of(field)
                    if kw is None:
                        warnings.append(f"includefield {field[:40]} is not indexed: not returned")
                        continue
                    include.add(kw)
            elif name == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise Problem(400, f"fuzzymatching must be true or false, got {value[:20]!r}")
                if value.lower() == "true":
                    warnings.append("fuzzy matching is not supported: matching is exact")
            continue
        kw = keyword_of(name)
        if kw is None:
            raise Problem(
                400,
                f"{name[:60]!r} is not an attribute this archive can match on "
                f"(use one of: {', '.join(a.keyword for a in ATTRIBUTES)})",
            )
        if _level_of(kw).depth > level.depth:
            raise Problem(
                400,
                f"{kw} is a {_level_of(kw).value.lower()}-level attribute: it cannot restrict a "
                f"{level.value.lower()} search",
            )
        vr = BY_KEYWORD[kw].vr if kw in BY_KEYWORD else COMPUTED[kw][1]
        validate.query_value(kw, vr, value)
        if vr == "UI":
            value = value.replace(",", "\\")
        m = parse_match(kw, value)
        if m is not None:
            if kw not in MATCHABLE:
                raise Problem(
                    400,
                    f"{kw} cannot be matched on (the archive computes it): send it without a "
                    "value to have it returned",
                    extra={"invalid-params": [{"name": kw, "reason": "cannot be matched on"}]},
                )
            matches.append(m)
        include.add(kw)
    limit = _int(params, "limit")
    offset = _int(params, "offset") or 0
    if limit is None:
        limit = max_results + 1  # one more, to tell whether the answer had to be cut
    elif limit > max_results:
        warnings.append(f"limit capped at {max_results} (http.max_results)")
        limit = max_results
    return Query(level, tuple(matches), limit, offset), include, warnings


def _all_fields(level: Level) -> set[str]:
    out = {a.keyword for a in ATTRIBUTES if a.level.depth <= level.depth}
    out |= {kw for kw, (_, _, lv) in COMPUTED.items() if lv.depth <= level.depth}
    return out


def result_json(
    rows: Iterable[dict[str, str]], include: set[str], level: Level, base: str
) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        values = {k: row.get(k, "") for k in include if k in row or k in BY_KEYWORD}
        url = f"{base}/studies/{row['StudyInstanceUID']}"
        if level.depth >= Level.SERIES.depth:
            url += f"/series/{row['SeriesInstanceUID']}"
        if level is Level.IMAGE:
            url += f"/instances/{row['SOPInstanceUID']}"
        values["RetrieveURL"] = url
        values["InstanceAvailability"] = "ONLINE"
        out.append(attributes_json(values))
    return out


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}/dicom-web"


async def _search(request: web.Request, level: Level, path_uids: dict[str, str]) -> web.Response:
    ctx = ctx_of(request)
    accept = request.headers.get("Accept", "*/*")
    if not any(
        t in accept for t in ("application/dicom+json", "application/json", "*/*", "application/*")
    ):
        raise Problem(406, "QIDO-RS answers application/dicom+json only")
    query, include, warnings = build_query(
        level, request.query, path_uids, ctx.settings.http.max_results
    )
    rows = await ctx.call(lambda: list(ctx.archive.find(caller_of(request), query)))
    cap = ctx.settings.http.max_results
    if len(rows) > cap:
        rows = rows[:cap]
        warnings.append(
            f"more than {cap} results: the answer stops at {cap} (http.max_results); "
            "page with limit and offset"
        )
    body = result_json(rows, include, level, base_url(request))
    headers = {}
    if warnings:
        headers["Warning"] = ", ".join(f'299 pacsgrid "{w}"' for w in warnings)
    return web.json_response(body, content_type="application/dicom+json", headers=headers)


@requires("find")
async def studies(request: web.Request) -> web.Response:
    return await _search(request, Level.STUDY, {})


@requires("find")
async def series(request: web.Request) -> web.Response:
    uids = (
        {"StudyInstanceUID": request.match_info["study"]} if "study" in request.match_info else {}
    )
    return await _search(request, Level.SERIES, uids)


@requires("find")
async def instances(request: web.Request) -> web.Response:
    uids = {}
    if "study" in request.match_info:
        uids["StudyInstanceUID"] = request.match_info["study"]
    if "series" in request.match_info:
        uids["SeriesInstanceUID"] = request.match_info["series"]
    return await _search(request, Level.IMAGE, uids)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/dicom-web/studies", studies)
    r.add_get("/dicom-web/series", series)
    r.add_get("/dicom-web/instances", instances)
    r.add_get("/dicom-web/studies/{study}/series", series)
    r.add_get("/dicom-web/studies/{study}/instances", instances)
    r.add_get("/dicom-web/studies/{study}/series/{series}/instances", instances)
