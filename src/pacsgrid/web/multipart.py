"""multipart/related bodies (PS3.18 8.6): parse a STOW-RS request, write WADO-RS responses.

The parser is strict and explains itself: a missing boundary, a body without the opening
delimiter or without the closing one, or a part without headers is a `Problem(400)` naming
what is wrong, never an exception from deep inside a library.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pacsgrid.web.problems import Problem

if TYPE_CHECKING:
    from pacsgrid.archive import Spool


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]  # lower-cased names
    body: bytes | Spool  # a Spool when the reader was given one for each part

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


class Reader:
    """An incremental parser of a multipart body: `feed` chunks as they arrive, take the parts
    completed so far, `close` at the end of the body. Each part's bytes are collected once, in
    a buffer that becomes the part's `bytes` without another copy, so a body costs about its
    own size in memory (not the body plus the parts cut out of it); or, given `spool`, in a
    new spool for each part (STOW-RS: a large part goes to a spill file as it arrives).
    `discard` closes the spool of a part cut off by an error.
    """

    _MAX_HEAD = 16 << 10  # a part's header block

    def __init__(self, boundary: str, spool: Callable[[], Spool] | None = None) -> None:
        if not boundary or len(boundary) > 200:
            raise Problem(400, "multipart body without a usable boundary parameter")
        self._delim = b"--" + boundary.encode("latin-1", "replace")
        self._next = b"\r\n" + self._delim  # ends a part's body
        self._buf = bytearray()
        self._state = "preamble"  # preamble | delimiter | head | body | done
        self._headers: dict[str, str] = {}
        self._body = io.BytesIO()
        self._new_spool = spool
        self._spool: Spool | None = None

    def feed(self, chunk: bytes) -> list[Part]:
        self._buf += chunk
        out: list[Part] = []
        while self._step(out):
            pass
        return out

    def close(self) -> None:
        """The body ended: Problem(400) unless the closing delimiter was seen."""
        if self._state == "preamble":
            raise Problem(400, "malformed multipart body: the boundary never occurs")
        if self._state != "done":
            raise Problem(400, "malformed multipart body: no closing boundary (truncated?)")

    def _step(self, out: list[Part]) -> bool:
        """Advance as far as the buffer allows; False when more bytes are needed."""
        buf = self._buf
        if self._state == "preamble":
            at = buf.find(self._delim)
            if at < 0:
                del buf[: max(0, len(buf) - len(self._delim) + 1)]
                return False
            del buf[: at + len(self._delim)]
            self._state = "delimiter"
            return True
        if self._state == "delimiter":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "done"
                buf.clear()
                return False
            if buf[:2] != b"\r\n":
                raise Problem(400, "malformed multipart body: no CRLF after a boundary")
            del buf[:2]
            self._state = "head"
            return True
        if self._state == "head":
            if buf[:2] == b"\r\n":  # a part with no headers at all
                self._start_body({}, 2)
                return True
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._MAX_HEAD or buf.find(self._next) >= 0:
                    raise Problem(400, "malformed multipart body: a part has no header block")
                return False
            headers = {}
            for line in bytes(buf[:end]).split(b"\r\n"):
                name, colon, value = line.decode("latin-1").partition(":")
                if not colon:
                    raise Problem(400, f"malformed multipart part header {line[:60]!r}")
                headers[name.strip().lower()] = value.strip()
            self._start_body(headers, end + 4)
            return True
        if self._state == "body":
            at = buf.find(self._next)
            if at < 0:
                keep = len(self._next) - 1  # the delimiter may straddle two chunks
                if len(buf) > keep:
                    self._take(len(buf) - keep, 0)
                return False
            self._take(at, len(self._next))
            if self._spool is not None:
                out.append(Part(self._headers, self._spool))
                self._spool = None
            else:
                out.append(Part(self._headers, self._body.getvalue()))
                self._body = io.BytesIO()
            self._state = "delimiter"
            return True
        return False  # done: the epilogue is ignored

    def _take(self, n: int, skip: int) -> None:
        """Move the first `n` bytes of the buffer into the part's body, drop `skip` more."""
        with memoryview(self._buf) as view:
            if self._spool is not None:
                self._spool.write(view[:n])
            else:
                self._body.write(view[:n])
        del self._buf[: n + skip]

    def _start_body(self, headers: dict[str, str], skip: int) -> None:
        del self._buf[:skip]
        self._headers = headers
        self._state = "body"
        if self._new_spool is not None:
            self._spool = self._new_spool()

    def discard(self) -> None:
        """Close the spool of the part being read (the body ended in an error)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def parse(body: bytes, boundary: str) -> list[Part]:
    """Every part of a complete body."""
    reader = Reader(boundary)
    parts = reader.feed(body)
    reader.close()
    return parts


def new_boundary() -> str:
    return "pacsgrid-" + secrets.token_hex(12)


def part_header(boundary: str, content_type: str, extra: str = "") -> bytes:
    return f"--{boundary}\r\nContent-Type: {content_type}\r\n{extra}\r\n".encode()


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()
