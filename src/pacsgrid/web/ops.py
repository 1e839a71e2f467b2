"""Operations endpoints: Prometheus /metrics, /health for load balancers, the OpenAPI document
of the HTTP API, and the admin API for users and tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from pacsgrid import metrics
from pacsgrid.archive import ArchiveStatus, WorkSummary
from pacsgrid.web.auth import requires
from pacsgrid.web.body import read as read_body
from pacsgrid.web.context import caller_of, ctx_of
from pacsgrid.web.problems import Problem

SNAPSHOT_TTL = 15.0


class _Snapshot:
    """Gauges of shared state, computed once per scrape in the web process."""

    def __init__(self, status: ArchiveStatus, work: list[WorkSummary]) -> None:
        self.status = status
        self.work = work

    def collect(self) -> Iterator[Metric]:
        i = self.status.index
        size = GaugeMetricFamily(
            "pacsgrid_index_entities", "Entities in the index", labels=["level"]
        )
        for level, n in (
            ("patient", i.patients),
            ("study", i.studies),
            ("series", i.series),
            ("instance", i.instances),
        ):
            size.add_metric([level], n)
        yield size
        yield GaugeMetricFamily("pacsgrid_index_bytes", "Bytes of indexed instances", value=i.bytes)
        up = GaugeMetricFamily("pacsgrid_site_up", "1 if the site is healthy", labels=["site"])
        objects = GaugeMetricFamily("pacsgrid_site_objects", "Copies on the site", labels=["site"])
        stored = GaugeMetricFamily("pacsgrid_site_bytes", "Bytes on the site", labels=["site"])
        free = GaugeMetricFamily(
            "pacsgrid_site_free_bytes", "Free bytes on the site", labels=["site"]
        )
        for s in self.status.sites:
            up.add_metric([s.name], 1 if s.up else 0)
            objects.add_metric([s.name], s.objects)
            stored.add_metric([s.name], s.bytes)
            if s.free_bytes is not None:
                free.add_metric([s.name], s.free_bytes)
        yield from (up, objects, stored, free)
        work = GaugeMetricFamily(
            "pacsgrid_work_items",
            "Background work items by kind and state",
            labels=["kind", "state"],
        )
        for w in self.work:
            work.add_metric([w.kind, w.state], w.count)
        yield work


@requires("find")
async def metrics_view(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    status = await ctx.cached("metrics-status", SNAPSHOT_TTL, ctx.archive.status)
    work = await ctx.cached("metrics-work", SNAPSHOT_TTL, ctx.archive.work_summary)
    if metrics.multiprocess():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        counters = generate_latest(registry)
    else:
        counters = generate_latest(REGISTRY)
    gauges = generate_latest(_Snapshot(status, work))
    return web.Response(
        body=counters + gauges, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


@requires("find")  # and public while http.public_health is true (see pacsgrid.web.auth)
async def health(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    h = await ctx.call(ctx.archive.health)
    body = {
        "status": "ok" if h.ok else "unavailable",
        "index": "ok" if h.index_ok else "unreachable",
        "writable_sites": h.writable_sites,
        "write_quorum": h.write_quorum,
    }
    return web.json_response(body, status=200 if h.ok else 503)


# ---------------------------------------------------------------- admin API


async def _json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Problem(415, "send application/json")
    try:
        body = json.loads(await read_body(request))
    except (ValueError, UnicodeDecodeError):
        raise Problem(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Problem(400, "body must be a JSON object")
    return body


@requires("admin")
async def list_users(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    users = await ctx.call(ctx.archive.users, caller_of(request))
    return web.json_response([{"name": u.name, "role": u.role} for u in users])


@requires("admin")
async def put_user(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await _json(request)
    name, role, password = body.get("name"), body.get("role", "read"), body.get("password", "")
    if not isinstance(name, str) or not isinstance(role, str) or not isinstance(password, str):
        raise Problem(400, "name, role and password must be strings")
    await ctx.call(ctx.archive.add_user, caller_of(request), name, role, password)
    return web.json_response({"name": name, "role": role}, status=201)


@requires("admin")
async def new_token(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    label = request.query.get("label", "")[:100]
    token = await ctx.call(
        ctx.archive.create_token, caller_of(request), request.match_info["name"], label
    )
    return web.json_response({"token": token}, status=201)


# ---------------------------------------------------------------- OpenAPI

_QIDO_PARAMS: list[dict[str, Any]] = [
    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
    for n in (
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyInstanceUID",
        "AccessionNumber",
        "ModalitiesInStudy",
        "Modality",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "includefield",
        "fuzzymatching",
    )
] + [
    {"name": n, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}
    for n in ("limit", "offset")
]


@requires("find")
async def openapi(request: web.Request) -> web.Response:
    paths: dict[str, dict[str, Any]] = {}
    for route in request.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("formatter") or info.get("path")
        if not path or route.method == "HEAD" or path.startswith("/viewer") or path == "/{path}":
            continue
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _path_params(path)
        ]
        if route.method == "GET" and path.endswith(("/studies", "/series", "/instances")):
            params += _QIDO_PARAMS
        op: dict[str, Any] = {
            "operationId": f"{route.method.lower()}{path}".replace("/", "_")
            .replace("{", "")
            .replace("}", ""),
            "parameters": params,
            "responses": {"default": {"description": "result or a problem description"}},
            "x-pacsgrid-role": getattr(route.handler, "pacsgrid_operation", "admin"),
        }
        if route.method in ("POST", "PUT"):
            op["requestBody"] = {
                "content": {
                    "multipart/related": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {"type": "object"}},
                }
            }
        paths.setdefault(path, {})[route.method.lower()] = op
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "pacsgrid", "version": "1"},
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "token": {"type": "http", "scheme": "bearer"},
            }
        },
        "security": [{"basic": []}, {"token": []}],
        "paths": dict(sorted(paths.items())),
    }
    return web.json_response(doc)


def _path_params(path: str) -> list[str]:
    out, pos = [], 0
    while (start := path.find("{", pos)) >= 0:
        end = path.find("}", start)
        out.append(path[start + 1 : end].split(":")[0])
        pos = end + 1
    return out


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/metrics", metrics_view)
    r.add_get("/health", health)
    r.add_get("/openapi.json", openapi)
    r.add_get("/api/users", list_users)
    r.add_post("/api/users", put_user)
    r.add_post("/api/users/{name}/tokens", new_token)
