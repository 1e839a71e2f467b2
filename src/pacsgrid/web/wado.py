"""WADO-RS (PS3.18 10.4) and WADO-URI (PS3.18 9): retrieve what the archive stores.

- instances (study, series or one instance) as multipart/related application/dicom, each part
  the stored Part 10 file byte for byte when the stored transfer syntax is acceptable
  (`transfer-syntax=*`, none named, or the stored one), converted otherwise (to an
  uncompressed syntax, as for C-GET);
- metadata in the DICOM JSON model, bulk data behind BulkDataURIs;
- frames: for uncompressed objects the native frame bytes (little endian), for compressed
  ones the stored fragments (`transfer-syntax=*` or the stored syntax) or decoded pixels;
- bulkdata of a top-level binary attribute;
- rendered and thumbnail images (pacsgrid.web.render).

Every retrieve is an `Archive.locate` (access control, audit) followed by `Archive.read`
(copy fallback, SHA-256 check).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pacsgrid.archive import Match, Query, StoredObject
from pacsgrid.dicomfile.header import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, UNCOMPRESSED
from pacsgrid.dicomfile.part10 import build_file_meta
from pacsgrid.dicomfile.transcode import TranscodeError, pixel_array, transcode
from pacsgrid.model import InstanceRecord, Level
from pacsgrid.web import multipart, validate
from pacsgrid.web.auth import requires
from pacsgrid.web.context import caller_of, ctx_of
from pacsgrid.web.dicomjson import metadata_json
from pacsgrid.web.problems import Problem
from pacsgrid.web.qido import base_url
from pacsgrid.web.render import RenderError, render

# Media types of compressed frames (PS3.18 Table 8.7.3-5).
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


@dataclass(frozen=True)
class Accepted:
    media: str  # e.g. application/dicom, application/octet-stream, image/jpeg
    multipart: bool
    transfer_syntax: str  # "*" = as stored; "" = not named


def accepted(header: str, default: str) -> list[Accepted]:
    """The acceptable representations an Accept header lists, in order."""
    out = []
    for item in multipart.split_unquoted(header or "*/*", ","):
        media, params = multipart.media_params(item)
        if not media:
            continue
        if media == "multipart/related":
            out.append(
                Accepted(
                    params.get("type", default).lower(), True, params.get("transfer-syntax", "")
                )
            )
        else:
            out.append(Accepted(media, False, params.get("transfer-syntax", "")))
    return out or [Accepted(default, True, "")]


def _uid(given: dict[str, str], name: str) -> str:
    return validate.uid(name, given[name])


async def _locate(request: web.Request, uids: dict[str, str] | None = None) -> list[InstanceRecord]:
    ctx = ctx_of(request)
    given = dict(request.match_info) if uids is None else uids
    matches = [Match("StudyInstanceUID", "single", (_uid(given, "study"),))]
    if "series" in given:
        matches.append(Match("SeriesInstanceUID", "single", (_uid(given, "series"),)))
    if "instance" in given:
        matches.append(Match("SOPInstanceUID", "single", (_uid(given, "instance"),)))
    query = Query(Level.IMAGE, tuple(matches))
    records = await ctx.call(ctx.archive.locate, caller_of(request), query, "get")
    if not records:
        what = "/".join(given.get(k, "") for k in ("study", "series", "instance"))
        raise Problem(404, f"no instances stored under {what.strip('/')}")
    records.sort(key=lambda r: (r.series_uid, _num(r.attributes.get("InstanceNumber", ""))))
    return records


def _num(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


async def _read(request: web.Request, record: InstanceRecord) -> StoredObject:
    ctx = ctx_of(request)
    return await ctx.call(ctx.archive.read, record, caller_of(request))


# ---------------------------------------------------------------- instances


@requires("get")
async def retrieve(request: web.Request) -> web.StreamResponse:
    choice = _pick(
        accepted(request.headers.get("Accept", ""), "application/dicom"), ("application/dicom",)
    )
    records = await _locate(request)
    ts = choice.transfer_syntax
    if (
        ts not in ("", "*")
        and ts not in UNCOMPRESSED
        and any(r.transfer_syntax != ts for r in records)
    ):
        raise Problem(406, f"cannot convert to {ts}: only uncompressed syntaxes or '*'")
    boundary = multipart.new_boundary()
    resp = web.StreamResponse(
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        }
    )
    await resp.prepare(request)
    ctx = ctx_of(request)
    for record in records:
        try:
            obj = await _read(request, record)
            data, send_ts = await ctx.call(_as_requested, obj, record, ts)
        except (Problem, TranscodeError, Exception) as e:  # one bad instance must not end the rest
            request.app.logger.warning("WADO-RS: skipping %s: %s", record.sop_uid, e)
            continue
        await resp.write(
            multipart.part_header(boundary, f"application/dicom; transfer-syntax={send_ts}")
        )
        await resp.write(data)
        await resp.write(b"\r\n")
    await resp.write(multipart.closing(boundary))
    await resp.write_eof()
    return resp


def _pick(options: list[Accepted], supported: tuple[str, ...]) -> Accepted:
    for a in options:
        if a.media in supported:
            return a
        if a.media in ("*/*", "*") or a.media.endswith("/*"):
            return Accepted(supported[0], a.multipart, a.transfer_syntax)
    raise Problem(406, f"this resource is available as {', '.join(supported)}")


def _as_requested(obj: StoredObject, record: InstanceRecord, ts: str) -> tuple[bytes, str]:
    """The stored Part 10 bytes, or a converted file when another syntax was asked for."""
    if ts in ("", "*", obj.transfer_syntax):
        return obj.data, obj.transfer_syntax
    dataset = transcode(obj.dataset, obj.transfer_syntax, ts)
    meta = build_file_meta(record.sop_class_uid, record.sop_uid, ts)
    return meta + dataset, ts


# ---------------------------------------------------------------- metadata


@requires("get")
async def metadata(request: web.Request) -> web.Response:
    records = await _locate(request)
    ctx = ctx_of(request)
    base = base_url(request)
    out = []
    for record in records:
        obj = await _read(request, record)
        url = (
            f"{base}/studies/{record.study_uid}/series/{record.series_uid}"
            f"/instances/{record.sop_uid}"
        )
        try:
            out.append(await ctx.call(metadata_json, obj.data, url, obj.transfer_syntax))
        except Exception as e:  # a header pydicom cannot turn into JSON
            request.app.logger.warning("metadata of %s: %s", record.sop_uid, e)
    return web.json_response(out, content_type="application/dicom+json")


# ---------------------------------------------------------------- frames and bulk data


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(x) for x in text.replace("%2C", ",").split(",") if x.strip()]
    except ValueError:
        raise Problem(
            400, f"frame list must be comma-separated numbers, got {text[:60]!r}"
        ) from None
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > 10000:
        raise Problem(400, "frame numbers start at 1")
    return numbers


@requires("get")
async def frames(request: web.Request) -> web.StreamResponse:
    numbers = _frame_numbers(request.match_info["frames"])
    options = accepted(request.headers.get("Accept", ""), "application/octet-stream")
    (record,) = (await _locate(request))[:1]
    obj = await _read(request, record)
    ctx = ctx_of(request)
    pieces = await ctx.call(_frames, obj, numbers, options)
    multi = any(a.multipart for a in options) or not options
    if not multi and len(pieces) == 1:
        media, data = pieces[0]
        return web.Response(body=data, headers={"Content-Type": media})
    boundary = multipart.new_boundary()
    first_type = multipart.media_params(pieces[0][0])[0]
    body = bytearray()
    for media, data in pieces:
        body += multipart.part_header(boundary, media)
        body += data
        body += b"\r\n"
    body += multipart.closing(boundary)
    return web.Response(
        body=bytes(body),
        headers={"Content-Type": f'multipart/related; type="{first_type}"; boundary={boundary}'},
    )


def _frames(
    obj: StoredObject, numbers: list[int], options: list[Accepted]
) -> list[tuple[str, bytes]]:
    """(part content type, bytes) per requested frame, in the first representation the
    client accepts that we can produce."""
    import pydicom
    from pydicom.encaps import generate_frames

    stored_ts = obj.transfer_syntax
    data = obj.data
    if stored_ts == EXPLICIT_BE:  # native frames are sent little endian
        data = build_file_meta("", "", EXPLICIT_LE) + transcode(obj.dataset, stored_ts, EXPLICIT_LE)
        stored_ts = EXPLICIT_LE
    elif stored_ts == DEFLATED_LE:  # pydicom inflates it: the pixel data is native
        stored_ts = EXPLICIT_LE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        raise Problem(404, "the instance has no pixel data (no frames)")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    bad = [n for n in numbers if n > count]
    if bad:
        raise Problem(404, f"frame {bad[0]} does not exist (the instance has {count})")
    compressed = stored_ts not in UNCOMPRESSED
    native_ok = compressed is False
    for a in options:
        wants_stored = a.transfer_syntax in ("*", stored_ts) and (
            a.media in ("*/*", "application/octet-stream", FRAME_MEDIA.get(stored_ts, "?"))
            or a.media.endswith("/*")
        )
        wants_native = a.media in ("application/octet-stream", "*/*") and a.transfer_syntax in (
            "",
            EXPLICIT_LE,
            "*",
        )
        if compressed and wants_stored:
            fragments = list(generate_frames(ds.PixelData, number_of_frames=count))
            media = FRAME_MEDIA.get(stored_ts, "application/octet-stream")
            return [(f"{media}; transfer-syntax={stored_ts}", fragments[n - 1]) for n in numbers]
        if (native_ok and wants_native) or (not compressed and wants_stored):
            return [
                (f"application/octet-stream; transfer-syntax={EXPLICIT_LE}", f)
                for f in _native_frames(ds, numbers, count)
            ]
        if compressed and wants_native:
            try:
                arr = pixel_array(ds)
            except Exception as e:
                raise Problem(406, f"cannot decode the frames: {type(e).__name__}: {e}") from None
            if count == 1:
                arr = arr[None, ...]
            return [
                (
                    f"application/octet-stream; transfer-syntax={EXPLICIT_LE}",
                    arr[n - 1].astype(arr.dtype.newbyteorder("<")).tobytes(),
                )
                for n in numbers
            ]
    raise Problem(
        406,
        f"frames are stored as {stored_ts}: ask for application/octet-stream, or for "
        f"transfer-syntax=* to get them as stored",
    )


def _native_frames(ds: Any, numbers: list[int], count: int) -> list[bytes]:
    pixels = bytes(ds.PixelData)
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    frame_bits = rows * cols * spp * bits
    if frame_bits % 8 and count > 1:
        raise Problem(406, "frames of this bit-packed image do not start on byte boundaries")
    size = (frame_bits + 7) // 8
    return [pixels[(n - 1) * size : n * size] for n in numbers]


@requires("get")
async def bulkdata(request: web.Request) -> web.Response:
    tag_text = request.match_info["tag"]
    try:
        tag = int(tag_text, 16)
    except ValueError:
        raise Problem(400, f"bulk data tag must be 8 hex digits, got {tag_text[:20]!r}") from None
    (record,) = (await _locate(request))[:1]
    obj = await _read(request, record)
    ctx = ctx_of(request)
    value = await ctx.call(_element_value, obj, tag)
    options = accepted(request.headers.get("Accept", ""), "application/octet-stream")
    if any(a.multipart for a in options):
        boundary = multipart.new_boundary()
        body = (
            multipart.part_header(boundary, "application/octet-stream")
            + value
            + b"\r\n"
            + multipart.closing(boundary)
        )
        return web.Response(
            body=body,
            headers={
                "Content-Type": "multipart/related; "
                f'type="application/octet-stream"; boundary={boundary}'
            },
        )
    return web.Response(body=value, content_type="application/octet-stream")


def _element_value(obj: StoredObject, tag: int) -> bytes:
    import pydicom

    data = obj.data
    ts = obj.transfer_syntax
    if ts == EXPLICIT_BE:
        data = build_file_meta("", "", EXPLICIT_LE) + transcode(obj.dataset, ts, EXPLICIT_LE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if tag not in ds:
        raise Problem(404, f"the instance has no attribute {tag:08X}")
    value = ds[tag].value
    if isinstance(value, bytes):
        return value
    raise Problem(404, f"attribute {tag:08X} is not bulk data")


# ---------------------------------------------------------------- rendered and thumbnails


def _viewport(text: str | None, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if not text:
        return default
    try:
        w, _, h = text.partition(",")
        size = (int(w), int(h or w))
    except ValueError:
        raise Problem(400, f"viewport must be WIDTH,HEIGHT, got {text[:40]!r}") from None
    if not (1 <= size[0] <= 4096 and 1 <= size[1] <= 4096):
        raise Problem(400, "viewport sizes are 1 to 4096 pixels")
    return size


def _window(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        parts = [float(x) for x in text.split(",")[:2]]
        return parts[0], parts[1]
    except (ValueError, IndexError):
        raise Problem(400, f"window must be CENTER,WIDTH[,FUNCTION], got {text[:40]!r}") from None


def _image_media(request: web.Request) -> str:
    for a in accepted(request.headers.get("Accept", ""), "image/jpeg"):
        if a.media in ("image/jpeg", "image/png"):
            return a.media
        if a.media in ("*/*", "image/*"):
            return "image/jpeg"
    raise Problem(406, "rendered images are available as image/jpeg or image/png")


async def _render_response(
    request: web.Request,
    record: InstanceRecord,
    frame: int,
    default_viewport: tuple[int, int] | None,
) -> web.Response:
    media = _image_media(request)
    viewport = _viewport(request.query.get("viewport"), default_viewport)
    window = _window(request.query.get("window"))
    quality_text = request.query.get("quality", "90")
    if not quality_text.isdigit() or not 1 <= int(quality_text) <= 100:
        raise Problem(400, "quality must be 1 to 100")
    obj = await _read(request, record)
    ctx = ctx_of(request)
    try:
        image = await ctx.call(
            render,
            obj.data,
            frame,
            media=media,
            viewport=viewport,
            window=window,
            quality=int(quality_text),
        )
    except RenderError as e:
        raise Problem(406, f"cannot render {record.sop_uid}: {e}") from None
    return web.Response(
        body=image, content_type=media, headers={"Cache-Control": "private, max-age=3600"}
    )


def _middle(records: list[InstanceRecord]) -> InstanceRecord:
    images = [r for r in records if r.attributes.get("Rows")] or records
    return images[len(images) // 2]


@requires("get")
async def rendered(request: web.Request) -> web.Response:
    records = await _locate(request)
    frame = 1
    if "frames" in request.match_info:
        numbers = _frame_numbers(request.match_info["frames"])
        frame = numbers[0]
    record = records[0] if "instance" in request.match_info else _middle(records)
    return await _render_response(request, record, frame, None)


@requires("get")
async def thumbnail(request: web.Request) -> web.Response:
    records = await _locate(request)
    record = records[0] if "instance" in request.match_info else _middle(records)
    return await _render_response(request, record, 1, (128, 128))


# ---------------------------------------------------------------- WADO-URI


@requires("get")
async def wado_uri(request: web.Request) -> web.Response:
    q = request.query
    if q.get("requestType") != "WADO":
        raise Problem(400, "requestType=WADO is required")
    for name in ("studyUID", "seriesUID", "objectUID"):
        if not q.get(name):
            raise Problem(400, f"{name} is required")
    records = await _locate(
        request, {"study": q["studyUID"], "series": q["seriesUID"], "instance": q["objectUID"]}
    )
    content = q.get("contentType", "image/jpeg").split(",")[0].strip()
    if content == "application/dicom":
        obj = await _read(request, records[0])
        ts = q.get("transferSyntax", "")
        if ts and ts not in UNCOMPRESSED and ts != obj.transfer_syntax:
            raise Problem(406, f"cannot convert to {ts}")
        ctx = ctx_of(request)
        try:
            data, _ = await ctx.call(_as_requested, obj, records[0], ts)
        except TranscodeError as e:
            raise Problem(406, str(e)) from None
        return web.Response(body=data, content_type="application/dicom")
    if content not in ("image/jpeg", "image/png"):
        raise Problem(406, "contentType must be application/dicom, image/jpeg or image/png")
    frame_text = q.get("frameNumber", "1")
    if not frame_text.isdigit() or int(frame_text) < 1:
        raise Problem(400, "frameNumber must be a positive integer")
    rows, cols = q.get("rows"), q.get("columns")
    viewport = None
    if rows or cols:
        viewport = _viewport(f"{cols or rows},{rows or cols}", None)
    obj = await _read(request, records[0])
    ctx = ctx_of(request)
    try:
        image = await ctx.call(render, obj.data, int(frame_text), media=content, viewport=viewport)
    except RenderError as e:
        raise Problem(406, str(e)) from None
    return web.Response(body=image, content_type=content)


def add_routes(app: web.Application) -> None:
    r = app.router
    s, se, i = "/dicom-web/studies/{study}", "/series/{series}", "/instances/{instance}"
    for path in (s, s + se, s + se + i):
        r.add_get(path, retrieve)
        r.add_get(path + "/metadata", metadata)
        r.add_get(path + "/rendered", rendered)
        r.add_get(path + "/thumbnail", thumbnail)
    r.add_get(s + se + i + "/frames/{frames}", frames)
    r.add_get(s + se + i + "/frames/{frames}/rendered", rendered)
    r.add_get(s + se + i + "/frames/{frames}/thumbnail", thumbnail)
    r.add_get(s + se + i + "/bulkdata/{tag}", bulkdata)
    r.add_get("/wado", wado_uri)
    r.add_get("/dicom-web/wado", wado_uri)
