"""Serving the prebuilt OHIF viewer (npm `@ohif/app`, its `dist/` folder) at /viewer/.

OHIF is built for the root of a site (`PUBLIC_URL="/"`, and webpack loads its chunks from
"/"), so its index.html is rewritten to load the entry points from /viewer/, and any other path
that is not one of pacsgrid's own and names a file of the viewer (`/6938.bundle.js`,
`/assets/...`) is served from the viewer folder (`add_fallback`, registered last). Its
app-config.js is replaced by one pointing at this server's DICOMweb (same origin: the
browser's credentials apply to the viewer's requests too). Any path under /viewer/ that is
not a file is the single-page app's route and gets index.html.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

from pacsgrid.web.auth import PUBLIC, requires
from pacsgrid.web.context import ctx_of
from pacsgrid.web.problems import Problem

APP_CONFIG = """window.config = {
  routerBasename: '/viewer',
  showStudyList: true,
  extensions: [],
  modes: [],
  customizationService: {},
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'pacsgrid',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacsgrid',
      configuration: {
        friendlyName: 'pacsgrid',
        name: 'pacsgrid',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def _index_html(root: Path) -> str:
    html = (root / "index.html").read_text(encoding="utf-8")
    html = html.replace('window.PUBLIC_URL="/"', 'window.PUBLIC_URL="/viewer/"')
    for attr in ("href", "src"):
        html = html.replace(f'{attr}="/', f'{attr}="/viewer/').replace(
            f'{attr}="/viewer//', f'{attr}="//'
        )
    return html


@requires("get")
async def viewer(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    root = Path(ctx.settings.http.viewer).resolve()
    rel = request.match_info.get("path", "")
    if rel == "app-config.js":
        return web.Response(text=APP_CONFIG, content_type="application/javascript")
    target = _inside(root, rel) if rel else root / "index.html"
    if target is None:
        raise Problem(404, "no such file")
    if target.is_file() and target.name != "index.html":
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return web.FileResponse(
            target, headers={"Content-Type": ctype, "Cache-Control": "public, max-age=86400"}
        )
    if "." in rel.rsplit("/", 1)[-1] and not rel.endswith(".html"):
        raise Problem(404, f"no file {rel[:100]} in the viewer")
    return web.Response(text=_index_html(root), content_type="text/html")


@requires("get")
async def viewer_file(request: web.Request) -> web.StreamResponse:
    """A file of the viewer requested from the site root (webpack chunks, assets)."""
    ctx = ctx_of(request)
    root = Path(ctx.settings.http.viewer).resolve()
    target = _inside(root, request.match_info["path"])
    if target is None or not target.is_file():
        raise Problem(404, f"no such resource: {request.path[:100]}")
    ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return web.FileResponse(
        target, headers={"Content-Type": ctype, "Cache-Control": "public, max-age=86400"}
    )


def _inside(root: Path, rel: str) -> Path | None:
    """`rel` under the viewer folder, or None when it leads outside or names no possible file
    (a NUL, a name too long for the filesystem)."""
    try:
        target = (root / rel).resolve()
        target.stat()
    except FileNotFoundError:
        pass  # may be a route of the single-page app
    except (OSError, ValueError):
        return None
    return target if root in target.parents else None


def add_fallback(app: web.Application) -> None:
    app.router.add_get("/{path:.+}", viewer_file)


@requires(PUBLIC)
async def to_viewer(request: web.Request) -> web.Response:
    raise web.HTTPFound("/viewer/")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/viewer", to_viewer)
    app.router.add_get("/viewer/{path:.*}", viewer)
