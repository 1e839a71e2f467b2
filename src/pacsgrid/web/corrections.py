"""Corrections on the web face: a JSON admin API and an admin page (admin role only).

The API takes and answers JSON only (a browser form on another site cannot send JSON, so the
API cannot be driven by a page the admin happens to visit); the page lists corrections and
hidden instances and calls the same API from a few lines of script. Everything goes through
`Archive.corrections`, like the `pacsgrid correct` and `pacsgrid reject` commands.

    GET  /api/corrections?limit=&offset=&seq=      corrections, newest first (or one)
    POST /api/corrections/patient      {"patient": {"PatientID", "IssuerOfPatientID"},
                                        "set": {...}, "reason"}
    POST /api/corrections/merge        {"merged": {...}, "into": {...}, "set": {...}, "reason"}
    POST /api/corrections/move-study   {"study": UID, "to": {...}, "set": {...}, "reason"}
    POST /api/corrections/undo         {"correction": N, "reason"}
    GET  /api/rejected?by=&study=&limit=&offset=   instances hidden by rejection notes
    POST /api/rejected/unhide          {"instances": [UID...] | "by": N | "study": UID, "reason"}
"""

from __future__ import annotations

from dataclasses import asdict
from html import escape
from typing import Any

from aiohttp import web

from pacsgrid.archive.correction_plans import PatientRef
from pacsgrid.archive.corrections import Outcome, describe
from pacsgrid.web.auth import requires
from pacsgrid.web.context import caller_of, ctx_of
from pacsgrid.web.dashboard import page
from pacsgrid.web.ops import _json
from pacsgrid.web.problems import Problem


def _int(request: web.Request, name: str, default: int, most: int = 1_000_000) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 9 or int(raw) > most:
        raise Problem(400, f"{name} must be an integer from 0 to {most}")
    return int(raw)


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise Problem(400, f"{name} must be {'non-empty ' if required else ''}text")
    return value


def _patient(body: dict[str, Any], name: str) -> PatientRef:
    ref = body.get(name)
    if not isinstance(ref, dict):
        raise Problem(400, f"{name} must be an object with PatientID (and IssuerOfPatientID)")
    pid = _text(ref, "PatientID", required=True)
    return PatientRef(pid, _text(ref, "IssuerOfPatientID"))


def _values(body: dict[str, Any]) -> dict[str, str]:
    values = body.get("set", {})
    if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
        raise Problem(400, "set must be an object of attribute keywords and text values")
    return {str(k): v for k, v in values.items()}


def _answer(outcome: Outcome) -> web.Response:
    c = outcome.correction
    body = {"detail": outcome.detail, "seq": outcome.seq}
    return web.json_response(body, status=201 if c is not None else 200)


