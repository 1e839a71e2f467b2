"""STOW-RS (PS3.18 10.5): store instances sent as multipart/related application/dicom.

Each part is one Part 10 file and goes through `Archive.ingest_file`, the same durable path as
a C-STORE: it is acknowledged in the response only once it is on the write quorum and indexed.
Each part is received into an archive spool (`Archive.spool`): a part larger than
`dicom.spill_mb` goes to a spill file as it arrives, so memory stays bounded whatever its size;
every spool is closed (its file removed) when the request ends, however it ends.
The answer lists every instance: ReferencedSOPSequence for those stored, FailedSOPSequence
(with a DICOM failure reason) for those refused. 200 when all were stored, 202 when some were,
409 when none was; 400/415/413 for a request that cannot be read at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from pacsgrid.archive import Caller, Spool
from pacsgrid.errors import AccessDenied, ArchiveUnavailable, InvalidDataset, PacsgridError
from pacsgrid.web import body, multipart
from pacsgrid.web.auth import requires
from pacsgrid.web.context import caller_of, ctx_of
from pacsgrid.web.problems import Problem
from pacsgrid.web.qido import base_url

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
RETRIEVE_URL = "00081190"
SOP_CLASS = "00081150"  # ReferencedSOPClassUID
SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
WARNING_REASON = "00081196"

# PS3.4 Annex B / PS3.18 Table I.2-1 failure reasons.
PROCESSING_FAILURE = 0x0110
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xC122  # instance not in the study named in the request path


def _reason(e: PacsgridError) -> int:
    if isinstance(e, InvalidDataset):
        return DATA_SET_MISMATCH if e.missing_uids else CANNOT_UNDERSTAND
    if isinstance(e, AccessDenied):
        return NOT_AUTHORIZED
    if isinstance(e, ArchiveUnavailable):
        return OUT_OF_RESOURCES
    return PROCESSING_FAILURE


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


@requires("store")
async def store(request: web.Request) -> web.Response:
    media, params = multipart.media_params(request.headers.get("Content-Type", ""))
    if media != "multipart/related":
        raise Problem(
            415, f'STOW-RS takes multipart/related; type="application/dicom", got {media!r}'
        )
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise Problem(415, f"only application/dicom parts are accepted, got type={part_type!r}")
    reader = multipart.Reader(params.get("boundary", ""), ctx_of(request).archive.spool)
    parts: list[multipart.Part | None] = []
    try:
        async for chunk in body.chunks(request):  # stall: 408; beyond http.max_upload: 413
            parts += reader.feed(chunk)
        reader.close()
        if not parts:
            raise Problem(400, "multipart body holds no parts")
        return await _store_all(request, parts)
    finally:
        reader.discard()
        for part in parts:  # those not stored (an error cut the request short)
            if part is not None and isinstance(part.body, Spool):
                part.body.close()


async def _store_all(request: web.Request, parts: list[multipart.Part | None]) -> web.Response:
    want_study = request.match_info.get("study", "")
    caller = caller_of(request)
    base = base_url(request)
    # Parts are stored concurrently: each is durable on its own, and their index rows share
    # group commits, so a request of many instances costs about one fsync round per batch.
    # `budget` bounds the bytes of the parts being stored at once (a larger part goes alone),
    # and a part is let go (its spill file removed) as soon as it is stored.
    budget = _Budget(_IN_FLIGHT)
    outcomes = await asyncio.gather(
        *(
            _store_taken(request, i, parts, budget, want_study, caller, base)
            for i in range(len(parts))
        )
    )
    stored = [item for ok, item in outcomes if ok]
    failed = [item for ok, item in outcomes if not ok]
    answer: dict[str, Any] = {}
    if want_study:
        answer[RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base}/studies/{want_study}"]}
    if stored:
        answer[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
    if failed:
        answer[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if stored else 409)
    return web.json_response(answer, status=status, content_type="application/dicom+json")


_IN_FLIGHT = 16 << 20  # bytes of parts being stored at once (at least one part)


class _Budget:
    """At most `limit` bytes of parts in the archive at once (a larger part goes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.changed = asyncio.Condition()

    async def take(self, n: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def give(self, n: int) -> None:
        async with self.changed:
            self.used -= n
            self.changed.notify_all()


async def _store_taken(
    request: web.Request,
    i: int,
    parts: list[multipart.Part | None],
    budget: _Budget,
    want_study: str,
    caller: Caller,
    base: str,
) -> tuple[bool, dict[str, Any]]:
    part = parts[i]
    assert part is not None
    size = part.body.size if isinstance(part.body, Spool) else len(part.body)
    await budget.take(size)
    try:
        parts[i] = None  # from here on, only this call holds the part
        return await _store_part(request, i, part, want_study, caller, base)
    finally:
        if isinstance(part.body, Spool):
            part.body.close()
        await budget.give(size)


async def _store_part(
    request: web.Request,
    i: int,
    part: multipart.Part,
    want_study: str,
    caller: Caller,
    base: str,
) -> tuple[bool, dict[str, Any]]:
    """(stored?, the ReferencedSOPSequence or FailedSOPSequence item) for one part."""
    ctx = ctx_of(request)
    ptype = multipart.media_params(part.content_type or "application/dicom")[0]
    if ptype != "application/dicom":
        return False, {FAILURE_REASON: {"vr": "US", "Value": [CANNOT_UNDERSTAND]}}
    try:
        sop_class = await ctx.call(_check_study, part.body, want_study)
        result = await ctx.call(ctx.archive.ingest_file, part.body, caller)
    except _WrongStudy as e:
        return False, {
            SOP_CLASS: _ui(e.sop_class),
            SOP_INSTANCE: _ui(e.sop_uid),
            FAILURE_REASON: {"vr": "US", "Value": [STUDY_MISMATCH]},
        }
    except PacsgridError as e:
        request.app.logger.info("STOW part %d from %s refused: %s", i + 1, caller, e)
        item: dict[str, Any] = {FAILURE_REASON: {"vr": "US", "Value": [_reason(e)]}}
        sop = _sop_of(part.body)
        if sop:
            item[SOP_INSTANCE] = _ui(sop)
        return False, item
    item = {
        SOP_CLASS: _ui(sop_class),
        SOP_INSTANCE: _ui(result.sop_instance_uid),
        RETRIEVE_URL: {
            "vr": "UR",
            "Value": [
                f"{base}/studies/{result.study_uid}/series/{result.series_uid}"
                f"/instances/{result.sop_instance_uid}"
            ],
        },
    }
    if result.warnings:
        item[WARNING_REASON] = {"vr": "US", "Value": [0xB000]}
    return True, item


class _WrongStudy(Exception):
    def __init__(self, sop_class: str, sop_uid: str) -> None:
        self.sop_class = sop_class
        self.sop_uid = sop_uid


def _check_study(part: bytes | Spool, want_study: str) -> str:
    """The SOP class of a part; raise _WrongStudy if it belongs to another study than the
    request path names (header read only, nothing stored)."""
    from pacsgrid.dicomfile.header import scan
    from pacsgrid.dicomfile.part10 import split_part10

    try:
        data = part.contents() if isinstance(part, Spool) else part
        p10 = split_part10(data)
        if not want_study:
            return p10.sop_class_uid
        header = scan(data, p10.transfer_syntax, p10.dataset_offset)
    except PacsgridError:
        return ""  # unreadable: the archive refuses it (and audits the refusal)
    if header.study_uid != want_study:
        raise _WrongStudy(header.sop_class_uid or p10.sop_class_uid, header.sop_instance_uid)
    return header.sop_class_uid or p10.sop_class_uid


def _sop_of(part: bytes | Spool) -> str:
    from pacsgrid.dicomfile.part10 import split_part10

    try:
        return split_part10(part.contents() if isinstance(part, Spool) else part).sop_instance_uid
    except PacsgridError:
        return ""


def add_routes(app: web.Application) -> None:
    app.router.add_post("/dicom-web/studies", store)
    app.router.add_post("/dicom-web/studies/{study}", store)
