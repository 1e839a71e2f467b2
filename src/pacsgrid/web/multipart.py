"""multipart/related bodies (PS3.18 8.6): parse a STOW-RS request, write WADO-RS responses.

The parser is strict and explains itself: a missing boundary, a body without the opening
delimiter or without the closing one, or a part without headers is a `Problem(400)` naming
what is wrong, never an exception from deep inside a library.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from pacsgrid.web.problems import Problem


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def media_params(value: str) -> tuple[str, dict[str, str]]:
    """('multipart/related', {'type': 'application/dicom', 'boundary': ...}) of a header."""
    parts = split_unquoted(value, ";")
    media = parts[0].strip().lower() if parts else ""
    params: dict[str, str] = {}
    for p in parts[1:]:
        name, eq, val = p.partition("=")
        if not eq:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        params[name.strip().lower()] = val
    return media, params


def split_unquoted(value: str, sep: str) -> list[str]:
    """Split a header value on `sep` outside double quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse(body: bytes, boundary: str) -> list[Part]:
    if not boundary or len(boundary) > 200:
        raise Problem(400, "multipart body without a usable boundary parameter")
    delim = b"--" + boundary.encode("latin-1", "replace")
    start = body.find(delim)
    if start < 0:
        raise Problem(400, "malformed multipart body: the boundary never occurs")
    parts: list[Part] = []
    pos = start + len(delim)
    while True:
        if body[pos : pos + 2] == b"--":
            return parts
        if body[pos : pos + 2] != b"\r\n":
            raise Problem(400, "malformed multipart body: no CRLF after a boundary")
        pos += 2
        end = body.find(b"\r\n" + delim, pos)
        if end < 0:
            raise Problem(400, "malformed multipart body: no closing boundary (truncated?)")
        head_end = body.find(b"\r\n\r\n", pos, end)
        if head_end < 0:
            if body[pos:end].startswith(b"\r\n") or pos == end:
                head_end = pos - 2  # a part with no headers at all
            else:
                raise Problem(400, "malformed multipart body: a part has no header block")
        headers = {}
        for line in body[pos:head_end].split(b"\r\n") if head_end > pos else []:
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise Problem(400, f"malformed multipart part header {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, body[head_end + 4 : end]))
        pos = end + 2 + len(delim)


def new_boundary() -> str:
    return "pacsgrid-" + secrets.token_hex(12)


def part_header(boundary: str, content_type: str, extra: str = "") -> bytes:
    return f"--{boundary}\r\nContent-Type: {content_type}\r\n{extra}\r\n".encode()


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()
