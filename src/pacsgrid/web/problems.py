"""Errors as HTTP answers: a short JSON problem description (RFC 9457), never a traceback.

Handlers raise `Problem` (or let an archive error through); `problem_middleware` turns both into
`application/problem+json` with the right 4xx/5xx status, in this one place, like
`pacsgrid.dicom.status` does for DIMSE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from pacsgrid.errors import (
    AccessDenied,
    ArchiveUnavailable,
    ConfigError,
    CorrectionConflict,
    InvalidCorrection,
    InvalidDataset,
    NotFound,
    PacsgridError,
    StorageError,
)

log = logging.getLogger("pacsgrid.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(Exception):
    """An HTTP error answer. `extra`: more members of the problem document (RFC 9457 3.2);
    `close`: close the connection after answering (the rest of the request is not read)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, object] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}
        self.close = close


def problem_response(
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    extra: dict[str, object] | None = None,
    close: bool = False,
) -> web.Response:
    body = {"status": status, "title": HTTPStatus(status).phrase, "detail": detail, **(extra or {})}
    resp = web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )
    if close:
        resp.force_close()
    return resp


def status_for(exc: PacsgridError) -> int:
    if isinstance(exc, AccessDenied):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, CorrectionConflict):
        return 409
    if isinstance(exc, InvalidDataset | ConfigError | InvalidCorrection):
        return 400
    if isinstance(exc, ArchiveUnavailable | StorageError):
        return 503
    return 500


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    refused = refuse_early(request)
    if refused is not None:
        return refused
    try:
        return await handler(request)
    except Problem as p:
        return problem_response(p.status, p.detail, p.headers, extra=p.extra, close=p.close)
    except PacsgridError as e:
        status = status_for(e)
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.path, e)
        return problem_response(status, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        detail = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 413:
            detail = (
                f"request body too large (limit {request.app['settings'].http.max_upload} bytes)"
            )
        return problem_response(e.status, detail or e.reason, dict(_keep(e.headers)))
    except (ConnectionResetError, OSError) as e:  # the client went away mid-response
        log.info("%s %s: connection lost: %s", request.method, request.path, e)
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return problem_response(500, "internal error (see the server log)")


def refuse_early(request: web.Request) -> web.Response | None:
    """What no route may see: a NUL in the path (no file, UID or keyword holds one) and a body
    announced larger than http.max_upload (413 before a byte of it is read)."""
    if "\x00" in request.path:
        return problem_response(400, "the request path holds a NUL character")
    limit: int = request.app["settings"].http.max_upload
    if request.content_length is not None and request.content_length > limit:
        return problem_response(
            413,
            f"request body too large: {request.content_length} bytes announced, the limit "
            f"is {limit} (http.max_upload)",
            close=True,
        )
    return None


def _keep(headers: object) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = list(getattr(headers, "items", list)())
    return [(k, v) for k, v in items if k.lower() in ("www-authenticate", "allow")]
