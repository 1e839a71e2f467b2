"""The dashboard: small server-rendered pages, no JavaScript framework.

Built to stay fast on an index of millions of instances: every list is one paged index query
(`limit`/`offset` through `Archive.find`), never a full scan; totals and site usage, which do
cost a scan, are computed at most every few seconds and shared by every page (`WebContext.cached`).
Images are the WADO-RS thumbnails, loaded by the browser.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from pacsgrid.archive import Match, Query, parse_match
from pacsgrid.cli.common import human_bytes
from pacsgrid.model import Level
from pacsgrid.web.auth import requires
from pacsgrid.web.context import caller_of, ctx_of
from pacsgrid.web.problems import Problem

PAGE = 50
STATUS_TTL = 5.0

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2733;background:#f4f6f8}
header{background:#17324d;color:#fff;padding:8px 16px;display:flex;gap:18px;align-items:center}
header a{color:#cfe3f7;text-decoration:none}header b{font-size:16px;margin-right:12px}
main{padding:16px}table{border-collapse:collapse;background:#fff;width:100%}
th,td{border-bottom:1px solid #dde3e8;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#e9eef2}.up{color:#17803d;font-weight:bold}.down{color:#c0262d;font-weight:bold}
.cards{display:flex;gap:12px;margin-bottom:14px}.card{background:#fff;padding:10px 14px;
border:1px solid #dde3e8}.card b{display:block;font-size:20px}form{margin:0 0 12px}
input,select{padding:3px 5px;margin-right:6px}.thumbs{display:flex;flex-wrap:wrap;gap:10px}
.thumb{background:#fff;border:1px solid #dde3e8;padding:6px;width:150px;font-size:12px}
.thumb img{width:128px;height:128px;object-fit:contain;background:#000;display:block}
.muted{color:#6b7a88}
"""


def page(title: str, body: str, *, viewer: bool = False) -> web.Response:
    nav = [
        ("/", "Studies"),
        ("/ui/sites", "Sites"),
        ("/ui/jobs", "Jobs"),
        ("/ui/failures", "Failures"),
        ("/ui/corrections", "Corrections"),
    ]
    if viewer:
        nav.append(("/viewer/", "Viewer"))
    links = "".join(f'<a href="{href}">{label}</a>' for href, label in nav)
    html = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)} - pacsgrid"
        f"</title><style>{CSS}</style></head><body><header><b>pacsgrid</b>{links}"
        f"<a href='/metrics'>Metrics</a><a href='/health'>Health</a></header>"
        f"<main><h2>{escape(title)}</h2>{body}</main></body></html>"
    )
    return web.Response(text=html, content_type="text/html")


def _e(value: Any) -> str:
    return escape(str(value))


