"""The aiohttp application: routes of every part of the web face, behind two middlewares
(problems outermost, so even an auth failure is a JSON problem; then authentication and the
route's role check)."""

from __future__ import annotations

import logging

from aiohttp import web

from pacsgrid.archive import Archive
from pacsgrid.web import corrections, dashboard, ops, qido, stow, viewer, wado
from pacsgrid.web.auth import Authenticator
from pacsgrid.web.context import CTX, WebContext
from pacsgrid.web.problems import problem_middleware

log = logging.getLogger("pacsgrid.web")


def make_app(archive: Archive) -> web.Application:
    settings = archive.settings
    auth = Authenticator(settings.http)
    app = web.Application(
        middlewares=[problem_middleware, auth.middleware],
        client_max_size=settings.http.max_upload,
        logger=log,
    )
    app["settings"] = settings
    ctx = WebContext(archive)
    app[CTX] = ctx
    qido.add_routes(app)
    stow.add_routes(app)
    wado.add_routes(app)
    dashboard.add_routes(app)
    ops.add_routes(app)
    corrections.add_routes(app)
    if settings.http.viewer:
        viewer.add_routes(app)
        viewer.add_fallback(app)  # last: only what no other route takes

    async def close_pool(app: web.Application) -> None:
        ctx.executor.shutdown(wait=False, cancel_futures=True)
        auth.gate.close()

    app.on_cleanup.append(close_pool)
    return app