@requires("admin")
async def list_corrections(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    caller = caller_of(request)
    if "seq" in request.query:
        row = await ctx.call(ctx.archive.corrections.get, caller, _int(request, "seq", 0))
        if row is None:
            raise Problem(404, "no such correction")
        return web.json_response({**describe(row), "document": row.doc.to_json().decode()})
    rows = await ctx.call(
        ctx.archive.corrections.recent,
        caller,
        _int(request, "limit", 50, 1000),
        _int(request, "offset", 0),
    )
    return web.json_response([describe(r) for r in rows])


@requires("admin")
async def correct_patient(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await _json(request)
    outcome = await ctx.call(
        ctx.archive.corrections.update_patient,
        caller_of(request),
        _patient(body, "patient"),
        _values(body),
        _text(body, "reason", required=True),
    )
    return _answer(outcome)


@requires("admin")
async def merge(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await _json(request)
    outcome = await ctx.call(
        ctx.archive.corrections.merge,
        caller_of(request),
        _patient(body, "merged"),
        _patient(body, "into"),
        _values(body),
        _text(body, "reason", required=True),
    )
    return _answer(outcome)


@requires("admin")
async def move_study(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await _json(request)
    outcome = await ctx.call(
        ctx.archive.corrections.move_study,
        caller_of(request),
        _text(body, "study", required=True),
        _patient(body, "to"),
        _values(body),
        _text(body, "reason", required=True),
    )
    return _answer(outcome)


@requires("admin")
async def undo(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await _json(request)
    seq = body.get("correction")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0:
        raise Problem(400, "correction must be the number of a correction")
    outcome = await ctx.call(
        ctx.archive.corrections.undo, caller_of(request), seq, _text(body, "reason", required=True)
    )
    return _answer(outcome)


@requires("admin")
async def list_rejected(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    rows = await ctx.call(
        lambda: ctx.archive.corrections.hidden(
            caller_of(request),
            _int(request, "limit", 100, 10000),
            _int(request, "offset", 0),
            by=_int(request, "by", 0),
            study_uid=request.query.get("study", "")[:64],
        )
    )
    return web.json_response([asdict(r) for r in rows])


@requires("admin")
async def unhide(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await _json(request)
    sops = body.get("instances", [])
    by = body.get("by", 0)
    if not isinstance(sops, list) or not all(isinstance(s, str) for s in sops):
        raise Problem(400, "instances must be a list of SOP Instance UIDs")
    if not isinstance(by, int) or isinstance(by, bool) or by < 0:
        raise Problem(400, "by must be the number of a correction")
    study = _text(body, "study")
    if not (sops or by or study):
        raise Problem(400, "name instances, by (a correction) or study")
    outcome = await ctx.call(
        lambda: ctx.archive.corrections.unhide(
            caller_of(request),
            sops,
            by=by,
            study_uid=study,
            reason=_text(body, "reason", required=True),
        )
    )
    if outcome.correction is None:
        raise Problem(404, "none of these instances is hidden")
    return _answer(outcome)


# ---------------------------------------------------------------- the admin page

_SCRIPT = """
async function call(path, body) {
  const r = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                               body: JSON.stringify(body), credentials: 'same-origin'});
  const answer = await r.json();
  document.getElementById('result').textContent = r.status + ': ' + answer.detail;
  if (r.ok) { setTimeout(() => location.reload(), 800); }
}
function reason() { return document.getElementById('reason').value; }
function ref(prefix) {
  return {PatientID: document.getElementById(prefix + '-id').value,
          IssuerOfPatientID: document.getElementById(prefix + '-issuer').value};
}
function values() {
  const out = {};
  for (const k of ['PatientName', 'PatientBirthDate', 'PatientSex']) {
    const v = document.getElementById('set-' + k).value;
    if (v) { out[k] = v; }
  }
  const id = document.getElementById('set-PatientID').value;
  if (id) { out.PatientID = id; }
  return out;
}
function undo(n) { call('/api/corrections/undo', {correction: n, reason: reason()}); }
function unhide(n) { call('/api/rejected/unhide', {by: n, reason: reason()}); }
function correct(kind) {
  if (kind === 'patient') {
    call('/api/corrections/patient', {patient: ref('a'), set: values(), reason: reason()});
  } else if (kind === 'merge') {
    call('/api/corrections/merge', {merged: ref('a'), into: ref('b'), set: values(),
                                    reason: reason()});
  } else {
    call('/api/corrections/move-study', {study: document.getElementById('study').value,
                                         to: ref('b'), set: values(), reason: reason()});
  }
}
"""


def _e(value: object) -> str:
    return escape(str(value))


@requires("admin")
async def admin_page(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    caller = caller_of(request)
    rows = await ctx.call(ctx.archive.corrections.recent, caller, 100, 0)
    hidden = await ctx.call(lambda: ctx.archive.corrections.hidden(caller, 100))
    out = [
        "<p class='muted'>Stored objects never change: corrections are kept beside them, "
        "written to every archive site, and can be undone (the undo is a correction too).</p>",
        "<p><input id='reason' size='60' placeholder='Reason (required)'> "
        "<span id='result' class='muted'></span></p>",
        "<h3>New correction</h3><form id='new' onsubmit='return false'>"
        "<input id='a-id' placeholder='Patient ID (patient, merged)'>"
        "<input id='a-issuer' placeholder='Issuer'>"
        "<input id='b-id' placeholder='Into / to patient ID'>"
        "<input id='b-issuer' placeholder='Issuer'>"
        "<input id='study' placeholder='Study Instance UID (move)'><br>"
        "<input id='set-PatientID' placeholder='New patient ID'>"
        "<input id='set-PatientName' placeholder='Name, e.g. DOE^JANE'>"
        "<input id='set-PatientBirthDate' placeholder='Birth date YYYYMMDD'>"
        "<input id='set-PatientSex' placeholder='Sex M/F/O' size='6'>"
        "<button onclick=\"correct('patient')\">Update patient</button>"
        "<button onclick=\"correct('merge')\">Merge into</button>"
        "<button onclick=\"correct('move')\">Move study</button></form>",
        "<h3>Corrections</h3><table id='corrections'><tr><th>#</th><th>Time (UTC)</th>"
        "<th>Kind</th><th>By</th><th>Reason</th><th>What</th><th>State</th><th></th></tr>",
    ]
    for r in rows:
        d = describe(r)
        state = f"undone by #{r.undone_by}" if r.undone_by else r.state
        button = (
            f"<button class='undo' onclick='undo({r.seq})'>Undo</button>"
            if r.undone_by is None and r.state == "applied"
            else ""
        )
        out.append(
            f"<tr class='correction' data-seq='{r.seq}'><td>{r.seq}</td><td>{_e(d['time'])}</td>"
            f"<td>{_e(r.kind)}</td><td>{_e(d['who'])}</td><td>{_e(d['reason'])}</td>"
            f"<td>{_e(d['summary'])}</td><td>{_e(state)}</td><td>{button}</td></tr>"
        )
    if not rows:
        out.append("<tr><td colspan='8' class='muted'>no corrections</td></tr>")
    out.append(
        "</table><h3>Hidden by rejection notes</h3><table id='hidden'><tr><th>SOP Instance "
        "UID</th><th>Study</th><th>Series</th><th>Hidden by</th><th></th></tr>"
    )
    for h in hidden:
        out.append(
            f"<tr class='hidden-instance'><td>{_e(h.sop_uid)}</td><td>{_e(h.study_uid)}</td>"
            f"<td>{_e(h.series_uid or '(not received)')}</td><td>#{h.by}</td><td>"
            f"<button onclick='unhide({h.by})'>Show all of #{h.by}</button></td></tr>"
        )
    if not hidden:
        out.append("<tr><td colspan='5' class='muted'>none</td></tr>")
    out.append(f"</table><script>{_SCRIPT}</script>")
    return page("Corrections", "".join(out), viewer=bool(ctx.settings.http.viewer))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/ui/corrections", admin_page)
    r.add_get("/api/corrections", list_corrections)
    r.add_post("/api/corrections/patient", correct_patient)
    r.add_post("/api/corrections/merge", merge)
    r.add_post("/api/corrections/move-study", move_study)
    r.add_post("/api/corrections/undo", undo)
    r.add_get("/api/rejected", list_rejected)
    r.add_post("/api/rejected/unhide", unhide)