def _date(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


def _pn(text: str) -> str:
    return text.replace("^", " ").strip()


def _offset(request: web.Request) -> int:
    raw = request.query.get("offset", "0")
    if not raw.isdigit() or len(raw) > 9:
        raise Problem(400, "offset must be a non-negative integer")
    return int(raw)


FILTERS = (
    ("PatientName", "Patient name", "SMITH*"),
    ("PatientID", "Patient ID", ""),
    ("StudyDate", "Study date", "20240101-20241231"),
    ("ModalitiesInStudy", "Modality", "CT"),
    ("AccessionNumber", "Accession", ""),
)


def _study_query(request: web.Request, offset: int) -> Query:
    matches: list[Match] = []
    for key, _, _ in FILTERS:
        value = request.query.get(key, "").strip()
        if not value:
            continue
        if len(value) > 200:
            raise Problem(400, f"{key} is too long")
        if key == "PatientName" and "*" not in value and "?" not in value:
            value += "*"  # a person types the start of a name
        if key == "StudyDate":
            value = value.replace("-", "") if value.count("-") != 1 else value
        m = parse_match(key, value)
        if m is not None:
            matches.append(m)
    return Query(Level.STUDY, tuple(matches), PAGE + 1, offset)


@requires("find")
async def studies(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    offset = _offset(request)
    query = _study_query(request, offset)
    rows = await ctx.call(lambda: list(ctx.archive.find(caller_of(request), query)))
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    st = await ctx.cached("status", STATUS_TTL, lambda: ctx.archive.status(probe=True))
    i = st.index
    down = [s.name for s in st.sites if not s.up]
    cards = (
        f"<div class='cards'><div class='card'><b>{i.studies}</b>studies</div>"
        f"<div class='card'><b>{i.series}</b>series</div>"
        f"<div class='card'><b>{i.instances}</b>instances</div>"
        f"<div class='card'><b>{_e(human_bytes(i.bytes))}</b>stored</div>"
        f"<div class='card'><b class='{'down' if down else 'up'}'>"
        f"{len(st.sites) - len(down)}/{len(st.sites)}</b>sites up</div></div>"
    )
    inputs = "".join(
        f"<input name='{k}' placeholder='{_e(label)}{' e.g. ' + ph if ph else ''}' "
        f"value='{_e(request.query.get(k, ''))}'>"
        for k, label, ph in FILTERS
    )
    form = f"<form method='get' action='/'>{inputs}<button>Search</button></form>"
    body = [
        "<table id='studies'><tr><th>Patient</th><th>Patient ID</th><th>Date</th>"
        "<th>Modalities</th><th>Description</th><th>Accession</th><th>Series</th>"
        "<th>Instances</th><th></th></tr>"
    ]
    viewer = bool(ctx.settings.http.viewer)
    for r in rows:
        uid = r["StudyInstanceUID"]
        open_viewer = (
            f"<a href='/viewer/viewer?StudyInstanceUIDs={quote(uid)}'>view</a>" if viewer else ""
        )
        body.append(
            f"<tr class='study'><td><a href='/ui/studies/{quote(uid)}'>"
            f"{_e(_pn(r['PatientName']) or '(no name)')}</a></td>"
            f"<td>{_e(r['PatientID'])}</td><td>{_e(_date(r['StudyDate']))}</td>"
            f"<td>{_e(r['ModalitiesInStudy'].replace(chr(92), ', '))}</td>"
            f"<td>{_e(r['StudyDescription'])}</td><td>{_e(r['AccessionNumber'])}</td>"
            f"<td>{_e(r['NumberOfStudyRelatedSeries'])}</td>"
            f"<td>{_e(r['NumberOfStudyRelatedInstances'])}</td><td>{open_viewer}</td></tr>"
        )
    body.append("</table>")
    body.append(_pager(request, offset, more, len(rows)))
    return page("Studies", cards + form + "".join(body), viewer=viewer)


def _pager(request: web.Request, offset: int, more: bool, shown: int) -> str:
    params = {k: v for k, v in request.query.items() if k != "offset"}
    links = []
    if offset > 0:
        prev = urlencode({**params, "offset": max(0, offset - PAGE)})
        links.append(f"<a href='?{prev}'>&larr; previous</a>")
    if more:
        nxt = urlencode({**params, "offset": offset + PAGE})
        links.append(f"<a href='?{nxt}' id='next'>next &rarr;</a>")
    span = f"{offset + 1}-{offset + shown}" if shown else "none"
    return f"<p class='muted'>showing {span} {' | '.join(links)}</p>"


@requires("find")
async def study(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    uid = request.match_info["study"]
    caller = caller_of(request)
    by_study = (Match("StudyInstanceUID", "single", (uid,)),)
    rows = await ctx.call(lambda: list(ctx.archive.find(caller, Query(Level.STUDY, by_study, 1))))
    if not rows:
        raise Problem(404, f"no study {uid[:80]}")
    st = rows[0]
    series = await ctx.call(
        lambda: list(ctx.archive.find(caller, Query(Level.SERIES, by_study, 1000)))
    )
    series.sort(key=lambda r: _int(r["SeriesNumber"]))
    viewer = bool(ctx.settings.http.viewer)
    facts = [
        f"ID {st['PatientID']}" if st["PatientID"] else "",
        f"born {_date(st['PatientBirthDate'])}" if st["PatientBirthDate"] else "",
        st["PatientSex"],
    ]
    study_facts = [
        _date(st["StudyDate"]),
        st["StudyDescription"],
        f"accession {st['AccessionNumber']}" if st["AccessionNumber"] else "",
    ]
    head = (
        f"<p><b>{_e(_pn(st['PatientName']) or '(no name)')}</b> "
        f"({_e(', '.join(x for x in facts if x))}) &middot; "
        f"{_e(' · '.join(x for x in study_facts if x))}</p><p class='muted'>{_e(uid)}</p>"
    )
    if viewer:
        head += (
            f"<p><a href='/viewer/viewer?StudyInstanceUIDs={quote(uid)}'>Open in the viewer</a></p>"
        )
    cells = []
    for s in series:
        su = s["SeriesInstanceUID"]
        base = f"/dicom-web/studies/{quote(uid)}/series/{quote(su)}"
        cells.append(
            f"<div class='thumb series'><a href='/ui/studies/{quote(uid)}/series/{quote(su)}'>"
            f"<img alt='series {_e(s['SeriesNumber'])}' loading='lazy' src='{base}/thumbnail'>"
            f"</a>#{_e(s['SeriesNumber'])} {_e(s['Modality'])} {_e(s['SeriesDescription'])}"
            f"<br><span class='muted'>{_e(s['NumberOfSeriesRelatedInstances'])} instances"
            f"</span></div>"
        )
    return page("Study", head + "<div class='thumbs'>" + "".join(cells) + "</div>", viewer=viewer)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 1 << 30


@requires("find")
async def series_page(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    uid, su = request.match_info["study"], request.match_info["series"]
    offset = _offset(request)
    matches = (
        Match("StudyInstanceUID", "single", (uid,)),
        Match("SeriesInstanceUID", "single", (su,)),
    )
    caller = caller_of(request)
    rows = await ctx.call(
        lambda: list(ctx.archive.find(caller, Query(Level.IMAGE, matches, PAGE + 1, offset)))
    )
    if not rows and offset == 0:
        raise Problem(404, f"no series {su[:80]} in study {uid[:80]}")
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    rows.sort(key=lambda r: _int(r["InstanceNumber"]))
    cells = []
    for r in rows:
        sop = quote(r["SOPInstanceUID"])
        base = f"/dicom-web/studies/{quote(uid)}/series/{quote(su)}/instances/{sop}"
        cells.append(
            f"<div class='thumb instance'><a href='{base}/rendered'><img loading='lazy' "
            f"alt='instance {_e(r['InstanceNumber'])}' src='{base}/thumbnail'></a>"
            f"#{_e(r['InstanceNumber'])} {_e(r['Rows'])}&times;{_e(r['Columns'])}"
            f"{' ' + _e(r['NumberOfFrames']) + ' frames' if r['NumberOfFrames'] else ''}</div>"
        )
    head = (
        f"<p><a href='/ui/studies/{quote(uid)}'>&larr; study</a> "
        f"<span class='muted'>{_e(su)}</span></p>"
    )
    body = head + "<div class='thumbs'>" + "".join(cells) + "</div>"
    return page("Series", body + _pager(request, offset, more, len(rows)))


@requires("find")
async def sites(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    st = await ctx.cached("status", STATUS_TTL, lambda: ctx.archive.status(probe=True))
    work = await ctx.cached("work", STATUS_TTL, ctx.archive.work_summary)
    copies_pending = sum(w.count for w in work if w.kind == "copy" and w.state == "pending")
    rows = [
        "<table id='sites'><tr><th>Site</th><th>State</th><th>Role</th><th>Location</th>"
        "<th>URL</th><th>Objects</th><th>Stored</th><th>Free</th></tr>"
    ]
    for s in st.sites:
        state = (
            "<span class='up'>up</span>"
            if s.up
            else f"<span class='down'>DOWN</span> <span class='muted'>{_e(s.reason)}</span>"
        )
        free = _e(human_bytes(s.free_bytes)) if s.free_bytes is not None else "?"
        rows.append(
            f"<tr class='site' data-site='{_e(s.name)}' data-up='{str(s.up).lower()}'>"
            f"<td>{_e(s.name)}</td><td>{state}</td><td>{_e(s.role)}</td><td>{_e(s.location)}</td>"
            f"<td>{_e(s.url)}</td><td>{s.objects}</td><td>{_e(human_bytes(s.bytes))}</td>"
            f"<td>{free}</td></tr>"
        )
    rows.append("</table>")
    bad = sum(u.bad for u in st.index.sites)
    policy = ctx.settings.replication
    rows.append(
        f"<p>Policy: {policy.copies} copies, write quorum {policy.write_quorum}. "
        f"Under-replicated (copies queued for the repair job): <b id='under'>{copies_pending}"
        f"</b>; copies marked bad or missing: <b>{bad}</b>.</p>"
        f"<p class='muted'>As of {time.strftime('%H:%M:%S')}; refreshed every "
        f"{STATUS_TTL:.0f} s.</p>"
    )
    return page("Storage sites", "".join(rows), viewer=bool(ctx.settings.http.viewer))


@requires("find")
async def jobs(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    work = await ctx.cached("work", STATUS_TTL, ctx.archive.work_summary)
    by_kind: dict[str, dict[str, Any]] = {}
    for w in work:
        k = by_kind.setdefault(w.kind, {"updated": 0.0})
        k[w.state] = w.count
        k["updated"] = max(k["updated"], w.updated_at)
    # Rate: items finished per minute between this view and the oldest snapshot of the last
    # ten minutes that this web process remembers (no scan of the work table needed).
    now = time.monotonic()
    history = ctx.job_history
    rows = [
        "<table id='jobs'><tr><th>Job (work kind)</th><th>Pending</th><th>Done</th>"
        "<th>Failed</th><th>Progress</th><th>Rate</th><th>Last activity</th></tr>"
    ]
    for kind, c in sorted(by_kind.items()):
        pending, done, failed = c.get("pending", 0), c.get("done", 0), c.get("failed", 0)
        total = pending + done + failed
        pct = f"{100 * (done + failed) / total:.1f}%" if total else "-"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["updated"]))
        seen = [h for h in history.get(kind, []) if now - h[0] <= 600] + [(now, done + failed)]
        history[kind] = seen[-50:]
        span = seen[-1][0] - seen[0][0]
        rate = f"{(seen[-1][1] - seen[0][1]) / span * 60:.0f}/min" if span >= 10 else "-"
        rows.append(
            f"<tr><td>{_e(kind)}</td><td>{pending}</td><td>{done}</td><td>{failed}</td>"
            f"<td>{pct}</td><td>{rate}</td><td>{when}</td></tr>"
        )
    if not by_kind:
        rows.append("<tr><td colspan='7' class='muted'>no background work queued</td></tr>")
    rows.append("</table>")
    return page("Jobs", "".join(rows), viewer=bool(ctx.settings.http.viewer))


@requires("find")
async def failures(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    audit = await ctx.call(ctx.archive.recent_failures, 100)
    failed_work = await ctx.call(ctx.archive.failed_work, 50)
    rows = [
        "<h3>Refused or failed requests</h3><table id='failures'><tr><th>Time (UTC)</th>"
        "<th>Who</th><th>From</th><th>Operation</th><th>Outcome</th><th>Study</th>"
        "<th>Detail</th></tr>"
    ]
    for r in audit:
        rows.append(
            f"<tr><td>{_e(r.time)}</td><td>{_e(r.user or r.ae or '-')}</td><td>{_e(r.address)}</td>"
            f"<td>{_e(r.operation)}</td><td>{_e(r.outcome)}</td><td>{_e(r.study)}</td>"
            f"<td>{_e(r.detail)}</td></tr>"
        )
    if not audit:
        rows.append("<tr><td colspan='7' class='muted'>none recorded</td></tr>")
    rows.append(
        "</table><h3>Failed background work</h3><table><tr><th>Kind</th><th>Item</th>"
        "<th>Attempts</th><th>Error</th></tr>"
    )
    for w in failed_work:
        rows.append(
            f"<tr><td>{_e(w.kind)}</td><td>{_e(w.key)}</td><td>{w.attempts}</td>"
            f"<td>{_e(w.error)}</td></tr>"
        )
    if not failed_work:
        rows.append("<tr><td colspan='4' class='muted'>none</td></tr>")
    rows.append("</table>")
    return page("Recent failures", "".join(rows), viewer=bool(ctx.settings.http.viewer))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", studies)
    r.add_get("/ui/studies", studies)
    r.add_get("/ui/studies/{study}", study)
    r.add_get("/ui/studies/{study}/series/{series}", series_page)
    r.add_get("/ui/sites", sites)
    r.add_get("/ui/jobs", jobs)
    r.add_get("/ui/failures", failures)
